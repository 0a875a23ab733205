"""Train a face-recognition model: the original model on the full dataset (is_original_train=True,
recording per-epoch probabilities) or a model on a kept list with its label map (is_original_train=False).

    python train_everything.py --rec data/synthetic --network smallnet
    torchrun --nproc_per_node=8 train_everything.py --dataset webface --rec /data/faces_webface_112x112

Every key of config/config.py can be overridden: `python train_everything.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.training import train

if __name__ == "__main__":
    run_stage("train_everything", train, description=__doc__, distributed=True)
