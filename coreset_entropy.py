"""Soft-label entropy pruning ("Data Pruning Can Do More", Yang et al.): per identity, keep the
samples whose epoch-averaged soft label is most uncertain.

This is coreset_select.py's stage for `--coreset_method entropy`: it writes coresets/entropy_<fraction>/
(kept_index.npy, label_map.json, summary.json, plot.png).

Every key of config/config.py can be overridden: `python coreset_entropy.py --KEY VALUE`; `--help` lists them.
"""
from coreset_select import main, stage_for

run_entropy = stage_for("entropy")  # the stage function (tests call it)

if __name__ == "__main__":
    main("coreset_entropy", "entropy", __doc__)
