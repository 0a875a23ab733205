"""Soft-label entropy pruning ("Data Pruning Can Do More", Yang et al.): per identity, keep the
samples whose epoch-averaged soft label is most uncertain.

Every key of config/config.py can be overridden: `python coreset_entropy.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_entropy

if __name__ == "__main__":
    run_stage("coreset_entropy", run_entropy, description=__doc__)
