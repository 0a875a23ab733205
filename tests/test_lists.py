"""Kept lists in and out: a plain integer .npy (no manifest) exports and retrains after its checks, and every
selection writes its ranking (ranking.npy + manifest, ranking.csv) beside its kept list."""
import csv
import json
import logging
import pickle
import re
import runpy
import sys

import cv2
import numpy as np
import pytest

from config.config import parse_config
from tests.helpers import REPO, write_random_topk
from utils.artifacts import paths
from utils import pruning
from utils.selection import keep
from utils.selection import registry as selection
from utils.artifacts.files import (ArtifactError, Fingerprint, load_array, load_kept_index, load_label_map, save_array,
                             save_kept_index)
from utils.data.datasets import open_dataset
from utils.selection.ranking import RANKING_DTYPE, _float_chars, _int_chars

FRACTION, MIN_K, SEED = 0.5, 5, 3
NOTE = ("a plain .npy kept list with no manifest, so it cannot be matched to this dataset's fingerprint",
        "checked for dtype, range and duplicates only")


def run_stage_script(monkeypatch, capsys, script, *args):
    """(exit code, stdout, stderr) of `python script args`, run in this process (fast: no interpreter and torch
    start-up); the logger the stage sets up is put back."""
    logger = logging.getLogger("diffprob")
    saved = logger.handlers[:], logger.propagate, logger.level
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny RecordIO dataset, the files every method reads (as the training and scoring stages write them),
    cleaning's kept list, and every registered selection method run on them once."""
    import clean_trainset
    import coreset_select
    from utils.synthetic.generator import SyntheticConfig, generate_dataset

    rec = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(rec, SyntheticConfig(num_ids=8, image_size=32, seed=1, val_pairs=0, num_val_ids=4,
                                          ijb_templates=0), progress=False)
    ds = open_dataset(rec)
    labels, fp, n = ds.all_labels, ds.fingerprint, ds.num_images
    out = tmp_path_factory.mktemp("out")
    args = ["--rec", str(rec), "--output", str(out), "--window", "3", "--seed", str(SEED)]
    cfg = parse_config(args)
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(n) < 0.1, (labels + 1) % fp.num_classes, labels)
    prob = rng.random(n).astype(np.float32)
    save_array(paths.scores_path(cfg), {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred,
                                        "pred_prob": prob, "label": labels}, "eval_trainset", fp)
    save_array(paths.prob_history_path(cfg), rng.random((6, n)).astype(np.float32), "train_everything", fp)
    write_random_topk(cfg, fp, rng)
    clean_trainset.run_clean(cfg)
    folders = {}
    for name in selection.list_methods():
        mcfg = parse_config(args + ["--coreset_method", name])
        coreset_select.select(mcfg, method_name=name)
        folders[name] = paths.coreset_dir(mcfg, name)
    excluded = np.ones(n, dtype=bool)
    excluded[load_kept_index(paths.clean_dir(cfg) / "kept_index.npy", fp)] = False
    return dict(rec=rec, ds=ds, labels=labels, fp=fp, n=n, out=out, args=args, folders=folders, excluded=excluded)


def _expected_rank(method, table, excluded):
    """The rank the library gives from the ranking's own score and identity columns (the same computation)."""
    score, ident = table["score"], table["identity"]
    if method in ("diffprob", "diffprob_clean"):
        ex = excluded if method == "diffprob_clean" else None
        return pruning.diffprob_for_fraction(score, ident, FRACTION, MIN_K, excluded=ex, return_rank=True)[2]
    if method.startswith("ccs_"):
        return keep.ccs_keep(score, ident, FRACTION, MIN_K, seed=SEED, return_rank=True)[1]
    return pruning.keep_top_per_identity(score, ident, FRACTION, MIN_K, return_rank=True)[1]


# ------------------------------------------------------------------------------------------ rankings
@pytest.mark.parametrize("method", selection.list_methods())
def test_every_selection_writes_its_ranking(scored, method):
    folder, fp, n = scored["folders"][method], scored["fp"], scored["n"]
    kept = load_kept_index(folder / "kept_index.npy", fp)
    table = load_array(folder / "ranking.npy", fp, length=n)  # its manifest names this dataset
    assert table.dtype == RANKING_DTYPE and table.shape == (n,)
    assert np.array_equal(table["sample_index"], np.arange(n)) and np.array_equal(table["identity"], scored["labels"])
    assert np.array_equal(np.flatnonzero(table["kept"]), kept)
    # every identity's ranks are 0..n_i-1, and its kept samples are ranks 0..k_i-1
    ident, rank = table["identity"], table["rank_in_identity"]
    order = np.lexsort((rank, ident))
    _, starts, counts = np.unique(ident[order], return_index=True, return_counts=True)
    assert np.array_equal(rank[order], np.arange(n) - np.repeat(starts, counts))
    kept_per_id = np.bincount(ident, weights=table["kept"]).astype(int)
    assert np.array_equal(rank < kept_per_id[ident], table["kept"])
    # rows sorted by overall rank: the kept list first, each part by share of its identity, ties by index
    overall = np.argsort(table["overall_rank"])
    assert np.array_equal(np.sort(table["overall_rank"]), np.arange(n))
    assert np.array_equal(np.sort(overall[:kept.size]), kept)
    share = (2 * rank + 1) / (2.0 * np.bincount(ident)[ident])
    assert np.array_equal(overall, np.lexsort((np.arange(n), share, ~table["kept"])))
    # the order is the method's: its library function gives it from the ranking's own columns
    expect = _expected_rank(method, table, scored["excluded"])
    ranked = expect >= 0  # diffprob_clean: the samples cleaning removed come last, unranked by the method
    assert np.array_equal(rank[ranked], expect[ranked])
    assert (rank[~ranked] >= kept_per_id[ident[~ranked]]).all()
    info = json.loads((folder / "ranking.manifest.json").read_text())["info"]
    assert info["nested"] == (not method.startswith(("ccs_", "diffprob")))
    if info["nested"]:  # the kept list at the fraction asked, from the ranking alone
        sizes = np.bincount(ident)[ident]
        assert np.array_equal(rank < np.maximum((sizes * FRACTION).astype(int), np.minimum(sizes, MIN_K)),
                              table["kept"])
    if method == "rand":  # the random sort key it ranked by
        assert np.array_equal(table["score"], pruning.random_key(n, SEED))
    _check_csv(folder / "ranking.csv", table, "record_key", scored["ds"].image_keys)


def _check_csv(path, table, key_name, keys):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [*RANKING_DTYPE.names, key_name]
    body = np.array(rows[1:], dtype=object)
    assert body.shape == (table.size, len(RANKING_DTYPE.names) + 1)
    for j, name in enumerate(RANKING_DTYPE.names):
        if name == "score":
            assert body[:, j].tolist() == ["%.9g" % v for v in table["score"]]
        else:
            assert np.array_equal(body[:, j].astype(np.int64), table[name].astype(np.int64)), name
    assert body[:, -1].tolist() == [str(k) for k in keys]


def test_another_fraction_from_a_ranking_exports_as_a_plain_list(scored, tmp_path, monkeypatch, capsys):
    """A keep-top method's ranking gives its selection at any fraction; saved with numpy.save, it exports."""
    table = load_array(scored["folders"]["dynunc"] / "ranking.npy", scored["fp"])
    sizes = np.bincount(table["identity"])[table["identity"]]
    kept = np.flatnonzero(table["rank_in_identity"] < np.maximum((sizes * 0.3).astype(int), np.minimum(sizes, MIN_K)))
    assert np.array_equal(kept, pruning.keep_top_per_identity(table["score"], table["identity"], 0.3, MIN_K))
    plain = tmp_path / "kept_0.30.npy"
    np.save(plain, np.random.default_rng(0).permutation(kept))  # the order a list comes in does not matter
    code, out, err = run_stage_script(monkeypatch, capsys, "export_trainset.py", "--rec", scored["rec"],
                                      "--kept_index", plain, "--out", tmp_path / "exported")
    assert code == 0, err
    notes = [line for line in out.splitlines() if NOTE[0] in line]
    assert len(notes) == 1 and NOTE[1] in notes[0] and str(plain) in notes[0], out
    exported = open_dataset(tmp_path / "exported")
    origin = np.load(tmp_path / "exported" / "origin_index.npy")
    assert len(exported) == kept.size and np.array_equal(np.sort(origin), kept)
    assert np.array_equal(exported.all_labels, np.searchsorted(np.unique(scored["labels"][kept]),
                                                               scored["labels"][origin]))
    manifest = json.loads((tmp_path / "exported" / "export.json").read_text())
    assert manifest["selection"]["manifest"] is False and manifest["selection"]["kept"] == kept.size


def test_plain_list_retrains_on_exactly_its_images(scored, tmp_path, monkeypatch, capsys):
    labels = scored["labels"]
    ids = np.unique(labels)[:3]
    kept = np.flatnonzero(np.isin(labels, ids))[::-1][:70]  # a few identities, backwards
    plain = tmp_path / "kept.npy"
    np.save(plain, kept)
    out_dir = tmp_path / "out"
    code, out, err = run_stage_script(
        monkeypatch, capsys, "train_everything.py", "--rec", scored["rec"], "--output", out_dir,
        "--is_original_train", "false", "--kept_index", plain, "--network", "smallnet", "--embedding_size", "16",
        "--batch_size", "32", "--num_epoch", "1", "--lr_steps", "1", "--num_workers", "0", "--val_targets", "",
        "--frequent", "100")
    assert code == 0, err
    assert sum(NOTE[0] in line for line in out.splitlines()) == 1, out
    summary = json.loads(next(out_dir.glob("retrain/**/train_summary.json")).read_text())
    assert summary["num_images"] == kept.size and summary["num_classes"] == len(np.unique(labels[kept]))
    assert summary["steps"] == kept.size // 32 and summary["inputs"] == [str(plain)]


def test_rank_is_the_selections_own_order():
    """return_rank gives the order each selection rule walks, and its kept samples are exactly its selection."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 30, 2000)
    prob = rng.random(2000).round(2)  # ties
    excluded = rng.random(2000) < 0.2
    for ex in (None, excluded):
        kept, rank = pruning.diffprob(prob, labels, 0.05, excluded=ex, return_rank=True)
        assert np.array_equal(kept, pruning.diffprob(prob, labels, 0.05, excluded=ex))
        kept, rank2 = pruning.keep_top_per_identity(prob, labels, 0.3, excluded=ex, return_rank=True)
        assert np.array_equal(kept, pruning.keep_top_per_identity(prob, labels, 0.3, excluded=ex))
        kept, rank3 = keep.ccs_keep(prob, labels, 0.3, seed=2, excluded=ex, return_rank=True)
        assert np.array_equal(kept, keep.ccs_keep(prob, labels, 0.3, seed=2, excluded=ex))
        for r in (rank, rank2, rank3):
            assert ((r < 0) == (ex if ex is not None else False)).all()
    # DiffProb's order: kept by descending probability as the scan keeps them, then the dropped, the same way
    kept, rank = pruning.diffprob(prob, labels, 0.05, return_rank=True)
    is_kept = np.zeros(2000, bool)
    is_kept[kept] = True
    for c in np.unique(labels):
        mine = np.flatnonzero(labels == c)
        walk = mine[np.argsort(rank[mine])]
        n_kept = is_kept[mine].sum()
        assert is_kept[walk[:n_kept]].all() and not is_kept[walk[n_kept:]].any()
        for part in (walk[:n_kept], walk[n_kept:]):
            assert (np.diff(prob[part]) <= 0).all()
            assert all(b < a for a, b, same in zip(part[:-1], part[1:], np.diff(prob[part]) == 0) if same)


def test_plain_list_gets_a_label_map(scored, tmp_path, monkeypatch, capsys):
    kept = np.flatnonzero(scored["labels"] != scored["labels"][0])
    np.save(tmp_path / "kept.npy", kept)
    code, out, err = run_stage_script(monkeypatch, capsys, "label_mapping.py", *scored["args"],
                                      "--kept_index", tmp_path / "kept.npy")
    assert code == 0, err
    assert sum(NOTE[0] in line for line in out.splitlines()) == 1 and "(1 vanish)" in out
    assert load_label_map(tmp_path / "label_map.json", scored["fp"]) == pruning.label_map_for(kept, scored["labels"])


# ------------------------------------------------------------------------------------------ bad plain lists
def _object_array(path):
    np.save(path, np.array([1, "two"], dtype=object), allow_pickle=True)


def _pickle(path):
    path.write_bytes(pickle.dumps([1, 2, 3]))


BAD = {  # name: (how to write it, what the error line says)
    "float": (lambda p: np.save(p, np.array([1.0, 2.0])), "sample indices must be integers, got float64"),
    "bool": (lambda p: np.save(p, np.array([True, False])), "sample indices must be integers, got bool"),
    "out-of-range": (lambda p: np.save(p, np.array([3, 10 ** 6, 5])),
                     r"indices must be in \[0, {n}\) \(the dataset has {n} images\); the first outside is 1000000 "
                     r"at position 1"),
    "negative": (lambda p: np.save(p, np.array([3, -1])), r"the first outside is -1 at position 1"),
    "duplicate": (lambda p: np.save(p, np.array([7, 3, 9, 3, 7, 3])),
                  r"sample index 3 appears more than once \(again at position 3; 3 repeated entries in all\)"),
    "2-D": (lambda p: np.save(p, np.arange(6).reshape(2, 3)), r"expected a 1-D list of sample indices, got shape \(2, 3\)"),
    "empty": (lambda p: np.save(p, np.zeros(0, np.int64)), "the kept list is empty"),
    "object": (_object_array, "refused: it holds an object array"),
    "pickle": (_pickle, "refused: a pickle"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_plain_list_exits_nonzero_with_one_line(scored, tmp_path, monkeypatch, capsys, name):
    write, needle = BAD[name]
    bad = tmp_path / f"{name}.npy"
    write(bad)
    code, out, err = run_stage_script(monkeypatch, capsys, "export_trainset.py", "--rec", scored["rec"],
                                      "--kept_index", bad, "--out", tmp_path / "exported")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(rf"export_trainset: error: {re.escape(str(bad))}: .*{needle.format(n=scored['n'])}", err), err
    assert NOTE[0] not in out and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("name", ["duplicate", "float"])
def test_bad_plain_list_stops_retraining(scored, tmp_path, monkeypatch, capsys, name):
    write, needle = BAD[name]
    bad = tmp_path / f"{name}.npy"
    write(bad)
    code, _, err = run_stage_script(monkeypatch, capsys, "train_everything.py", "--rec", scored["rec"], "--output",
                                    tmp_path / "out", "--is_original_train", "false", "--kept_index", bad,
                                    "--network", "smallnet", "--num_workers", "0", "--val_targets", "")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"train_everything: error: {bad}: ") and needle.split(" \\(")[0] in err.replace("\\", "")


def test_manifest_is_still_checked_when_a_list_has_one(tmp_path):
    """`plain` relaxes only the manifest-less case: a list whose manifest names another dataset stays refused,
    and stage outputs read without `plain` still need their manifest."""
    fp = Fingerprint(100, 7, 1234)
    save_kept_index(tmp_path / "k.npy", [1, 2], "rand", Fingerprint(100, 7, 999))
    with pytest.raises(ArtifactError, match="another dataset"):
        load_kept_index(tmp_path / "k.npy", fp, plain=True)
    np.save(tmp_path / "bare.npy", np.array([5, 1], dtype=np.uint16))
    with pytest.raises(ArtifactError, match="no manifest"):
        load_kept_index(tmp_path / "bare.npy", fp)
    assert load_kept_index(tmp_path / "bare.npy", fp, plain=True).tolist() == [1, 5]  # sorted, int64


# ------------------------------------------------------------------------------------------ the CSV
def test_image_folder_ranking_names_files(tmp_path):
    import coreset_select

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for ident, names in (("alice", ["0.png", "a,b.png", 'say "hi".png']), ("bob", ["0.png", "1.png"])):
        (root / ident).mkdir(parents=True)
        for name in names:
            cv2.imwrite(str(root / ident / name), rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    ds = open_dataset(root)
    cfg = parse_config(["--rec", str(root), "--output", str(tmp_path / "out"), "--coreset_method", "rand",
                        "--min_samples_per_id", "1"])
    coreset_select.select(cfg)
    folder = paths.coreset_dir(cfg, "rand")
    _check_csv(folder / "ranking.csv", load_array(folder / "ranking.npy", ds.fingerprint), "file", ds.files)


def test_csv_numbers_are_printfs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-12, 12, 2000),
                        rng.random(2000).astype(np.float32), np.arange(-50, 50) * 1.0,
                        [0.0, np.nan, np.inf, -np.inf, 1e-5, 1e-4, 1e9, 999999999.5, 9.9999999996e3, 5e-324, 1e308]])
    text = [bytes(r[r != 0]).decode() for r in _float_chars(x)]
    assert text == ["%.9g" % v for v in x]
    v = np.array([0, 7, -7, 10, -123456, 2 ** 62], dtype=np.int64)
    assert [bytes(r[r != 0]).decode() for r in _int_chars(v)] == [str(i) for i in v.tolist()]


# ------------------------------------------------------------------------------------------ one run per list
RETRAIN_KEYS = ("--is_original_train", "false", "--network", "smallnet", "--embedding_size", "16", "--batch_size", "32",
                "--num_epoch", "1", "--lr_steps", "1", "--num_workers", "0", "--val_targets", "", "--frequent", "100")


def test_two_lists_from_outside_train_in_folders_of_their_own(scored, tmp_path, monkeypatch, capsys):
    """A list given by --kept_index names its retrain folder by its bytes: a second list never resumes, nor
    overwrites, the first one's model (it did when the folder was named by --coreset_method and --fraction)."""
    labels, out_dir = scored["labels"], tmp_path / "out"
    made = {}
    for name, ids in (("a", [0, 1, 2]), ("b", [3, 4, 5])):
        plain = tmp_path / f"{name}.npy"
        np.save(plain, np.flatnonzero(np.isin(labels, np.unique(labels)[ids])))
        code, out, err = run_stage_script(monkeypatch, capsys, "train_everything.py", "--rec", scored["rec"], "--output",
                                          out_dir, "--kept_index", plain, "--resume", "true", *RETRAIN_KEYS)
        assert code == 0, err
        cfg = parse_config(["--rec", str(scored["rec"]), "--output", str(out_dir), "--kept_index", str(plain),
                            *RETRAIN_KEYS])
        digest = __import__("hashlib").sha256(plain.read_bytes()).hexdigest()[:12]
        assert paths.train_dir(cfg).name == f"kept_{digest}_smallnet_CosFace"
        made[name] = (paths.train_dir(cfg), (paths.train_dir(cfg) / "backbone.pth").read_bytes())
        assert "resumed from" not in out
    assert made["a"][0] != made["b"][0] and (made["a"][0] / "backbone.pth").read_bytes() == made["a"][1]
    summary = json.loads((made["b"][0] / "train_summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["inputs"] == [str(tmp_path / "b.npy")]


def test_resuming_on_a_list_rewritten_since_is_refused(scored, tmp_path, monkeypatch, capsys):
    """coreset_rand.py rerun with another seed rewrites coresets/<scorer>/rand_0.50/kept_index.npy; a retrain
    resumed in that folder must not continue the first list's model on the second list."""
    import shutil

    out_dir = tmp_path / "out"
    shutil.copytree(scored["out"], out_dir)
    base = ["--rec", str(scored["rec"]), "--output", str(out_dir), "--coreset_method", "rand", "--fraction", "0.5",
            "--network", "smallnet"]
    assert run_stage_script(monkeypatch, capsys, "coreset_rand.py", *base, "--seed", "1")[0] == 0
    code, _, err = run_stage_script(monkeypatch, capsys, "train_everything.py", *base, "--resume", "true", *RETRAIN_KEYS)
    assert code == 0, err
    model = paths.train_dir(parse_config([*base, *RETRAIN_KEYS]))
    before = (model / "backbone.pth").read_bytes()
    assert run_stage_script(monkeypatch, capsys, "coreset_rand.py", *base, "--seed", "2")[0] == 0
    code, _, err = run_stage_script(monkeypatch, capsys, "train_everything.py", *base, "--resume", "true",
                                    *RETRAIN_KEYS)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "was trained on another kept list or label map" in err and str(model / "last.pt") in err
    assert (model / "backbone.pth").read_bytes() == before
