"""Cleaning: remove samples whose margin-free arg-max class differs from their label; writes the
cleaned kept list, the vanished identities and the contiguous label map (--relabel true: suggested labels too).

Every key of config/config.py can be overridden: `python clean_trainset.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_clean

if __name__ == "__main__":
    run_stage("clean_trainset", run_clean, description=__doc__)
