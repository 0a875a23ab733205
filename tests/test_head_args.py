"""Every head parameter of losses.registry.HEAD_DEFAULTS: set on the command line (--s, --m, --std and
--head_args NAME=VALUE,...), checked, listed in --help, passed to the head training builds, kept in its checkpoint."""
import dataclasses

import pytest
import torch

from config.config import HEAD_KEYS, Config, build_parser, config_from_dict, parse_config, resolve
from losses import HEAD_DEFAULTS
from tests import test_config
from utils.artifacts.files import Fingerprint
from utils.models.checkpoint import save_checkpoint
from utils.runtime.context import Context
from utils.models.build import build_head, head_kwargs, load_scoring_model, model_kwargs, new_backbone

HEADS = list(HEAD_DEFAULTS)


def _other_values(name) -> dict:
    """A value other than the default for every parameter of head `name` (RobustFace's mu stays in [0, 1);
    SubCenterArcFace's k, a count, one more)."""
    values = {k: v + 1.0 if k == "k" else v * 0.5 + 0.01 * (i + 1)
              for i, (k, v) in enumerate(HEAD_DEFAULTS[name].items())}
    assert all(values[k] != v for k, v in HEAD_DEFAULTS[name].items())
    return values


def _argv(name, values) -> list:
    """--loss NAME, --s/--m/--std for those, --head_args for the others."""
    argv = ["--loss", name.lower()]  # the config resolves the spelling
    argv += [x for k in HEAD_KEYS if k in values for x in (f"--{k}", repr(values[k]))]
    rest = ",".join(f"{k}={v!r}" for k, v in values.items() if k not in HEAD_KEYS)
    return argv + (["--head_args", rest] if rest else [])


@pytest.mark.parametrize("name", HEADS)
def test_every_parameter_reaches_the_head(name):
    values = _other_values(name)
    cfg = parse_config(_argv(name, values))
    assert cfg.loss == name
    head = build_head(cfg.loss, 8, 5, Context(), head_kwargs(cfg)).head  # as training builds it (one shard)
    assert type(head).__name__ == name and head.head_args == values
    assert {k: getattr(head, k) for k in values} == values  # the heads keep each parameter under its own name


@pytest.mark.parametrize("name", HEADS)
def test_parameters_not_given_keep_the_table_values(name):
    cfg = parse_config(["--loss", name])
    assert cfg.head_args == {} and head_kwargs(cfg) == HEAD_DEFAULTS[name]


@pytest.mark.parametrize("argv, needle", [
    (["--loss", "RobustFace", "--head_args", "m1=-0.2,bogus=1"],
     "head_args bogus: not a parameter of loss=RobustFace; its head_args: m1, t, mu, phi_alpha (s, m: --s, --m)"),
    (["--loss", "CosFace", "--head_args", "t_alpha=0.1"],
     "head_args t_alpha: not a parameter of loss=CosFace; its head_args: none (s, m: --s, --m)"),
    (["--loss", "AdaFace", "--head_args", "h=abc"], "head_args h='abc': expected a finite number"),
    (["--loss", "AdaFace", "--head_args", "h=nan"], "head_args h='nan': expected a finite number"),
    (["--loss", "AdaFace", "--head_args", "h"], "--head_args: expected NAME=VALUE items"),
    (["--loss", "AdaFace", "--head_args", "h=1,h=2"], "--head_args: h is given twice"),
    (["--loss", "ElasticCosFace", "--head_args", "std=0.1"], "head_args std: give it as --std, not in head_args"),
    (["--loss", "RobustFace", "--head_args", "mu=1"], "RobustFace: mu (expected noise rate) must be in [0, 1)"),
])
def test_bad_head_args_exit_2_with_message(argv, needle, capsys):
    test_config.test_bad_values_exit_2_with_message(argv, needle, capsys)  # exit status 2, the message on stderr


def test_help_lists_every_head_parameter_and_default():
    text = " ".join(build_parser().format_help().split())
    assert "--head_args NAME=VALUE,..." in text
    for name, row in HEAD_DEFAULTS.items():
        assert f"{name}: {', '.join(f'{k}={v:g}' for k, v in row.items())}" in text


def test_config_without_head_args_still_loads():
    saved = dataclasses.asdict(parse_config(["--loss", "AdaFace"]))
    del saved["head_args"]  # a config.json of an earlier version
    cfg = resolve(config_from_dict(saved))
    assert cfg.head_args == {} and head_kwargs(cfg) == HEAD_DEFAULTS["AdaFace"]
    given = Config(loss="AdaFace", head_args={"h": 0.5})  # set in Python, not on the command line
    assert resolve(given).head_args == {"h": 0.5}


def save_model(path, cfg, classes, with_head=True):
    """An epoch checkpoint as training writes it (tiny, untrained); returns (head, fingerprint)."""
    head = build_head(cfg.loss, cfg.embedding_size, classes, Context(), head_kwargs(cfg))
    fingerprint = Fingerprint(num_images=20, num_classes=classes, idx_size=1)
    ckpt = {"backbone": new_backbone(cfg, 32).state_dict(),
            "model": {"name": cfg.network, "args": model_kwargs(cfg, 32)}, "epoch": 1,
            "fingerprint": fingerprint.to_dict(), "config": dataclasses.asdict(cfg)}
    if with_head:
        ckpt.update(head=head.full_state_dict(), head_info={"name": cfg.loss, "in_features": cfg.embedding_size,
                                                            "num_classes": classes, "kwargs": head_kwargs(cfg)})
    save_checkpoint(path, ckpt)
    return head, fingerprint


SMALL = ["--network", "smallnet", "--embedding_size", "8"]


def test_checkpoint_keeps_the_head_args(tmp_path):
    """A checkpoint written as training writes it rebuilds its head with the parameters it was trained with,
    whatever the scoring config says."""
    values = _other_values("RobustFace")
    head, fingerprint = save_model(tmp_path / "epoch_001.pt", parse_config(_argv("RobustFace", values) + SMALL), 5)
    scoring = parse_config(SMALL)  # CosFace, no head_args
    model = load_scoring_model(scoring, Context(), tmp_path / "epoch_001.pt", fingerprint, 5)
    assert model.head_name == "RobustFace" and model.head.head.head_args == values
    assert {k: getattr(model.head.head, k) for k in values} == values
    assert torch.equal(model.head.head.weight, head.head.weight)


def test_plain_head_file_takes_only_its_own_parameters(tmp_path):
    """A head .pth without a record is built as --original_net_loss with the config's values of its parameters;
    head_args of another --loss do not reach it."""
    _, fingerprint = save_model(tmp_path / "epoch_001.pt", parse_config(SMALL), 5, with_head=False)
    save_checkpoint(tmp_path / "header.pth", {"weight": torch.randn(5, 8)})
    cfg = parse_config(SMALL + ["--loss", "AdaFace", "--head_args", "h=0.5", "--original_net_loss", "CosFace",
                                "--m", "0.3", "--head_checkpoint", str(tmp_path / "header.pth")])
    model = load_scoring_model(cfg, Context(), tmp_path / "epoch_001.pt", fingerprint, 5)
    assert model.head_name == "CosFace" and model.head.head.head_args == {"s": 64.0, "m": 0.3}
