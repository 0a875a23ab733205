"""The pipeline's profiles: one scale of the experiment each (synthetic data arguments and training config keys),
and which keys a profile may set on a real `--rec` (the dataset preset decides the rest: the paper's recipe)."""
from __future__ import annotations

from dataclasses import dataclass

@dataclass
class Profile:
    """One scale of the experiment: synthetic data arguments and training config keys."""
    description: str
    data: list
    train: dict
    fractions: tuple = (0.75, 0.5, 0.25)
    methods: tuple = ("rand", "dynunc", "diffprob", "diffprob_clean")
    extra_seeds: int = 1  # retrain the full-data model with this many other seeds: the seed spread
    ijb: bool = True


PROFILES = {
    # CI's end-to-end test: seconds per stage.
    "tiny": Profile(
        "a few seconds per stage (tests)",
        data=["--num_ids", "24", "--image_size", "32", "--seed", "0", "--val_pairs", "200"],
        train=dict(network="smallnet", embedding_size=64, batch_size=64, num_epoch=3, lr_steps=[2], lr=0.4,
                   num_workers=0, threads=1, record_topk=4, window=2, frequent=20, verify_every_epoch=False),
        fractions=(0.5,), extra_seeds=0, methods=("rand", "dynunc", "diffprob", "diffprob_clean", "entropy", "ucb")),
    # The default first run, CPU: within 10 minutes where tools/bench_train.py's paper-style loop makes 460
    # images/s (docs/results.md); 3,000 verification pairs per set.
    "demo": Profile(
        "the default without a GPU: 100 identities, 12 epochs; about 10 minutes at 460 images/s in tools/bench_train.py",
        data=["--num_ids", "100", "--image_size", "32", "--seed", "0", "--val_pairs", "1500"],
        train=dict(network="smallnet", embedding_size=128, batch_size=128, num_epoch=12, lr_steps=[8, 11], lr=0.4,
                   num_workers=0, threads=1, record_topk=10, window=4, frequent=20, verify_every_epoch=False)),
    # The earlier default, 1.5x the identities and 4x the verification pairs: about twice the demo's time.
    "cpu": Profile(
        "150 identities, 12 epochs, 6,000 verification pairs per set: about twice the demo's time",
        data=["--num_ids", "150", "--image_size", "32", "--seed", "0"],
        train=dict(network="smallnet", embedding_size=128, batch_size=128, num_epoch=12, lr_steps=[8, 11], lr=0.4,
                   num_workers=0, threads=1, record_topk=10, window=4, frequent=20, verify_every_epoch=False)),
    # One GPU: the paper's backbone at 112x112 on a larger synthetic set (or the real data with --rec).
    "gpu": Profile(
        "one GPU: iresnet50 at 112x112",
        data=["--num_ids", "2000", "--image_size", "112", "--seed", "0", "--workers", "8"],
        train=dict(network="iresnet50", embedding_size=512, batch_size=256, num_epoch=20, lr_steps=[12, 16, 18],
                   lr=0.1, num_workers=8, record_topk=10, window=10, frequent=50,
                   verify_every_epoch=False)),
}


# With a real --rec the dataset preset decides the schedule and the verification targets (the paper's recipe);
# a profile fills only these: the model, the batch per process, the loader and the logging.
REAL_DATA_PROFILE_KEYS = ("network", "embedding_size", "batch_size", "num_workers", "record_topk", "frequent")
