"""Write a copy of a RecordIO dataset with injected label noise and its ground truth (see utils/data/noise.py and --help).

    python make_noisy_dataset.py --rec data/synthetic --out data/synthetic_noisy --flip_rate 0.1 \
        --open_rate 0.05 --open_from data/other_identities --seed 0
"""
import argparse
import sys

from utils.errors import ToolkitError
from utils.data.noise import check_rates, inject_noise
from utils.runtime.cli import add_bool, flag


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a copy of a RecordIO dataset with injected closed-set label flips and open-set "
                    "replacements, plus noise.json (their ground truth) and origin_index.npy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rec", required=True, help="source dataset folder (train.rec, train.idx, property)")
    parser.add_argument("--out", required=True, help="dataset folder to create (refused if it exists)")
    add_bool(parser, "overwrite", "replace an existing --out folder")
    parser.add_argument(*flag("flip_rate"), type=float, default=0.0,
                        help="share of images relabelled to another identity of the dataset, drawn uniformly")
    parser.add_argument(*flag("open_rate"), type=float, default=0.0,
                        help="share of images whose image is replaced by one of --open_from (label kept)")
    parser.add_argument(*flag("open_from"), default=None,
                        help="RecordIO dataset of identities the training set does not contain, same image size")
    parser.add_argument("--seed", type=int, default=0, help="the same seed and arguments give byte-identical files")
    add_bool(parser, "quiet", "no progress bar and no summary")
    args = parser.parse_args(argv)
    try:
        check_rates(args.flip_rate, args.open_rate, args.open_from)
    except ValueError as exc:
        parser.error(str(exc))  # exit 2, nothing written
    try:
        summary = inject_noise(args.rec, args.out, args.flip_rate, args.open_rate, args.open_from, args.seed,
                               overwrite=args.overwrite, progress=not args.quiet)
    except ToolkitError as exc:  # the project's own errors: one line; anything else is a bug
        print(f"make_noisy_dataset.py: error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {summary['out']}: {summary['images']} images of {summary['identities']} identities, "
              f"{summary['flipped']} flipped, {summary['open_set']} open-set from {args.open_from}, "
              f"{summary['source_noise_kept']} noisy samples of the source kept in noise.json, "
              f"in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
