"""Write the kept samples of a dataset as a new dataset folder that every stage opens with no kept list.

    python export_trainset.py --rec /data/faces_webface_112x112 \
        --kept_index output/runs/coresets/diffprob_0.50/kept_index.npy --out /data/webface_diffprob50

--kept_index: a kept list (.npy with its manifest, or the paper's `kept_index = [...]` text);
--label_map: the label map written beside it (default: the contiguous map of the surviving labels);
--relabel_file: cleaning's relabel.npz, whose samples take their suggested label before renumbering;
--overwrite true: replace an existing --out. Writes train.rec/.idx/property (InsightFace layout, payloads
copied byte for byte), origin_index.npy, export.json, noise.json (remapped, when the source has one), and
hard links (copies where refused) of the .bin files and ijb/. An image folder exports as an image folder.
Every key of config/config.py can be overridden: `python export_trainset.py --KEY VALUE`; `--help` lists them.
"""
from utils.export import add_export_args, run_export
from utils.runtime import run_stage

if __name__ == "__main__":
    run_stage("export_trainset", run_export, description=__doc__, extra_args=add_export_args)
