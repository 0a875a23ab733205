"""Write a synthetic face-recognition dataset in the real formats (see utils/synthetic.py and --help).

    python make_synthetic_dataset.py --out data/synthetic --num-ids 500 --image-size 112 --seed 0
"""
import sys

from utils.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
