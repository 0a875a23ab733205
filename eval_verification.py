"""Evaluate checkpoints on InsightFace `.bin` verification sets (LFW, CFP-FP, CFP-FF, AgeDB-30, CALFW, CPLFW):
10-fold accuracy with the flip test, +- std per target and the mean.

    python eval_verification.py --rec /data/faces_webface_112x112 --val_targets lfw,cfp_fp,agedb_30 \
        --models r50=/path/backbone.pth --network iresnet50

Every key of config/config.py can be overridden: `--KEY VALUE`; `--help` lists them.
"""
from utils.evaluation import add_model_args, run_verification
from utils.runtime import run_stage

if __name__ == "__main__":
    run_stage("eval_verification", run_verification, description=__doc__, extra_args=add_model_args)
