"""Write a synthetic face-recognition dataset in the real formats (the generator: utils/synthetic/generator.py).

    python make_synthetic_dataset.py --out data/synthetic --num_ids 500 --image_size 112 --seed 0

The folder holds train.rec/.idx/property (InsightFace layout), syn_frontal.bin and syn_pose.bin
(verification pairs of held-out identities), ijb/ (IJB-C and IJB-B release layouts), noise.json (the
injected label noise), redundancy.json (the near-duplicate shots) and dataset.json. The same seed gives
byte-identical files. `--help` lists every option with its default.
"""
import argparse
import dataclasses
import os
import sys

from utils.runtime.cli import add_bool, flag
from utils.synthetic.generator import CONFIG_HELP, SyntheticConfig, generate_dataset


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Write a synthetic face-recognition dataset in the real formats: train.rec/.idx/property "
                    "(InsightFace layout), syn_frontal.bin and syn_pose.bin (held-out pairs), ijb/ (IJB-C and IJB-B "
                    "release layout, held-out subjects), noise.json (injected label noise), redundancy.json "
                    "(near-duplicates) and dataset.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset folder to create (must be empty or absent)")
    for f in dataclasses.fields(SyntheticConfig):
        parser.add_argument(*flag(f.name), type=type(f.default), default=f.default,
                            help=CONFIG_HELP[f.name])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="rendering processes (does not change the files)")
    add_bool(parser, "overwrite", "replace a non-empty --out folder")
    add_bool(parser, "quiet", "no progress bar and no summary")
    return parser


def main(argv=None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}).validate()
    except ValueError as exc:
        parser.error(str(exc))
    try:
        summary = generate_dataset(args.out, cfg, workers=args.workers, overwrite=args.overwrite,
                                   progress=not args.quiet)
    except FileExistsError as exc:
        print(f"make_synthetic_dataset.py: error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {summary['out']}: {summary['images']} images of {summary['identities']} identities "
              f"({summary['flipped']} label flips, {summary['open_set']} open-set, {summary['near_duplicates']} "
              f"near-duplicates), verification pairs {summary['verification_pairs']}, "
              f"ijb images {summary['ijb_images']}, in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
