"""Write the kept samples of a dataset as a new dataset folder that every stage opens with no kept list.

    python export_trainset.py --rec /data/faces_webface_112x112 \
        --kept_index output/runs/coresets/iresnet50_CosFace/diffprob_0.50/kept_index.npy --out /data/webface_diffprob50

--kept_index: a kept list (.npy with its manifest, a plain integer .npy as `numpy.save` writes one, checked for
dtype, range and duplicates only, or the paper's `kept_index = [...]` text);
--label_map: the label map written beside it (default: the contiguous map of the surviving labels);
--relabel_file: cleaning's relabel.npz, whose samples take their suggested label before renumbering;
--overwrite true: replace an existing --out. Writes train.rec/.idx/property (InsightFace layout, payloads
copied byte for byte), origin_index.npy, export.json, noise.json (remapped, when the source has one), and
hard links (copies where refused) of the .bin files and ijb/. An image folder exports as an image folder.
Every key of config/config.py can be overridden: `python export_trainset.py --KEY VALUE`; `--help` lists them.
"""
from utils.errors import UserError
from utils.data.export import export_dataset, format_summary
from utils.runtime.cli import add_bool
from utils.runtime.stage import run_stage


def add_export_args(parser):
    parser.add_argument("--out", default=None, help="dataset folder to create (refused if it exists, unless "
                                                    "--overwrite true)")
    add_bool(parser, "overwrite", "replace an existing --out folder")
    parser.add_argument("--relabel_file", default=None,
                        help="cleaning's relabel.npz: its samples take the suggested label before renumbering")


def run_export(cfg, ctx, args) -> dict:
    """The kept samples of --rec as the new dataset folder --out (streamed, atomic: complete or absent)."""
    if not args.out:
        raise UserError("--out DST is required: the dataset folder to create")
    if not cfg.kept_index and not args.relabel_file:
        raise UserError("--kept_index FILE is required: a kept list (.npy, with its manifest or plain, or the "
                        "paper's 'kept_index = [...]' text)")
    summary = export_dataset(cfg.rec, cfg.kept_index or None, cfg.label_map or None, args.out,
                             relabel=args.relabel_file, overwrite=args.overwrite)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    # the dataset folder is staged and renamed into place as a whole by utils/data/writer.py itself
    run_stage("export_trainset", run_export, description=__doc__, extra_args=add_export_args, all_at_once=False)
