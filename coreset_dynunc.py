"""DynUnc baseline (He et al. 2023): per identity, keep the samples whose labelled-class probability
varied most across training epochs (window J = --window).

This is coreset_select.py's stage for `--coreset_method dynunc`: it writes coresets/dynunc_<fraction>/
(kept_index.npy, label_map.json, summary.json, plot.png).

Every key of config/config.py can be overridden: `python coreset_dynunc.py --KEY VALUE`; `--help` lists them.
"""
from coreset_select import main, stage_for

run_dynunc = stage_for("dynunc")  # the stage function (tests call it)

if __name__ == "__main__":
    main("coreset_dynunc", "dynunc", __doc__)
