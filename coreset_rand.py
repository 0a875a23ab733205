"""Random baseline: per identity, a uniformly random --fraction of the samples (seeded by --seed).

Every key of config/config.py can be overridden: `python coreset_rand.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_rand

if __name__ == "__main__":
    run_stage("coreset_rand", run_rand, description=__doc__)
