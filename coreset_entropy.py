"""Soft-label entropy pruning ("Data Pruning Can Do More", Yang et al.): per identity, keep the
samples whose epoch-averaged soft label is most uncertain.

This is coreset_select.py's stage for `--coreset_method entropy`: it writes coresets/entropy_<fraction>/
(kept_index.npy, label_map.json, summary.json, plot.png).

Every key of config/config.py can be overridden: `python coreset_entropy.py --KEY VALUE`; `--help` lists them.
"""
from utils.artifacts import paths
from utils.data.datasets import open_dataset
from utils.artifacts.kept_sets import write_selection
from utils.artifacts.records import open_records
from utils.runtime.stage import run_stage
from utils.selection.registry import get_method, run_selection


def run_entropy(cfg, ctx=None) -> dict:
    method = get_method("entropy")
    rec = open_records(cfg, open_dataset(cfg.rec))  # labels from the record headers alone
    selection = run_selection(method, rec, cfg)  # reads the files the method needs, then selects
    return write_selection(cfg, paths.coreset_dir(cfg, method.name), method, selection, rec)


if __name__ == "__main__":
    run_stage("coreset_entropy", run_entropy, description=__doc__, lock_dir=lambda cfg: paths.coreset_dir(cfg, "entropy"))
