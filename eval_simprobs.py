"""DiffProb pruning (the paper's eval_simprobs.py).

Per identity, the images are sorted by the labelled-class probability the original model gives them
with its margin head (eval_trainset.py's scores); the most probable is kept, and walking down, an image
is kept only when the last kept probability exceeds its own by more than (1 + r) * threshold; when
fewer than --min_samples_per_id are kept, r is relaxed by 0.01 and the walk repeated. Give
--threshold, or --fraction to search the threshold that keeps that share of all images.
`--coreset_method diffprob_clean` prunes the set cleaning kept (clean_trainset.py first).

    python eval_simprobs.py --rec data/synthetic --output output --fraction 0.5

Every key of config/config.py can be overridden: `python eval_simprobs.py --KEY VALUE`; `--help` lists them.
"""
from utils.artifacts import paths
from utils.data.datasets import open_dataset
from utils.artifacts.kept_sets import write_selection
from utils.artifacts.records import open_records
from utils.runtime.stage import run_stage
from utils.selection.registry import get_method, run_selection


def run_diffprob(cfg, ctx=None) -> dict:
    method = get_method(cfg.coreset_method if cfg.coreset_method == "diffprob_clean" else "diffprob")
    rec = open_records(cfg, open_dataset(cfg.rec))  # labels from the record headers alone
    selection = run_selection(method, rec, cfg)  # at --threshold, or the threshold search for --fraction
    print(f"{method.name}: threshold {selection.info['threshold']:.6g} keeps "
          f"{len(selection.kept) / len(rec.labels):.4f} of the images"
          + ("" if cfg.threshold is not None else f" (asked {cfg.fraction:.4f})"))
    return write_selection(cfg, paths.coreset_dir(cfg, method.name), method, selection, rec)


if __name__ == "__main__":
    run_stage("eval_simprobs", run_diffprob, description=__doc__, lock_dir=lambda cfg: paths.coreset_dir(
        cfg, "diffprob_clean" if cfg.coreset_method == "diffprob_clean" else "diffprob"))
