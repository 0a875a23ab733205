"""Random baseline: per identity, a uniformly random --fraction of the samples (seeded by --seed).

This is coreset_select.py's stage for `--coreset_method rand`: it writes coresets/rand_<fraction>/
(kept_index.npy, label_map.json, summary.json, plot.png).

Every key of config/config.py can be overridden: `python coreset_rand.py --KEY VALUE`; `--help` lists them.
"""
from coreset_select import main, stage_for

run_rand = stage_for("rand")  # the stage function (tests call it)

if __name__ == "__main__":
    main("coreset_rand", "rand", __doc__)
