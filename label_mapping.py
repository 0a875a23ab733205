"""How many identities a kept list keeps, and its contiguous label map (the paper's label_mapping.py).

Reads the kept list (`--kept_index`, or the one `--coreset_method`/`--fraction` name) and the identities
of `label_dict.npz` (generate_label_dict.py; without it, the record headers), and writes the label map
(old identity label -> new contiguous label) beside the kept list, or to `--label_map`.

Every key of config/config.py can be overridden: `python label_mapping.py --KEY VALUE`; `--help` lists them.
"""
import logging
from pathlib import Path

import numpy as np

from utils.artifacts import paths
from utils import pruning
from utils.artifacts.files import load_kept_index, save_label_map
from utils.data.datasets import dataset_fingerprint, open_dataset
from utils.artifacts.records import labels_from_label_dict
from utils.runtime.stage import run_stage

log = logging.getLogger("diffprob")


def run_label_mapping(cfg, ctx=None) -> dict:
    fp = dataset_fingerprint(cfg.rec)
    label_dict = paths.label_dict_path(cfg)
    if label_dict.exists():
        labels, inputs = labels_from_label_dict(label_dict, fp), [label_dict]
    else:
        log.info("%s not found (generate_label_dict.py writes it): reading the labels from the record headers",
                 label_dict)
        labels, inputs = open_dataset(cfg.rec).all_labels, [Path(cfg.rec)]
    kept_path = paths.kept_index_path(cfg)
    kept = load_kept_index(kept_path, fp, plain=bool(cfg.kept_index))
    label_map = pruning.label_map_for(kept, labels)
    out = Path(cfg.label_map) if cfg.label_map else kept_path.with_name("label_map.json")
    save_label_map(out, label_map, "label_mapping", fp, cfg, [kept_path, *inputs])
    total = len(np.unique(labels))
    print(f"label map: {len(kept)} kept images keep {len(label_map)} of {total} identities "
          f"({total - len(label_map)} vanish) -> {out}")
    return {"identities": len(label_map), "vanished": total - len(label_map)}


if __name__ == "__main__":
    run_stage("label_mapping", run_label_mapping, description=__doc__,
              lock_dir=lambda cfg: paths.kept_index_path(cfg).parent)
