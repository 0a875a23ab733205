"""An experiment folder as the tools that measure cleaning against the injected noise open it
(tools/measure_cleaning.py, tools/cleaning_curves.py): its original models, the config that reads one of them, and
the dataset's `noise.json` (the yardstick: no rule reads it).

An experiment folder is `run_pipeline.py --out DIR` (the models under DIR/runs/) or a runs folder itself; each original
model `original_<network>_<loss>/` holds the `config.json` it was trained with.
"""
from __future__ import annotations

import json
from pathlib import Path

from config.config import parse_config
from utils.artifacts.files import ArtifactError
from utils.data.noise_file import load_noise

SUBCENTER_LOSS = "SubCenterArcFace"


def runs_folder(out) -> Path:
    """The folder holding the original models: `out/runs/` where there is one, else `out`."""
    out = Path(out)
    return out / "runs" if (out / "runs").is_dir() else out


def originals(runs) -> dict:
    """{loss: training config (dict)} of the original models under `runs` (sorted by folder name; the first of a loss
    trained by several networks)."""
    found = {}
    for f in sorted(Path(runs).glob("original_*/config.json")):
        trained = json.loads(f.read_text())
        found.setdefault(trained["loss"], trained)
    return found


def pick_original(out, loss: str = None, hint: str = "") -> dict:
    """The training config of the original model of `loss` under `out` (default: the first one that is not
    SubCenterArcFace, else the first one); an ArtifactError without one."""
    runs = runs_folder(out)
    found = originals(runs)
    if not found:
        raise ArtifactError(f"no original_<network>_<loss>/config.json under {runs}: train the original model first "
                            f"(the demo profile: python run_pipeline.py --out {out} --stop_after 4){hint}")
    if loss is not None:
        if loss not in found:
            raise ArtifactError(f"no original model trained with --loss {loss} under {runs} "
                                f"(found: {', '.join(found)})")
        return found[loss]
    return next((t for name, t in found.items() if name != SUBCENTER_LOSS), next(iter(found.values())))


def base_args(runs, trained: dict) -> list:
    """The config keys that read the original model `trained` (its config.json) under `runs`."""
    return ["--rec", trained["rec"], "--output", str(runs), "--network", trained["network"],
            "--original_net_loss", trained["loss"], "--dataset", trained["dataset"]]


def open_experiment(out, loss: str = None) -> tuple:
    """(config that reads the chosen original model, its base_args, the dataset's noise.json) of `out`."""
    trained = pick_original(out, loss)
    base = base_args(runs_folder(out), trained)
    cfg = parse_config(base)
    noise = load_noise(cfg.rec)
    if noise is None:
        raise ArtifactError(f"{cfg.rec}/noise.json not found: the measurement is against injected noise")
    return cfg, base, noise
