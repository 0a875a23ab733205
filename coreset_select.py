"""Select a kept set with any method of the registry (utils/selection/registry.py), and write it.

    python coreset_select.py --coreset_method dynunc --fraction 0.5 --rec data/synthetic --output output

The stage reads the dataset's labels from the record headers and the files the method needs (scores,
per-epoch histories, cleaning's kept list), selects, and writes `coresets/<method>_<fraction>/`:
kept_index.npy (+ manifest), label_map.json, summary.json and plot.png. The paper's scripts
(`eval_simprobs.py`, `coreset_dynunc.py`, `coreset_rand.py`) run this stage for their method.

Methods (`--coreset_method`; `--help` lists every config key):
{methods}
"""
from utils.artifacts import paths
from utils.data.datasets import open_dataset
from utils.artifacts.kept_sets import write_selection
from utils.artifacts.records import open_records
from utils.runtime.stage import run_stage
from utils.selection.registry import get_method, list_methods, run_selection

__doc__ = __doc__.format(methods="\n".join(f"  {m:16s} {get_method(m).summary}" for m in list_methods()))


def select(cfg, ctx=None, method_name: str = None) -> dict:
    method = get_method(method_name or cfg.coreset_method)
    rec = open_records(cfg, open_dataset(cfg.rec))  # labels from the record headers alone
    selection = run_selection(method, rec, cfg)  # reads the files the method needs, then selects
    return write_selection(cfg, paths.coreset_dir(cfg, method.name), method, selection, rec)


def stage_for(method_name: str):
    """`select` for one method: what the paper's per-method scripts (coreset_rand.py, ...) run."""
    def run(cfg, ctx=None) -> dict:
        return select(cfg, ctx, method_name)
    return run


def main(stage: str = "coreset_select", method_name: str = None, description: str = __doc__):
    """Run the stage; `method_name` fixes the method (the paper's per-method scripts)."""
    if method_name is None:
        run_stage(stage, select, description=description, lock_dir=paths.coreset_dir)
    else:
        run_stage(stage, stage_for(method_name), description=description,
                  lock_dir=lambda cfg: paths.coreset_dir(cfg, method_name))


if __name__ == "__main__":
    main()
