"""What the first GPU run changed (docs/speed.md, 2026-12-04), pinned on CPU: fused SGD, its state across devices,
torch.compile's mode for training, compiled scoring, the label check's single host-device sync."""

import numpy as np
import pytest
import torch

from config.config import parse_config
from tests.helpers import TINY_TRAIN, make_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _models(seed=0):
    from backbones import get_model
    from losses import ShardedClassifier

    torch.manual_seed(seed)
    return get_model("smallnet", num_features=16, input_size=32), ShardedClassifier("CosFace", 16, 7)


def _steps(optimizer, backbone, head, n=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 7, (8,), generator=g)
        loss, _ = head(backbone(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_fused_sgd_is_the_same_update_as_the_loop():
    """make_sgd fuses on CUDA; fused=True also runs on CPU, so the update is compared here, step by step."""
    from utils.training.optimizer import make_sgd

    runs = {}
    for device in ("cpu", "cuda"):  # parameters stay on the CPU: only the optimizer's choice differs
        backbone, head = _models()
        opt = make_sgd(backbone, head, torch.device(device), lr=0.1, momentum=0.9, weight_decay=5e-4)
        assert opt.defaults["fused"] is (True if device == "cuda" else None)
        _steps(opt, backbone, head)
        runs[device] = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
    for loop, fused in zip(runs["cpu"], runs["cuda"]):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(runs["cpu"], _models()[0].parameters())), "nothing trained"


def test_a_checkpoint_from_a_fused_optimizer_resumes_with_the_loop_on_cpu():
    """load_state_dict copies the saving run's `fused` into the groups; keep_fused puts this device's back."""
    from utils.training.optimizer import keep_fused, make_sgd

    backbone, head = _models()
    gpu_run = make_sgd(backbone, head, torch.device("cuda"), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _steps(gpu_run, backbone, head, 1)
    state = gpu_run.state_dict()
    assert all(g["fused"] for g in state["param_groups"])
    cpu_run = make_sgd(backbone, head, torch.device("cpu"), lr=0.1, momentum=0.9, weight_decay=5e-4)
    cpu_run.load_state_dict(state)
    assert all(g["fused"] for g in cpu_run.param_groups)  # what keep_fused is for
    keep_fused(cpu_run)
    assert all(g["fused"] is None and g["foreach"] is None for g in cpu_run.param_groups)
    momentum = [cpu_run.state[p]["momentum_buffer"].clone() for p in backbone.parameters()]
    assert all(torch.equal(m, gpu_run.state[p]["momentum_buffer"]) for m, p in zip(momentum, backbone.parameters()))
    _steps(cpu_run, backbone, head, 1)


def test_compile_mode_is_checked_and_reaches_torch_compile(tiny, tmp_path, monkeypatch, capsys):
    from utils.runtime.context import Context
    from utils.training.loop import prepare_run

    with pytest.raises(SystemExit) as exit_:
        parse_config(["--rec", str(tiny), "--output", str(tmp_path), *TINY_TRAIN, "--compile_mode", "fast"])
    assert exit_.value.code == 2
    assert "compile_mode='fast' is not one of default, reduce-overhead, max-autotune-no-cudagraphs" in \
        capsys.readouterr().err
    seen = []

    def fake_compile(model, **kwargs):  # records the call; the run trains the plain module
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = parse_config(["--rec", str(tiny), "--output", str(tmp_path), *TINY_TRAIN, "--compile", "true",
                        "--compile_mode", "reduce-overhead"])
    prepare_run(cfg, Context())
    assert seen == [{"mode": "reduce-overhead"}]


def test_compiled_scoring_gives_the_same_scores(tiny, tmp_path, monkeypatch):
    """--compile true compiles the scoring forward too (graph capture with the eager backend here: the same
    operators, so the same numbers)."""
    from utils.runtime.context import Context
    from utils.data.datasets import open_dataset
    from utils.models.build import build_head, head_kwargs, new_backbone
    from utils.evaluation.scoring import score_dataset

    dataset = open_dataset(tiny)
    results = {}
    for compiled in (False, True):
        cfg = parse_config(["--rec", str(tiny), "--output", str(tmp_path), *TINY_TRAIN,
                            "--compile", str(compiled).lower()])
        ctx = Context()
        torch.manual_seed(0)
        backbone = new_backbone(cfg, 32).eval()
        head = build_head(cfg.loss, cfg.embedding_size, dataset.num_classes, ctx, head_kwargs(cfg))
        calls = []
        real = torch.compile

        def eager_compile(model, **kwargs):
            calls.append(model)
            return real(model, backend="eager", **kwargs)

        monkeypatch.setattr(torch, "compile", eager_compile)
        results[compiled] = score_dataset(cfg, ctx, backbone, head, dataset)
        monkeypatch.setattr(torch, "compile", real)
        assert calls == ([backbone] if compiled else [])
        torch._dynamo.reset()
    for key, value in results[False].items():
        np.testing.assert_array_equal(results[True][key], value, err_msg=key)


def test_label_range_check_syncs_once_and_names_the_range():
    from losses import ShardedClassifier

    head = ShardedClassifier("CosFace", 8, 5)
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return real(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "tolist", counting)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got \[-1, 6\]"):
            head(torch.randn(3, 8), torch.tensor([-1, 2, 6]))
    assert calls == [torch.Size([2])]
    loss, _ = head(torch.randn(3, 8), torch.tensor([0, 2, 4]))
    assert torch.isfinite(loss)




def test_gpu_check_goes_on_after_a_failed_section(capsys):
    """One GPU call brings back every section: a section that raises is reported with its traceback and counted,
    the next one still runs."""
    from tools.gpu_check import MODES, Check, main

    c = Check(MODES["dry-run"], dry_run=True)

    def broken():
        raise RuntimeError("a tensor left on the CPU")

    assert c.run("train", broken) is False
    assert c.run("score", lambda: 7) == 7
    assert c.run("bf16", lambda: False) is False
    out = capsys.readouterr().out
    assert "RuntimeError: a tensor left on the CPU" in out and "Traceback" in out
    assert "section train: FAILED" in out and "section score" not in out
    assert c.failed == ["train", "bf16"] and set(c.figures["seconds"]) == {"train", "score", "bf16"}
    with pytest.raises(SystemExit) as exit_:
        main(["--dry_run", "--only", "train,warp"])
    assert exit_.value.code == 2 and "--only: unknown sections ['warp']" in capsys.readouterr().err
