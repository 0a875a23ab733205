"""Records at scale: assemble_history streams, the readers memory-map, bad records are refused with
nothing half-written; the scale benchmark and the GPU check's dry run run end to end."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from config.config import parse_config
from tests.helpers import REPO, env
from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, Fingerprint, manifest_path, save_array
from utils.artifacts.records import load_prob_history, load_topk
from utils.training.recording import assemble_history

N, CLASSES, K, EPOCHS = 50, 7, 3, 3
FP = Fingerprint(N, CLASSES, 1234)


def _cfg(tmp_path, epochs=EPOCHS):
    return parse_config(["--output", str(tmp_path), "--num_epoch", str(epochs), "--lr_steps", str(epochs),
                         "--network", "smallnet", "--record_topk", str(K)])


def _epoch(e, n=N, k=K):
    rng = np.random.default_rng(e)
    prob = rng.random(n).astype(np.float32)
    prob[e::11] = np.nan  # not seen this epoch
    index = np.stack([rng.permutation(CLASSES)[:k] for _ in range(n)]).astype(np.int32)
    return {"gt_prob_with_margin": prob, "topk_logits": rng.normal(size=(n, k)).astype(np.float16),
            "topk_index": index, "rest_mean_logit": rng.normal(size=n).astype(np.float16)}


def _write_epochs(cfg, epochs=None, overrides=None):
    """probs/epoch_XXX.npz as Recorder.write saves them; `overrides` {epoch: arrays} replaces some."""
    out = paths.original_dir(cfg)
    overrides = overrides or {}
    arrays = {e: overrides.get(e) or _epoch(e) for e in range(1, (epochs or cfg.num_epoch) + 1)}
    for e, a in arrays.items():
        save_array(out / "probs" / f"epoch_{e:03d}.npz", a, "train_everything.record", FP, cfg, info={"epoch": e})
    return out, arrays


def test_assembled_history_equals_the_stacked_epochs_and_reads_memory_mapped(tmp_path):
    cfg = _cfg(tmp_path)
    out, arrays = _write_epochs(cfg)
    assemble_history(cfg, FP)
    history = load_prob_history(cfg, FP)
    assert isinstance(history, np.memmap) and history.dtype == np.float32 and not history.flags.writeable
    np.testing.assert_array_equal(history, np.stack([a["gt_prob_with_margin"] for a in arrays.values()]))
    topk = load_topk(cfg, FP)
    plain = dict(np.load(out / "topk_logits.npz"))  # still an ordinary .npz
    for key in ("topk_logits", "topk_index", "rest_mean_logit"):
        expected = np.stack([a[key] for a in arrays.values()])
        assert isinstance(topk[key], np.memmap) and topk[key].dtype == expected.dtype
        np.testing.assert_array_equal(topk[key], expected)
        np.testing.assert_array_equal(plain[key], expected)
    info = json.loads(manifest_path(out / "topk_logits.npz").read_text())["info"]
    assert info["k"] == K and info["shape"] == [EPOCHS, N, K] and info["sample_rate"] == 1.0
    assert not list(out.glob(".*"))  # no temporary file left


@pytest.mark.parametrize("case,match", [
    ("samples", r"epoch_002.npz: expected gt_prob_with_margin of shape \(50,\).*found \(49,\)"),
    ("topk_wider_than_classes", r"epoch_001.npz: top-8 logits recorded, but the dataset has 7 classes"),
    ("another_epoch", r"epoch_003.npz: its manifest says epoch 1, expected 3"),
    ("k_changes", r"epoch_002.npz: holds arrays"),
    ("missing_epoch", r"probability records missing for 1 epochs"),
])
def test_records_that_do_not_match_the_dataset_are_refused(tmp_path, case, match):
    cfg = _cfg(tmp_path)
    out = paths.original_dir(cfg)
    out.mkdir(parents=True)
    for name in ("prob_history.npy", "topk_logits.npz"):  # an earlier assembly
        (out / name).write_bytes(b"old")
        manifest_path(out / name).write_text("{}")
    if case == "samples":
        _write_epochs(cfg, overrides={2: _epoch(2, n=N - 1)})
    elif case == "topk_wider_than_classes":
        _write_epochs(cfg, overrides={1: {**_epoch(1), "topk_logits": np.zeros((N, 8), np.float16),
                                  "topk_index": np.zeros((N, 8), np.int32)}})
    elif case == "another_epoch":
        _write_epochs(cfg)
        save_array(out / "probs" / "epoch_003.npz", _epoch(3), "train_everything.record", FP, cfg, info={"epoch": 1})
    elif case == "k_changes":
        _write_epochs(cfg, overrides={2: _epoch(2, k=K - 1)})
    else:
        _write_epochs(cfg, epochs=EPOCHS - 1)
    with pytest.raises(ArtifactError, match=match):
        assemble_history(cfg, FP)
    for name in ("prob_history.npy", "topk_logits.npz"):  # refused before anything is touched
        assert (out / name).read_bytes() == b"old" and manifest_path(out / name).read_text() == "{}", name
    assert not list(out.glob(".*"))


def test_a_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    from utils.training import recording

    cfg = _cfg(tmp_path)
    _write_epochs(cfg)

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(recording, "_stream_npy_member", disk_full)
    with pytest.raises(ArtifactError, match="no space left on device writing .*topk_logits.npz"):
        assemble_history(cfg, FP)
    out = paths.original_dir(cfg)
    assert not (out / "topk_logits.npz").exists() and not manifest_path(out / "topk_logits.npz").exists()
    assert not list(out.glob(".*"))


def test_readers_refuse_records_of_another_shape(tmp_path):
    cfg = _cfg(tmp_path)
    save_array(paths.prob_history_path(cfg), np.zeros((3, N + 1), np.float32), "train_everything", FP)
    with pytest.raises(ArtifactError, match=r"expected shape \(epochs, 50\), found \(3, 51\)"):
        load_prob_history(cfg, FP)
    wide = {"topk_logits": np.zeros((3, N, 8), np.float16), "topk_index": np.zeros((3, N, 8), np.int32),
            "rest_mean_logit": np.zeros((3, N), np.float16)}
    save_array(paths.topk_history_path(cfg), wide, "train_everything", FP)
    with pytest.raises(ArtifactError, match="top-8 logits recorded, but the dataset has 7 classes"):
        load_topk(cfg, FP)
    save_array(paths.topk_history_path(cfg), {**wide, "rest_mean_logit": np.zeros((2, N), np.float16)},
               "train_everything", FP)
    with pytest.raises(ArtifactError, match="expected topk_logits and topk_index of shape"):
        load_topk(cfg, FP)
    save_array(paths.prob_history_path(cfg), np.zeros((2, N), np.float32), "train_everything", FP,
               info={"shape": [3, N]})  # the manifest of another assembly
    with pytest.raises(ArtifactError, match=r"holds shape \(2, 50\), its manifest says \(3, 50\)"):
        load_prob_history(cfg, FP)
    paths.topk_history_path(cfg).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArtifactError, match="truncated or not a NumPy array file"):
        load_topk(cfg, FP)


def _run(cmd, timeout):
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_bench_scale_runs_every_step_and_writes_the_contract_json(tmp_path):
    from tools.bench_scale import step_names

    _run([sys.executable, "tools/bench_scale.py", "--scale", "small", "--json", str(tmp_path / "s.json"),
          "--dir", str(tmp_path)], timeout=600)
    rows = json.loads((tmp_path / "s.json").read_text())
    assert list(rows) == step_names()  # every registered cleaning rule and selection method included
    for step, row in rows.items():
        assert row["status"] == "ok", (step, row)
        assert row["seconds"] >= 0 and 0 < row["peak_rss_gb"] < 2, (step, row)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench_scale-")]  # cleaned up


@pytest.mark.slow
def test_bench_scale_runs_only_the_asked_steps_after_the_set_up(tmp_path):
    from tools.bench_scale import FIXED_STEPS

    _run([sys.executable, "tools/bench_scale.py", "--scale", "small", "--json", str(tmp_path / "s.json"),
          "--dir", str(tmp_path), "--only", "clean:trajectory,select:entropy"], timeout=600)
    rows = json.loads((tmp_path / "s.json").read_text())
    assert list(rows) == [*FIXED_STEPS, "clean:trajectory", "select:entropy"]
    assert all(row["status"] == "ok" for row in rows.values()), rows
    r = subprocess.run([sys.executable, "tools/bench_scale.py", "--scale", "small", "--only", "select:nope"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--only: unknown steps ['select:nope']" in r.stderr, r.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_section_with_numbers(tmp_path):
    out = _run(["bash", "tools/gpu_check.sh", "--dry_run", "--json", str(tmp_path / "gpu.json")], timeout=900)
    sections = re.split(r"^== (\w+) ==$", out, flags=re.M)
    found = dict(zip(sections[1::2], sections[2::2]))
    assert list(found) == ["env", "data", "loader", "train", "score", "bf16", "torchrun", "pipeline", "summary"]
    number = r"\d+(\.\d+)? images/s"
    assert re.search(r"RecordIO loader alone \(1 workers\) .* " + number, found["loader"])
    assert len(re.findall(number, found["train"])) == 6 and "compile=True" in found["train"]
    assert "RecordIO loader" in found["train"] and "profile of 5 steps" in found["train"]
    assert len(re.findall(number, found["score"])) == 3
    assert re.search(r"relative difference \d\.\d+ \(tolerance 0.05\): agree", found["bf16"])
    assert re.search(r"exit status 0, \d+\.\d s; checkpoints \['epoch_001.pt'\]", found["torchrun"])
    assert re.search(r"exit status 0, \d+\.\d s", found["pipeline"])
    assert "target >= 8000: (not judged on CPU)" in found["summary"]
    assert "gpu_check (dry-run): ok" in out
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["failed_sections"] == [] and figures["torchrun"]["exit"] == 0
    assert figures["train_ours_compiled_end_to_end"]["images_per_s"] > 0
    assert len(figures["bf16"]["fp32"]) == len(figures["bf16"]["bf16"]) == 6
