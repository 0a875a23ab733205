"""IJB-B / IJB-C evaluation from the official release layout (loose_crop/, meta/): 1:1 verification
TAR at FAR 1e-6 .. 1e-1 with a ROC plot (several models in one call), and 1:N identification where the
gallery/probe files exist. Image features are cached, so re-scoring does not run the network again.

    python eval_ijbc.py --ijb_root /data/IJB_release/IJBC --ijb_target ijbc --network iresnet50 \
        --models full=/runs/full/backbone.pth,diffprob50=/runs/diffprob/backbone.pth --out ijbc_eval

Every key of config/config.py can be overridden: `--KEY VALUE`; `--help` lists them.
"""
from utils.evaluation import add_ijb_args, run_ijb
from utils.runtime import run_stage

if __name__ == "__main__":
    run_stage("eval_ijbc", run_ijb, description=__doc__, extra_args=add_ijb_args)
