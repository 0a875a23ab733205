"""DiffProb pruning: per identity, drop samples whose probability is within the threshold of a kept
sample. Give --threshold, or --fraction to search the threshold. --coreset_method diffprob_clean prunes the cleaned set.

Every key of config/config.py can be overridden: `python eval_simprobs.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_diffprob

if __name__ == "__main__":
    run_stage("eval_simprobs", run_diffprob, description=__doc__)
