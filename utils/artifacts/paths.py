"""Where every stage reads and writes: one function of the config (`config.config.Config`), so no stage
guesses another's paths.

<output>/
  original_<network>_<loss>/      train_everything.py, is_original_train=True
      epoch_001.pt ... last.pt backbone.pth prob_history.npy topk_logits.npz metrics.jsonl
  scores/<scorer>_<epoch tag>.npz   eval_trainset.py (per-sample probabilities and predictions)
  label_dict.npz                  generate_label_dict.py
  clean/<scorer>/kept_index.npy label_map.json flagged.npy [relabel.npz]   clean_trainset.py
  coresets/<scorer>/<method>_<fraction>/kept_index.npy label_map.json plot.png ranking.npy ranking.csv
                                  eval_simprobs.py, coreset_*.py
  retrain/<scorer>/<method>_<fraction>_<network>_<loss>/   train_everything.py, is_original_train=False

<scorer> is `<network>_<loss>` of the original model whose scores made the kept list
(`--original_network`, default `--network`, and `--original_net_loss`).
"""
from __future__ import annotations

from pathlib import Path


def scorer_tag(cfg) -> str:
    """`<network>_<loss>` of the original model whose scores the pruning and cleaning read."""
    return f"{cfg.original_network or cfg.network}_{cfg.original_net_loss}"


def original_dir(cfg, network: str = None, loss: str = None) -> Path:
    """The original model's folder: the scorer's (default), or that of `network` + `loss` (training it)."""
    return Path(cfg.output) / f"original_{network or cfg.original_network or cfg.network}_{loss or cfg.original_net_loss}"


def epoch_checkpoint(model_dir, epoch: int) -> Path:
    return Path(model_dir) / f"epoch_{epoch:03d}.pt"


def scores_path(cfg) -> Path:
    tag = "all_epochs" if cfg.use_all_epochs else ("last" if cfg.eval_epoch < 0 else f"epoch{cfg.eval_epoch:03d}")
    return Path(cfg.output) / "scores" / f"{scorer_tag(cfg)}_{tag}.npz"


def prob_history_path(cfg) -> Path:
    return original_dir(cfg) / "prob_history.npy"


def topk_history_path(cfg) -> Path:
    return original_dir(cfg) / "topk_logits.npz"


def label_dict_path(cfg) -> Path:
    return Path(cfg.output) / "label_dict.npz"


def clean_dir(cfg) -> Path:
    return Path(cfg.output) / "clean" / scorer_tag(cfg)


def coreset_tag(cfg, method: str = None) -> str:
    """`<method>_<fraction>`, or `<method>_t<threshold>` for a selection set by a threshold (DiffProb's)."""
    method = method or cfg.coreset_method
    if method in ("full", "relabel"):
        return method
    if cfg.threshold is not None:
        return f"{method}_t{cfg.threshold:g}"
    return f"{method}_{cfg.fraction:.2f}"


def coreset_dir(cfg, method: str = None) -> Path:
    """`coresets/<scorer network>_<scorer loss>/<method>_<fraction>/`: the model that made the scores is part of it."""
    return Path(cfg.output) / "coresets" / scorer_tag(cfg) / coreset_tag(cfg, method)


def legacy_coreset_dir(cfg, method: str = None) -> Path:
    """Where versions before 2026-12 wrote a kept list (`coresets/<method>_<fraction>/`, no scorer)."""
    return Path(cfg.output) / "coresets" / coreset_tag(cfg, method)


def kept_index_path(cfg, method: str = None) -> Path:
    if cfg.kept_index and method is None:
        return Path(cfg.kept_index)
    return coreset_dir(cfg, method) / "kept_index.npy"


def label_map_path(cfg, method: str = None) -> Path:
    if cfg.label_map and method is None:
        return Path(cfg.label_map)
    return coreset_dir(cfg, method) / "label_map.json"


def train_dir(cfg) -> Path:
    """Where train_everything.py writes this config's model."""
    if cfg.is_original_train:
        return original_dir(cfg, cfg.network, cfg.loss)
    # names both the model that scored the kept list and the network + loss trained on it
    return Path(cfg.output) / "retrain" / scorer_tag(cfg) / f"{coreset_tag(cfg)}_{cfg.network}_{cfg.loss}"


def ijb_root(cfg) -> Path:
    return Path(cfg.ijb_root) if cfg.ijb_root else Path(cfg.rec) / "ijb"


def bin_paths(cfg) -> dict:
    return {name: Path(cfg.rec) / f"{name}.bin" for name in (cfg.val_targets or [])}
