"""Write a copy of a RecordIO dataset with injected label noise and its ground truth (see utils/noise.py and --help).

    python make_noisy_dataset.py --rec data/synthetic --out data/synthetic_noisy --flip-rate 0.1 \
        --open-rate 0.05 --open-from data/other_identities --seed 0
"""
import sys

from utils.noise import main

if __name__ == "__main__":
    sys.exit(main())
