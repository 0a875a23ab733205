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
  retrain/<scorer>/kept_<sha256:12>_<network>_<loss>/      the same on a list given by --kept_index that is not
                                  where its own selection wrote it (a list from outside, a copy, a renamed file)

<scorer> is `<network>_<loss>` of the original model whose scores made the kept list
(`--original_network`, default `--network`, and `--original_net_loss`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace



def scorer_tag(cfg) -> str:
    """`<network>_<loss>` of the original model whose scores the pruning and cleaning read (`_e<K>`: from its first K
    epochs, `score_epochs`)."""
    early = f"_e{cfg.score_epochs}" if cfg.score_epochs else ""
    return f"{cfg.original_network or cfg.network}_{cfg.original_net_loss}{early}"


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


def manifest_path(path) -> Path:
    """The manifest beside an artifact: `kept_index.npy` -> `kept_index.manifest.json`."""
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + ".manifest.json") if "." in path.name else \
        path.with_name(path.name + ".manifest.json")


def given_list_tag(cfg) -> str:
    """The retrain folder's name for a list given by `--kept_index`: the list's own, never a folder's guess.

    A kept list in the folder its own selection wrote it to (its manifest's method and fraction name that
    folder) keeps the selection's name, `<method>_<fraction>`; cleaning's list in its own folder keeps the config's
    (a cleaning round retrains as `full` inside the round's folder). Any other list (made outside the toolkit, copied,
    renamed) is named by what it holds: `kept_` and the first 12 hex digits of the sha256 of its bytes and its
    `--label_map`'s, so two lists never share a folder (nor a resumed run). An unreadable list gets a name
    from its path; loading it then says what is wrong.
    """
    kept = Path(cfg.kept_index)
    try:
        manifest = json.loads(manifest_path(kept).read_text())
        made = SimpleNamespace(**{**vars(cfg), **{k: manifest["config"][k] for k in ("coreset_method", "fraction",
                                                                                        "threshold")}})
        tag = coreset_tag(made)
        own_map = not cfg.label_map or Path(cfg.label_map) == kept.parent / "label_map.json"
        if own_map and kept.name == "kept_index.npy":
            if manifest["stage"] == "clean_trainset":  # cleaning's list in its own folder (a cleaning round's
                return coreset_tag(cfg)               # retrain: `full`, inside the round's folder, as before)
            if kept.parent.name == tag:
                return tag
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no manifest (a plain list) or not this toolkit's: named by its bytes
    digest = hashlib.sha256()
    for path in (kept, cfg.label_map):
        if path:
            try:
                digest.update(Path(path).read_bytes())
            except OSError:
                digest.update(str(path).encode())
    return "kept_" + digest.hexdigest()[:12]


def train_dir(cfg) -> Path:
    """Where train_everything.py writes this config's model."""
    if cfg.is_original_train:
        return original_dir(cfg, cfg.network, cfg.loss)
    tag = given_list_tag(cfg) if cfg.kept_index else coreset_tag(cfg)
    if cfg.dynamic_method != "none":  # pruned as it trains: not the static run on the same list
        tag += f"_{cfg.dynamic_method}{cfg.dynamic_ratio:.2f}"
    # names both the model that scored the kept list and the network + loss trained on it
    return Path(cfg.output) / "retrain" / scorer_tag(cfg) / f"{tag}_{cfg.network}_{cfg.loss}"


def ijb_root(cfg) -> Path:
    return Path(cfg.ijb_root) if cfg.ijb_root else Path(cfg.rec) / "ijb"


def bin_paths(cfg) -> dict:
    return {name: Path(cfg.rec) / f"{name}.bin" for name in (cfg.val_targets or [])}
