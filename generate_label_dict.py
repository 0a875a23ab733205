"""The label dictionary (the paper's generate_label_dict.py): identity -> its sample indices, read from
the record headers alone (no image is decoded). Writes `<output>/label_dict.npz` in CSR form
(`identities`, `starts`, `order`: identity i's samples are order[starts[i]:starts[i+1]]), which
label_mapping.py reads.

Every key of config/config.py can be overridden: `python generate_label_dict.py --KEY VALUE`; `--help` lists them.
"""
import time

import numpy as np

from utils.artifacts import paths
from utils import pruning
from utils.artifacts.files import save_array
from utils.data.datasets import open_dataset
from utils.runtime.stage import run_stage


def run_label_dict(cfg, ctx=None) -> dict:
    t0 = time.time()
    ds = open_dataset(cfg.rec)
    identities, starts, order = pruning.identity_index(ds.all_labels)
    out = paths.label_dict_path(cfg)
    save_array(out, {"identities": identities, "starts": starts, "order": order}, "generate_label_dict",
               ds.fingerprint, cfg, [cfg.rec], {"num_identities": int(len(identities))})
    counts = np.diff(np.append(starts, len(order)))
    seconds = time.time() - t0
    print(f"label dict: {len(order)} images, {len(identities)} identities (images per identity min {counts.min()}, "
          f"median {int(np.median(counts))}, max {counts.max()}) in {seconds:.2f} s -> {out}")
    return {"identities": int(len(identities)), "seconds": seconds}


if __name__ == "__main__":
    run_stage("generate_label_dict", run_label_dict, description=__doc__,
              lock_dir=lambda cfg: paths.label_dict_path(cfg).parent)
