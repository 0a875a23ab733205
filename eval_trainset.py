"""Score every training sample with the original model: labelled-class probability with the margin
head (DiffProb input), probability and arg-max class without margin. Checkpoint: eval_epoch / use_all_epochs.

Every key of config/config.py can be overridden: `python eval_trainset.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.scoring import score_trainset

if __name__ == "__main__":
    run_stage("eval_trainset", score_trainset, description=__doc__, distributed=True)
