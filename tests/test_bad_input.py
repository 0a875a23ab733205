"""Fault injection (issue 11): every stage script, run as a user runs it, on a table of bad inputs.

Each case copies an output folder that holds valid earlier outputs, plants one fault (a truncated,
foreign, empty, wrongly shaped or typed file, NaN where none may be, a file of another dataset, a
crafted pickle), runs the stage as a subprocess and checks what a user relies on: a non-zero exit,
exactly one line on stderr (as a terminal shows it: progress bars cleared) that names the offending file,
no traceback, no code of a crafted file run, no temporary file left, and the output folder byte for byte as
it was. A full disk, a killed writer and
two runs on one folder are checked after the table.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

from config.config import parse_config
from tests.helpers import (REPO, TINY_TRAIN, as_a_terminal_shows, env, make_tiny_dataset, run_as_user, run_script,
                           zero_image_of)
from utils.artifacts import paths
from utils.artifacts.files import (Fingerprint, is_complete, manifest_path, read_array, read_json,
                             save_array)
from utils.models.checkpoint import load_checkpoint, save_checkpoint
from utils.data.datasets import PaddedDistributedSampler, open_dataset
from utils.artifacts.locking import ENV_TOKENS, LOCK_NAME, OutputLock
from utils.models.build import new_backbone
from utils.data.recordio import read_layout

# Every stage gets the same keys, so each finds the files the others wrote (utils/artifacts/paths.py).
# `--val_targets ""`: training evaluates no .bin (the verification cases name theirs).
STAGE_KEYS = [*TINY_TRAIN, "--window", "3", "--val_targets", ""]
N = 448  # images of the tiny dataset
PNG = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
TRAIN_LOGS = {"training.log", "config.json", "metrics.jsonl"}  # a training run's log of itself, not its outputs


class RunsCode:
    """A pickle payload that creates `marker` through a shell if it is ever unpickled without restriction."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """An output folder as the earlier stages leave it (scores, per-epoch records, cleaning, the label
    dictionary, kept sets of Rand, DiffProb, DynUnc and entropy) and a model as a user brings it (a plain
    backbone.pth and header.pth, beside the folder)."""
    import clean_trainset
    import coreset_dynunc
    import coreset_entropy
    import coreset_rand
    import eval_simprobs
    import generate_label_dict
    import label_mapping

    out = tmp_path_factory.mktemp("base") / "out"
    cfg = parse_config(["--rec", str(tiny), "--output", str(out), *STAGE_KEYS])
    ds = open_dataset(tiny)
    fp, labels, n = ds.fingerprint, ds.all_labels, ds.num_images
    assert n == N, "the cases below are written for the tiny dataset's size"
    rng = np.random.default_rng(0)
    prob = rng.random(n).astype(np.float32)
    pred = np.where(rng.random(n) < 0.1, (labels + 1) % fp.num_classes, labels)
    save_array(paths.scores_path(cfg), {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred,
                                        "pred_prob": prob, "label": labels}, "eval_trainset", fp, cfg)
    save_array(paths.prob_history_path(cfg), rng.random((4, n)).astype(np.float32), "train_everything", fp, cfg)
    save_array(paths.topk_history_path(cfg), {
        "topk_logits": rng.normal(size=(3, n, 4)).astype(np.float16),
        "topk_index": np.stack([rng.permutation(fp.num_classes)[:4] for _ in range(3 * n)]).reshape(3, n, 4),
        "rest_mean_logit": np.zeros((3, n), np.float16)}, "train_everything", fp, cfg)
    # the stages of the table, on these files as they are: what a case breaks worked before it
    clean_trainset.run_clean(cfg)
    coreset_rand.run_rand(cfg)
    generate_label_dict.run_label_dict(cfg)
    label_mapping.run_label_mapping(parse_config(["--rec", str(tiny), "--output", str(out), *STAGE_KEYS,
                                                  "--coreset_method", "rand"]))
    for select in (eval_simprobs.run_diffprob, coreset_dynunc.run_dynunc, coreset_entropy.run_entropy):
        select(cfg)
    models = out.parent / "models"
    save_checkpoint(models / "backbone.pth", new_backbone(cfg, 32).state_dict())
    save_checkpoint(models / "header.pth", {"weight": torch.randn(fp.num_classes, cfg.embedding_size)})
    return out


@dataclass
class Work:
    """One case's copy of the output folder and what a fault needs to know about the dataset."""
    rec: Path
    out: Path
    tmp: Path  # for bad files a user passes by path
    models: Path
    fp: Fingerprint
    cfg: object

    def keys(self, *extra) -> list:
        return ["--rec", self.rec, "--output", self.out, *STAGE_KEYS, *extra]

    @property
    def marker(self) -> Path:
        """Created if a crafted pickle's code ever runs."""
        return self.tmp / "code-ran"


@pytest.fixture
def work(tiny, base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base, out)
    cfg = parse_config(["--rec", str(tiny), "--output", str(out), *STAGE_KEYS])
    return Work(tiny, out, tmp_path, base.parent / "models", open_dataset(tiny).fingerprint, cfg)


# ------------------------------------------------------------------------------------- kinds of fault
def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def foreign(path: Path, content=PNG) -> Path:
    """Another kind of file under this name (a PNG renamed .npz, a JSON where an .npy is expected, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def empty(path: Path) -> Path:
    return foreign(path, b"")


def crafted(path: Path, w: Work, wrap=lambda payload: payload) -> Path:
    """A pickle (torch.save's zip for a checkpoint) that would run a shell command if loaded without restriction."""
    payload = wrap(RunsCode(w.marker))
    if path.suffix in (".pt", ".pth"):
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def changed(path: Path, w: Work, **arrays) -> Path:
    """The same artifact (manifest and all) with some arrays replaced, as a buggy or foreign writer might."""
    data = arrays["array"] if "array" in arrays else {**read_array(path), **arrays}
    save_array(path, data, "eval_trainset", w.fp)
    return path


def of_another_dataset(path: Path) -> Path:
    """The artifact as it is, but its manifest says another dataset made it."""
    mpath = manifest_path(path)
    manifest = read_json(mpath)
    manifest["fingerprint"]["num_classes"] += 1
    mpath.write_text(json.dumps(manifest))
    return path


def copy_model(w: Work, name: str) -> Path:
    return Path(shutil.copy(w.models / name, w.tmp / name))


def scores(w: Work) -> Path:
    return paths.scores_path(w.cfg)


def rand_set(w: Work) -> Path:
    return paths.coreset_dir(w.cfg, "rand")


def kept_list(w: Work, kept, name="kept_index.npy", fp=None) -> Path:
    """A kept list written as pruning writes one (manifest and all), without the writer's checks."""
    path = w.tmp / name
    save_array(path, np.asarray(kept), "coreset_rand", fp or w.fp)
    return path


# --------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    script: str
    plant: Callable  # (Work) -> (extra arguments, the offending file the line must name)
    expect: str = ""  # what the line must also say (what was expected, found, or how to go on)


def checkpoint_case(fault, expect, head=True):
    """eval_trainset.py scoring a plain backbone.pth (with the user's header.pth) that `fault` damages."""
    def plant(w):
        bad = fault(copy_model(w, "backbone.pth"), w)
        return ["--checkpoint", bad, *(["--head_checkpoint", w.models / "header.pth"] if head else [])], bad
    return Case("eval_trainset.py", plant, expect)


def head_case(fault, expect):
    def plant(w):
        bad = fault(copy_model(w, "header.pth"), w)
        return ["--checkpoint", w.models / "backbone.pth", "--head_checkpoint", bad], bad
    return Case("eval_trainset.py", plant, expect)


def artifact_case(script, where, fault, expect, *extra):
    """`script` reading the artifact `where(w)` of the output folder after `fault` damaged it."""
    def plant(w):
        return list(extra), fault(where(w), w)
    return Case(script, plant, expect)


def kept_case(script, make, expect, *extra):
    """`script` given `--kept_index` made by `make(w)`."""
    def plant(w):
        bad = make(w)
        return ["--kept_index", bad, *extra], bad
    return Case(script, plant, expect)


def bin_case(fault, expect):
    """eval_verification.py on a .bin verification set that `fault` makes."""
    def plant(w):
        rec = w.tmp / "rec"
        shutil.copytree(w.rec, rec, ignore=shutil.ignore_patterns("ijb"))
        w.rec = rec
        bad = fault(rec / "syn_frontal.bin", w)
        return ["--val_targets", "syn_frontal", "--models", f"m={w.models / 'backbone.pth'}",
                "--out", w.out / "eval"], bad
    return Case("eval_verification.py", plant, expect)


def model_case(script, fault, expect, *extra):
    """An evaluation command given `--models m=<a backbone.pth that fault damages>`."""
    def plant(w):
        bad = fault(copy_model(w, "backbone.pth"), w)
        return ["--models", f"m={bad}", "--out", w.out / "eval", *extra], bad
    return Case(script, plant, expect)


def ijb_case(fault, expect):
    """eval_ijbc.py on an IJB release folder whose 1:1 pair list `fault` damages."""
    def plant(w):
        root = Path(shutil.copytree(w.rec / "ijb", w.tmp / "ijb"))
        bad = fault(root / "meta" / "ijbc_template_pair_label.txt", w)
        return ["--ijb_root", root, "--models", f"m={w.models / 'backbone.pth'}", "--out", w.out / "eval"], bad
    return Case("eval_ijbc.py", plant, expect)


def _score_a_bad_image(w: Work):
    w.rec = _copy_rec(w)
    key = zero_image_of(w.rec, 0)
    return ["--checkpoint", w.models / "backbone.pth", "--head_checkpoint", w.models / "header.pth"], \
        f"{w.rec / 'train.rec'}: record key {key}"


def _write_text(text):
    return lambda path, w: foreign(path, text)


NOT_CHECKPOINT = "not a readable torch checkpoint"
NOT_NUMPY = "truncated or not a NumPy"
OTHER_DATASET = "was made from another dataset"
RETRAIN = ("--is_original_train", "false")


def _few_pairs(path):
    """A well-formed .bin of 4 pairs: fewer than the protocol's 10 folds (the stage crashed in the fold split)."""
    bins, issame = pickle.loads(path.read_bytes(), encoding="bytes")
    path.write_bytes(pickle.dumps((bins[:8], issame[:4])))
    return path


def _relabel_out_of_range(w):
    """A relabel.npz naming a sample the dataset does not have (retraining crashed with an IndexError)."""
    path = paths.clean_dir(w.cfg) / "relabel.npz"
    index = np.array([0, N + 5], dtype=np.int64)
    save_array(path, {"index": index, "label": np.zeros(2, dtype=np.int64),
                      "suggested_label": np.ones(2, dtype=np.int64)}, "clean_trainset", w.fp)
    return [*RETRAIN, "--coreset_method", "relabel"], path

RETRAIN_RAND = (*RETRAIN, "--coreset_method", "rand")

CASES = {
    # eval_trainset: the checkpoint and the head a user brings
    "eval_trainset/checkpoint-truncated": checkpoint_case(lambda p, w: truncated(p), NOT_CHECKPOINT),
    "eval_trainset/checkpoint-empty": checkpoint_case(lambda p, w: empty(p), r"not a torch checkpoint \(an empty file\)"),
    "eval_trainset/checkpoint-png": checkpoint_case(lambda p, w: foreign(p), r"not a torch checkpoint \(content starting b'\\x89PNG'\)"),
    "eval_trainset/checkpoint-crafted-pickle": checkpoint_case(crafted, "refused to load: the file asks for posix.system"),
    "eval_trainset/checkpoint-other-network": checkpoint_case(
        lambda p, w: (save_checkpoint(p, {"conv1.weight": torch.zeros(3)}), p)[1], "do not fit smallnet .*missing keys"),
    "eval_trainset/checkpoint-without-head": checkpoint_case(lambda p, w: p, "holds no head", head=False),
    "eval_trainset/head-truncated": head_case(lambda p, w: truncated(p), NOT_CHECKPOINT),
    "eval_trainset/head-json": head_case(_write_text('{"weight": [1, 2]}'), "not a torch checkpoint"),
    "eval_trainset/head-crafted-pickle": head_case(crafted, "refused to load"),
    "eval_trainset/head-not-a-head": head_case(
        lambda p, w: (save_checkpoint(p, {"bias": torch.zeros(3)}), p)[1], "expected a head state dict"),
    "eval_trainset/head-wrong-classes": head_case(
        lambda p, w: (save_checkpoint(p, {"weight": torch.zeros(5, 64)}), p)[1], r"weight is \(5, 64\), expected \(16, 64\)"),
    "eval_trainset/head-extra-state": head_case(
        lambda p, w: (save_checkpoint(p, {"weight": torch.zeros(16, 64), "step": 3}), p)[1], "unexpected keys 1"),
    "eval_trainset/undecodable-image": Case("eval_trainset.py", lambda w: _score_a_bad_image(w),
                                            r"\(sample 0\) is not an image OpenCV can decode"),
    # clean_trainset / eval_simprobs: the scores of eval_trainset
    "clean_trainset/scores-truncated": artifact_case("clean_trainset.py", scores, lambda p, w: truncated(p), NOT_NUMPY),
    "clean_trainset/scores-empty": artifact_case("clean_trainset.py", scores, lambda p, w: empty(p), "refused: an empty file"),
    "clean_trainset/scores-png": artifact_case("clean_trainset.py", scores, lambda p, w: foreign(p), "refused"),
    "clean_trainset/scores-pickle": artifact_case("clean_trainset.py", scores, crafted, "refused: a pickle"),
    "clean_trainset/scores-other-dataset": artifact_case("clean_trainset.py", scores, lambda p, w: of_another_dataset(p),
                                                         OTHER_DATASET),
    "clean_trainset/scores-missing-array": artifact_case(
        "clean_trainset.py", scores, lambda p, w: (save_array(p, {"gt_prob": np.zeros(N)}, "x", w.fp), p)[1],
        "missing arrays"),
    "clean_trainset/scores-pred-float": artifact_case(
        "clean_trainset.py", scores, lambda p, w: changed(p, w, pred=np.full(N, 0.5)), "pred"),
    "eval_simprobs/scores-nan": artifact_case(
        "eval_simprobs.py", scores, lambda p, w: changed(p, w, gt_prob_with_margin=np.r_[np.nan, np.ones(N - 1)]),
        "NaN"),
    "eval_simprobs/scores-short": artifact_case(
        "eval_simprobs.py", scores, lambda p, w: changed(p, w, gt_prob_with_margin=np.ones(N - 1)), str(N - 1)),
    "eval_simprobs/scores-text-dtype": artifact_case(
        "eval_simprobs.py", scores, lambda p, w: changed(p, w, gt_prob_with_margin=np.full(N, "0.5")),
        "gt_prob_with_margin"),
    "eval_simprobs/scores-2d": artifact_case(
        "eval_simprobs.py", scores, lambda p, w: changed(p, w, gt_prob_with_margin=np.ones((N, 2))),
        "gt_prob_with_margin"),
    "eval_simprobs/clean-kept-nan": artifact_case(
        "eval_simprobs.py", lambda w: paths.clean_dir(w.cfg) / "kept_index.npy",
        lambda p, w: changed(p, w, array=np.array([0.0, np.nan])), "NaN", "--coreset_method", "diffprob_clean"),
    # coreset_dynunc / coreset_entropy: the per-epoch records of the original training
    "coreset_dynunc/history-truncated": artifact_case("coreset_dynunc.py", lambda w: paths.prob_history_path(w.cfg),
                                                      lambda p, w: truncated(p), NOT_NUMPY),
    "coreset_dynunc/history-empty": artifact_case("coreset_dynunc.py", lambda w: paths.prob_history_path(w.cfg),
                                                  lambda p, w: empty(p), "refused"),
    "coreset_dynunc/history-json": artifact_case("coreset_dynunc.py", lambda w: paths.prob_history_path(w.cfg),
                                                 _write_text('{"history": []}'), "refused"),
    "coreset_dynunc/history-1d": artifact_case("coreset_dynunc.py", lambda w: paths.prob_history_path(w.cfg),
                                               lambda p, w: changed(p, w, array=np.ones(N)), "expected shape"),
    "coreset_dynunc/history-text-dtype": artifact_case("coreset_dynunc.py", lambda w: paths.prob_history_path(w.cfg),
                                                       lambda p, w: changed(p, w, array=np.full((4, N), "x")),
                                                       "prob_history"),
    "coreset_dynunc/history-other-dataset": artifact_case("coreset_dynunc.py", lambda w: paths.prob_history_path(w.cfg),
                                                          lambda p, w: of_another_dataset(p), OTHER_DATASET),
    "coreset_entropy/topk-truncated": artifact_case("coreset_entropy.py", lambda w: paths.topk_history_path(w.cfg),
                                                    lambda p, w: truncated(p), NOT_NUMPY),
    "coreset_entropy/topk-empty": artifact_case("coreset_entropy.py", lambda w: paths.topk_history_path(w.cfg),
                                                lambda p, w: empty(p), "refused"),
    "coreset_entropy/topk-npy": artifact_case("coreset_entropy.py", lambda w: paths.topk_history_path(w.cfg),
                                              lambda p, w: changed(p, w, array=np.ones(N)), "topk"),
    "coreset_entropy/topk-2d": artifact_case(
        "coreset_entropy.py", lambda w: paths.topk_history_path(w.cfg),
        lambda p, w: changed(p, w, topk_logits=np.ones((3, N), np.float16)), "topk_logits"),
    "coreset_entropy/topk-class-out-of-range": artifact_case(
        "coreset_entropy.py", lambda w: paths.topk_history_path(w.cfg),
        lambda p, w: changed(p, w, topk_index=np.full((3, N, 4), 99, np.int32)), "topk_index"),
    # label_mapping / retraining: a kept list or label map
    "label_mapping/kept-text-garbage": kept_case("label_mapping.py", lambda w: foreign(
        w.tmp / "kept.txt", "kept_index = [1, 2, three]"), "'three' is not a sample index"),
    "label_mapping/kept-text-nan": kept_case("label_mapping.py", lambda w: foreign(
        w.tmp / "kept.txt", "kept_index = [1, nan]"), "'nan' is not a sample index"),
    "label_mapping/kept-nan": kept_case("label_mapping.py", lambda w: kept_list(w, np.array([1.0, np.nan])), "NaN"),
    "label_mapping/kept-out-of-range": kept_case("label_mapping.py", lambda w: kept_list(w, np.array([1, N])),
                                                 rf"must be in \[0, {N}\)"),
    "label_mapping/kept-empty-list": kept_case("label_mapping.py", lambda w: kept_list(w, np.zeros(0, np.int64)),
                                               "empty"),
    "label_mapping/kept-other-dataset": kept_case(
        "label_mapping.py", lambda w: kept_list(w, np.arange(10), fp=Fingerprint(N, 17, w.fp.idx_size)),
        OTHER_DATASET),
    "label_mapping/kept-json": kept_case("label_mapping.py", lambda w: foreign(w.tmp / "kept.json", "[1, 2]"),
                                         "expected the text form"),
    "label_mapping/label-dict-truncated": artifact_case("label_mapping.py", lambda w: paths.label_dict_path(w.cfg),
                                                        lambda p, w: truncated(p), NOT_NUMPY, *RETRAIN_RAND),
    "train_everything/kept-text-garbage": kept_case("train_everything.py", lambda w: foreign(
        w.tmp / "kept.txt", "kept_index = [1, 2, x]"), "'x' is not a sample index", *RETRAIN),
    "train_everything/kept-out-of-range": kept_case("train_everything.py", lambda w: kept_list(w, np.array([-1, 3])),
                                                    rf"must be in \[0, {N}\)", *RETRAIN),
    "train_everything/kept-other-dataset": artifact_case("train_everything.py", lambda w: rand_set(w) / "kept_index.npy",
                                                         lambda p, w: of_another_dataset(p), OTHER_DATASET,
                                                         *RETRAIN_RAND),
    "train_everything/label-map-truncated": artifact_case("train_everything.py", lambda w: rand_set(w) / "label_map.json",
                                                          lambda p, w: truncated(p), "malformed JSON", *RETRAIN_RAND),
    "train_everything/label-map-png": artifact_case("train_everything.py", lambda w: rand_set(w) / "label_map.json",
                                                    lambda p, w: foreign(p), "malformed JSON", *RETRAIN_RAND),
    "train_everything/label-map-not-contiguous": artifact_case(
        "train_everything.py", lambda w: rand_set(w) / "label_map.json",
        _write_text('{"map": {"0": 0, "1": 5}}'), "not contiguous", *RETRAIN_RAND),
    "train_everything/relabel-index-out-of-range": Case("train_everything.py", lambda w: _relabel_out_of_range(w),
                                                         rf"'index' must hold distinct sample indices in \[0, {N}\)"),
    # eval_verification: the .bin verification sets
    "eval_verification/bin-truncated": bin_case(lambda p, w: truncated(p), "not a readable pickle"),
    "eval_verification/bin-empty": bin_case(lambda p, w: empty(p), "not a readable pickle"),
    "eval_verification/bin-png": bin_case(lambda p, w: foreign(p), "not a readable pickle"),
    "eval_verification/bin-crafted-pickle": bin_case(
        lambda p, w: crafted(p, w, lambda payload: ([PNG, payload], [True])), "refused to load"),
    "eval_verification/bin-not-images": bin_case(
        lambda p, w: foreign(p, pickle.dumps(([b"not an image", PNG], [True]))), "image 0 could not be decoded"),
    "eval_verification/bin-fewer-pairs-than-folds": bin_case(lambda p, w: _few_pairs(p), "fewer than the 10 folds"),
    "eval_verification/model-truncated": model_case("eval_verification.py", lambda p, w: truncated(p), NOT_CHECKPOINT,
                                                    "--val_targets", "syn_frontal"),
    # eval_ijbc: the model and the release's meta files
    "eval_ijbc/model-crafted-pickle": model_case("eval_ijbc.py", crafted, "refused to load"),
    "eval_ijbc/pairs-garbage": ijb_case(_write_text("1 2 x\n"), "line 1"),
    "eval_ijbc/pairs-empty": ijb_case(lambda p, w: empty(p), "no data lines"),
    # coreset_select: any registered method
    "coreset_select/topk-truncated": artifact_case("coreset_select.py", lambda w: paths.topk_history_path(w.cfg),
                                                   lambda p, w: truncated(p), NOT_NUMPY, "--coreset_method", "entropy"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_ends_in_one_line_naming_the_file(work, name):
    case = CASES[name]
    args, bad = case.plant(work)
    before = _files(work.out)
    r = run_as_user(case.script, *work.keys(*args))
    line = _one_line(r, Path(bad).name, case.expect)
    assert line.startswith(f"{Path(case.script).stem}: error: ")
    assert not work.marker.exists(), "the crafted file's code ran"
    _assert_unchanged(work.out, before)


def _files(folder: Path) -> dict:
    """relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(r, naming: str, expect: str = "") -> str:
    """The command failed with exactly one line on stderr (as a terminal shows it), naming `naming` and matching
    the regular expression `expect`."""
    assert r.returncode == 1, f"exit {r.returncode}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = as_a_terminal_shows(r.stderr)
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{r.stderr[-3000:]!r}"
    assert naming in lines[0], lines[0]
    assert re.search(expect, lines[0]), lines[0]
    return lines[0]


def _assert_unchanged(folder: Path, before: dict, allowed=frozenset()):
    after = {k: v for k, v in _files(folder).items() if Path(k).name not in allowed}
    temporary = [k for k in after if ".tmp" in Path(k).name and k not in before]
    assert not temporary, f"temporary files left: {temporary}"
    assert after == before, (f"output folder changed: new {sorted(set(after) - set(before))}, gone "
                             f"{sorted(set(before) - set(after))}, rewritten "
                             f"{sorted(k for k in set(after) & set(before) if after[k] != before[k])}")


# ------------------------------------------------------------------------------- the training images
def _copy_rec(w: Work) -> Path:
    rec = w.tmp / "rec"
    shutil.copytree(w.rec, rec, ignore=shutil.ignore_patterns("ijb", "*.bin"))
    return rec


def test_undecodable_training_image_names_record_key_and_sample(work):
    first = int(PaddedDistributedSampler(N, seed=0).order()[0])  # the first image training decodes
    work.rec = _copy_rec(work)
    key = zero_image_of(work.rec, first)
    before = _files(work.out)
    r = run_as_user("train_everything.py", *work.keys())
    _one_line(r, f"{work.rec / 'train.rec'}: record key {key} (sample {first}) is not an image OpenCV can decode",
              "--skip_bad_images true")
    _assert_unchanged(work.out, before, allowed=TRAIN_LOGS)


def test_a_property_stating_the_wrong_size_names_the_first_record(work):
    first = int(PaddedDistributedSampler(N, seed=0).order()[0])
    work.rec = _copy_rec(work)
    classes = (work.rec / "property").read_text().split(",")[0]
    (work.rec / "property").write_text(f"{classes},48,48\n")  # the images are 32x32
    key = int(read_layout(work.rec).image_keys[first])
    before = _files(work.out)
    r = run_as_user("train_everything.py", *work.keys())
    _one_line(r, f"{work.rec / 'train.rec'}: record key {key} (sample {first}) is a 32x32x3 image where its property "
                 f"file says 48x48x3", "--skip_bad_images true")
    _assert_unchanged(work.out, before, allowed=TRAIN_LOGS)


@pytest.mark.parametrize("script", ["train_everything.py", "eval_trainset.py", "clean_trainset.py",
                                    "eval_simprobs.py", "coreset_rand.py", "generate_label_dict.py",
                                    "label_mapping.py"])
@pytest.mark.parametrize("folder", ["empty", "no-idx"])
def test_rec_folder_without_a_dataset(work, script, folder):
    work.rec = work.tmp / "rec"
    work.rec.mkdir()
    missing = "train.rec" if folder == "empty" else "train.idx"
    if folder == "no-idx":
        shutil.copy(work.cfg.rec + "/train.rec", work.rec)
    before = _files(work.out)
    r = run_as_user(script, *work.keys(*(RETRAIN_RAND if script == "label_mapping.py" else ())))
    _one_line(r, str(work.rec / missing))
    _assert_unchanged(work.out, before)


def test_config_that_cannot_work_is_refused_before_work_starts(work):
    out = work.tmp / "fresh"
    r = run_as_user("train_everything.py", "--rec", work.rec, "--output", out, *STAGE_KEYS, "--record_topk", "1000")
    _one_line(r, "record_topk=1000", "exceeds the dataset's 16 identities")
    assert not out.exists()  # not even the folders its lock made


# -------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def in_process(monkeypatch):
    """Run a stage script in this process, as `python script ...` would (the logger it sets up is put back)."""
    import logging

    logger = logging.getLogger("diffprob")
    saved = logger.handlers[:], logger.propagate, logger.level

    def run(script, *args) -> int:
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as e:
            return e.code
        return 0

    yield run
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


def _dirs(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_dir()}


@pytest.mark.parametrize("script, extra", [("clean_trainset.py", ["--relabel", "true"]),
                                           ("coreset_rand.py", ["--fraction", "0.3"]),
                                           ("generate_label_dict.py", [])])
def test_a_full_disk_at_any_write_leaves_every_previous_output_whole(work, in_process, monkeypatch, capsys, script,
                                                                     extra):
    """A multi-file stage is all-or-nothing: the disk fills at its 1st, 2nd, ... last write, and each time the output
    folder is exactly as before (a new flagged.npy never stands beside an old kept list), no temporary file or new
    folder stays, and the stage says so in one line. Then it runs whole."""
    from utils.artifacts import files

    real = files._make_parents
    writes = []

    def counting(folder):
        writes.append(folder)
        return real(folder)

    monkeypatch.setattr(files, "_make_parents", counting)
    dry = work.tmp / "dry"
    shutil.copytree(work.out, dry)
    keys = work.keys(*extra)
    keys[keys.index("--output") + 1] = dry
    assert in_process(script, *keys) == 0, capsys.readouterr().err
    total = len(writes)
    assert total >= 2, total  # a multi-file stage (an artifact and its manifest at least)
    capsys.readouterr()
    before, folders = _files(work.out), _dirs(work.out)
    for nth in range(1, total + 1):
        writes.clear()

        def full_at_nth(folder, nth=nth):
            writes.append(folder)
            if len(writes) == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(folder)

        monkeypatch.setattr(files, "_make_parents", full_at_nth)
        code = in_process(script, *work.keys(*extra))
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "no space left on device writing" in err, (nth, err)
        _assert_unchanged(work.out, before)
        assert _dirs(work.out) == folders, (nth, sorted(_dirs(work.out) - folders))
    monkeypatch.setattr(files, "_make_parents", real)
    assert in_process(script, *work.keys(*extra)) == 0
    assert _files(work.out) != before


# ---------------------------------------------------------------------------------- a killed writer
def test_temporary_file_of_a_killed_run_does_not_stop_the_next(work):
    folder = rand_set(work)
    kept = (folder / "kept_index.npy").read_bytes()
    (folder / ".kept_index.npy.k9x2ab.tmp").write_bytes(kept[: len(kept) // 2])  # what a killed writer leaves
    before = {k: v for k, v in _files(work.out).items() if "/rand_" not in k}
    run_script("coreset_rand.py", *work.keys())
    assert (folder / "kept_index.npy").read_bytes() == kept  # same seed, same list, written whole
    assert {k: v for k, v in _files(work.out).items() if "/rand_" not in k} == before


def test_training_killed_mid_run_resumes_and_keeps_its_epochs(work):
    out = work.tmp / "run"
    keys = ["--rec", work.rec, "--output", out, *STAGE_KEYS, "--max_steps_per_epoch", "2", "--resume", "true"]
    model = paths.original_dir(parse_config([*map(str, keys)]))
    proc = subprocess.Popen([sys.executable, str(REPO / "train_everything.py"), *map(str, keys)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (model / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        epoch1 = (model / "epoch_001.pt").read_bytes()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert json.loads((model / LOCK_NAME).read_text())["pid"] == proc.pid  # the killed run's lock is left behind

    r = run_script("train_everything.py", *keys)
    assert "taking over the lock of train_everything.py" in r.stderr and "resumed from epoch 1" in r.stdout
    assert (model / "epoch_001.pt").read_bytes() == epoch1
    assert load_checkpoint(model / "last.pt")["epoch"] == 3
    assert read_array(model / "prob_history.npy").shape == (3, N)
    assert not (model / LOCK_NAME).exists()


# ------------------------------------------------------------------------------- one run per folder
@contextlib.contextmanager
def held_by_this_test(folder):
    """Hold `folder`'s lock here; the scripts this test starts meet it as any other run would."""
    with OutputLock(folder, what="test_bad_input.py"):
        token = os.environ.pop(ENV_TOKENS)  # not passed down: the children are strangers to this lock
        try:
            yield
        finally:
            os.environ[ENV_TOKENS] = token


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _stale_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({
        "pid": _dead_pid(), "host": socket.gethostname(), "what": "killed.py", "token": "gone",
        "started": "2024-01-01T07:31:02", "command": "killed.py"}))


def _refused_by_holder(r, folder, started):
    line = _one_line(r, f"{folder} is in use by test_bad_input.py (pid {os.getpid()} on host {socket.gethostname()}",
                     "wait for it or stop it")
    assert time.time() - started < 60, "the second run waited instead of stopping at once"
    return line


def test_second_pipeline_on_a_folder_stops_at_once(tmp_path):
    out = tmp_path / "demo"
    with held_by_this_test(out):
        started = time.time()
        r = run_as_user("run_pipeline.py", "--profile", "tiny", "--out", out, "--stop_after", "1")
        _refused_by_holder(r, out, started)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing made


def test_pipeline_takes_over_the_lock_of_a_killed_run(tmp_path):
    out = tmp_path / "demo"
    _stale_lock(out)
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--stop_after", "1")
    assert "stopped after step 1" in r.stdout
    assert (out / "data" / "train.idx").exists() and not (out / LOCK_NAME).exists()


def test_second_stage_on_a_folder_stops_at_once(work):
    clean = paths.clean_dir(work.cfg)
    before = _files(work.out)
    with held_by_this_test(clean):
        started = time.time()
        r = run_as_user("clean_trainset.py", *work.keys())
        _refused_by_holder(r, clean, started)
    _assert_unchanged(work.out, before)


def test_stage_takes_over_the_lock_of_a_killed_run(work):
    clean = paths.clean_dir(work.cfg)
    _stale_lock(clean)
    run_script("clean_trainset.py", *work.keys())
    assert is_complete(clean / "kept_index.npy", work.fp) and not (clean / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------- the user's file system, Ctrl-C
@pytest.mark.parametrize("script", ["clean_trainset.py", "coreset_rand.py", "generate_label_dict.py", "eval_trainset.py"])
def test_an_output_this_user_cannot_write_ends_in_one_line(work, in_process, monkeypatch, capsys, script):
    """A read-only --output (simulated: the tests may run as root, whom permissions do not stop)."""
    readonly = work.tmp / "readonly"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == readonly or readonly in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    keys = work.keys()
    keys[keys.index("--output") + 1] = readonly / "out"
    code = in_process(script, *keys)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    stage = script[:-3]
    assert err.startswith(f"{stage}: error: cannot write {readonly / 'out'}"), err
    assert "Permission denied" in err and not readonly.exists()


def test_ctrl_c_ends_in_one_line_and_exit_130(work, in_process, monkeypatch, capsys):
    import coreset_select
    import utils.selection.registry as registry

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    folder = paths.coreset_dir(work.cfg, "rand")
    before = _files(work.out)
    monkeypatch.setattr(registry, "run_selection", interrupted)
    monkeypatch.setattr(coreset_select, "run_selection", interrupted)  # coreset_rand.py runs coreset_select's stage
    code = in_process("coreset_rand.py", *work.keys(), "--fraction", "0.3")
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("coreset_rand: interrupted (Ctrl-C)"), err
    assert _files(work.out) == before and not (folder.parent / "rand_0.30").exists()


@pytest.mark.parametrize("script", ["eval_verification.py", "eval_ijbc.py"])
def test_an_evaluation_locks_its_result_folder(work, script):
    """The evaluation commands did not lock their output folder: two runs could write one verification.json."""
    out = work.tmp / "eval"
    extra = ["--models", f"m={work.models / 'backbone.pth'}", "--out", out]
    if script == "eval_verification.py":
        extra += ["--val_targets", "syn_frontal"]
    with held_by_this_test(out):
        started = time.time()
        r = run_as_user(script, *work.keys(*extra))
        _refused_by_holder(r, out, started)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
