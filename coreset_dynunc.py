"""DynUnc baseline (He et al. 2023): per identity, keep the samples whose labelled-class probability
varied most across training epochs (window J = --window).

Every key of config/config.py can be overridden: `python coreset_dynunc.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_dynunc

if __name__ == "__main__":
    run_stage("coreset_dynunc", run_dynunc, description=__doc__)
