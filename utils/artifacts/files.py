"""Files that flow between stages: written atomically, each beside a manifest with the dataset fingerprint.

Every artifact `X.ext` gets `X.manifest.json`:
    {"stage": ..., "created": ..., "fingerprint": {"num_images", "num_classes", "idx_size"},
     "config": {...resolved config...}, "inputs": [paths read], "info": {...}}
A stage that reads an artifact passes its own dataset's fingerprint; a mismatch is an error that
names both, so a kept list of CASIA-WebFace is never applied to MS1MV2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import csv
import datetime
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from utils.errors import ToolkitError, UserError
from utils.artifacts.paths import bin_paths, manifest_path

log = logging.getLogger("diffprob")


class ArtifactError(ToolkitError):
    """An input file is missing, malformed, or belongs to another dataset."""


@dataclass(frozen=True)
class Fingerprint:
    num_images: int
    num_classes: int
    idx_size: int

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        try:
            return cls(int(d["num_images"]), int(d["num_classes"]), int(d["idx_size"]))
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"malformed fingerprint {d!r}") from None

    def __str__(self):
        return f"{self.num_images} images, {self.num_classes} classes, train.idx of {self.idx_size} bytes"


# ---------------------------------------------------------------------------------------- atomic I/O
_UMASK = os.umask(0)
os.umask(_UMASK)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_full_error(path: Path, nbytes) -> ArtifactError:
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free on that filesystem"
    except OSError:
        free = "free space unknown"
    size = f"{nbytes} bytes" if nbytes is not None else "size unknown"
    return ArtifactError(f"no space left on device writing {path} ({size}; {free})")


# While a stage's outputs are held back (`all_or_nothing`): the (temporary file, target) pairs written so far, and
# the folders the writes created.
_HELD = None


@contextlib.contextmanager
def all_or_nothing():
    """Every atomic write in the block is written whole to its temporary file and held back; they all replace their
    targets together when the block finishes. An error anywhere (a full disk at the third file, a bug, Ctrl-C)
    removes them and the folders they created: the previous outputs stay whole, none is half-updated.
    (`run_stage` wraps every stage but training, whose checkpoints are committed one epoch at a time.)"""
    global _HELD
    if _HELD is not None:  # nested: the outer block commits
        yield
        return
    _HELD = {"files": [], "dirs": []}
    try:
        yield
        held, _HELD = _HELD, None
        for tmp, path in held["files"]:
            os.replace(tmp, path)
    finally:
        if _HELD is not None:
            for tmp, _ in _HELD["files"]:
                Path(tmp).unlink(missing_ok=True)
            for folder in reversed(_HELD["dirs"]):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty: another run's files are never removed
            _HELD = None


def _make_parents(folder: Path):
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    if _HELD is not None:
        _HELD["dirs"].extend(reversed(missing))  # outermost first; removed innermost first


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp", nbytes=None):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    `suffix` keeps writers that append an extension of their own (np.savez, savefig) on the temp name.
    A full disk (or quota) ends in one ArtifactError naming `path` and its size `nbytes` (when the
    caller knows it, else the bytes written so far), the temporary file removed.
    """
    path = Path(path)
    tmp = None
    try:
        _make_parents(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual mode
        if _HELD is not None:  # all_or_nothing: replaced with the stage's other outputs when it finishes
            _HELD["files"].append((tmp, path))
            tmp = None
        else:
            os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        if nbytes is None and tmp is not None and os.path.exists(tmp):
            nbytes = os.path.getsize(tmp)
        raise _disk_full_error(path, nbytes) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data: bytes):
    with atomic_path(path, nbytes=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """The project's one JSON writer: sorted keys, numpy scalars and arrays as plain values, atomic."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def atomic_write_csv(path, header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Fingerprint):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_npy(path, array):
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path, arrays: dict):
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ manifests
def write_manifest(path, stage: str, fingerprint: Fingerprint, config=None, inputs=(), info=None):
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    atomic_write_json(manifest_path(path), {
        "stage": stage,
        "artifact": Path(path).name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "fingerprint": fingerprint.to_dict(),
        "config": cfg,
        "inputs": [str(p) for p in inputs],
        "info": info or {},
    })


def read_json(path, what: str = "a JSON object"):
    """Parse a JSON file; an unreadable, non-UTF-8 or malformed one is an ArtifactError naming it and `what`
    was expected. `what` starting with "a JSON object" also requires a top-level object (dict)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: malformed JSON, expected {what} ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({e.strerror or e})") from None
    if what.startswith("a JSON object") and not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected {what}, found a JSON {type(obj).__name__}")
    return obj


def read_manifest(path) -> dict:
    mpath = manifest_path(path)
    if not mpath.exists():
        raise ArtifactError(f"{path}: no manifest {mpath.name} beside it; was it written by this toolkit's stages?")
    return read_json(mpath, "a JSON object (the manifest: stage, fingerprint, config, inputs)")


def check_fingerprint(path, expected: Fingerprint) -> dict:
    """Read the manifest of `path` and refuse it if it was made from another dataset."""
    if not Path(path).exists():
        raise ArtifactError(f"missing input {path}: run the stage that writes it first")
    manifest = read_manifest(path)
    try:
        found = Fingerprint.from_dict(manifest.get("fingerprint", {}))
    except ArtifactError as e:
        raise ArtifactError(f"{manifest_path(path)}: {e}") from None
    if found != expected:
        raise ArtifactError(
            f"{path} was made from another dataset: its fingerprint is ({found}), "
            f"this dataset's is ({expected}). Re-run stage '{manifest.get('stage', '?')}' on this dataset.")
    return manifest


def is_complete(path, expected: Fingerprint = None) -> bool:
    """True when `path` and its manifest exist (and match `expected`): a stage output that need not be redone."""
    try:
        if expected is None:
            read_manifest(path)
            return Path(path).exists()
        check_fingerprint(path, expected)
        return True
    except ArtifactError:
        return False


# ----------------------------------------------------------------------------------- typed artifacts
def save_array(path, array, stage, fingerprint, config=None, inputs=(), info=None):
    """A per-sample `.npy` (or `.npz` when `array` is a dict), then its manifest (written last: complete = both)."""
    if isinstance(array, dict):
        atomic_save_npz(path, array)
    else:
        atomic_save_npy(path, array)
    write_manifest(path, stage, fingerprint, config, inputs, info)


def load_array(path, fingerprint: Fingerprint, length: int = None):
    """Load a `.npy`/`.npz` artifact after checking its fingerprint (and the per-sample length)."""
    check_fingerprint(path, fingerprint)
    data = read_array(path)
    if length is not None:
        arrays = data.values() if isinstance(data, dict) else [data]
        for a in arrays:
            if a.ndim >= 1 and a.shape[-1] != length and a.shape[0] != length:
                raise ArtifactError(f"{path}: per-sample array of length {a.shape}, expected {length} (num_images)")
    return data


_EXPECTED_ARRAY = "a NumPy .npy array or .npz of named arrays (numbers, no Python objects)"


def check_numpy_magic(path, magic: bytes):
    """Refuse a file whose first bytes are not those of a .npy or .npz (np.load would take it for a pickle)."""
    if not magic.startswith((b"\x93NUMPY", b"PK")):
        what = "a pickle" if magic[:1] == b"\x80" else f"content starting {magic!r}" if magic else "an empty file"
        raise ArtifactError(f"{path}: refused: {what}, not {_EXPECTED_ARRAY}")


def read_array(path):
    """A `.npy` array or the dict of a `.npz`, without pickles: truncated, foreign or object-array files
    are an ArtifactError naming the file."""
    try:
        with open(path, "rb") as f:
            check_numpy_magic(path, f.read(6))
            f.seek(0)
            data = np.load(f, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:
                    data = {k: data[k] for k in data.files}
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array would need code to run on load
            raise ArtifactError(f"{path}: refused: it holds an object array (Python objects); "
                                f"expected {_EXPECTED_ARRAY}") from None
        raise ArtifactError(f"{path}: truncated or not {_EXPECTED_ARRAY} ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise ArtifactError(f"{path}: truncated or not {_EXPECTED_ARRAY} ({type(e).__name__}: {e})") from None
    return data


# -------------------------------------------------------------------------------------- kept indices
_TEXT_RE = re.compile(r"^\s*kept_index\s*=\s*\[(.*)\]\s*$", re.S)


def validate_kept_index(kept, num_images: int, source="kept index", duplicates: str = "merge") -> np.ndarray:
    """Sample indices as sorted unique int64, after checks of shape, dtype and range (one ArtifactError each).

    `duplicates="merge"` drops repeated indices (the toolkit's writers); `"refuse"` names the first one
    (a list from elsewhere, which cannot be told from a damaged one).
    """
    if isinstance(kept, dict):
        raise ArtifactError(f"{source}: holds named arrays {sorted(kept)} (.npz); expected one 1-D .npy array of "
                            f"sample indices")
    kept = np.asarray(kept)
    if kept.ndim != 1:
        raise ArtifactError(f"{source}: expected a 1-D list of sample indices, got shape {kept.shape}")
    if kept.size == 0:
        raise ArtifactError(f"{source}: the kept list is empty; nothing would be trained on")
    if not np.issubdtype(kept.dtype, np.integer):
        nan = f" ({int(np.isnan(kept).sum())} NaN)" if np.issubdtype(kept.dtype, np.floating) else ""
        raise ArtifactError(f"{source}: sample indices must be integers, got {kept.dtype}{nan}")
    outside = (kept < 0) | (kept >= num_images)  # before the cast: a uint64 above 2**63 stays outside
    if outside.any():
        i = int(np.argmax(outside))
        raise ArtifactError(f"{source}: indices must be in [0, {num_images}) (the dataset has {num_images} images); "
                            f"the first outside is {kept[i]} at position {i} ({int(outside.sum())} outside)")
    kept = kept.astype(np.int64)
    if np.any(np.diff(kept) <= 0):
        if duplicates == "refuse":
            order = np.argsort(kept, kind="stable")
            repeat = np.flatnonzero(kept[order][1:] == kept[order][:-1])
            if repeat.size:
                i = int(order[repeat + 1].min())  # the first position that repeats an earlier one
                raise ArtifactError(f"{source}: sample index {kept[i]} appears more than once (again at position "
                                    f"{i}; {repeat.size} repeated entries in all); a kept list names each image once")
        kept = np.unique(kept)
    return kept


def save_kept_index(path, kept, stage, fingerprint, config=None, inputs=(), info=None, text=False):
    """Kept sample indices as sorted unique int64 `.npy`; with `text=True` also the paper's text form."""
    kept = validate_kept_index(kept, fingerprint.num_images, str(path))
    atomic_save_npy(path, kept)
    if text:
        write_kept_index_text(Path(path).with_suffix(".txt"), kept)
    write_manifest(path, stage, fingerprint, config, inputs, info)
    return kept


def write_kept_index_text(path, kept):
    """The paper repository's released form: one line `kept_index = [i, j, ...]`."""
    body = ", ".join(map(str, np.asarray(kept, dtype=np.int64).tolist()))
    atomic_write_text(path, f"kept_index = [{body}]\n")


def read_kept_index_text(path) -> np.ndarray:
    """Parse `kept_index = [ ... ]` without `ast` (millions of entries parse in well under a second)."""
    expected = "the text form 'kept_index = [i, j, ...]' (or a .npy)"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: binary content; expected {expected}") from None
    m = _TEXT_RE.match(text)
    if not m:
        raise ArtifactError(f"{path}: expected {expected}")
    body = m.group(1).replace(",", " ").split()
    try:
        return np.array(body, dtype=np.int64) if body else np.zeros(0, np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in body if not t.lstrip("-").isdigit() or abs(int(t)) >= 2 ** 63), body[0])
        raise ArtifactError(f"{path}: {bad!r} is not a sample index") from None


def load_kept_index(path, fingerprint: Fingerprint, plain: bool = False) -> np.ndarray:
    """A kept list from this toolkit (`.npy` + manifest, fingerprint checked) or the paper's text form, as
    sorted unique int64 sample indices.

    `plain=True` (a list the user names, e.g. `--kept_index`): a `.npy` without a manifest, as `numpy.save`
    writes one (the DiffProb authors share theirs so), is accepted after the checks of dtype, shape, range
    and duplicates, and one line on the log says it could not be matched to the dataset.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"missing kept list {path}: run the pruning stage that writes it first")
    if path.suffix == ".npy" and plain and not manifest_path(path).exists():
        kept = validate_kept_index(read_array(path), fingerprint.num_images, str(path), duplicates="refuse")
        log.info("%s: a plain .npy kept list with no manifest, so it cannot be matched to this dataset's "
                 "fingerprint (%s); checked for dtype, range and duplicates only: %d images, used in ascending order",
                 path, fingerprint, kept.size)
        return kept
    if path.suffix == ".npy":
        kept = load_array(path, fingerprint)
    else:
        kept = read_kept_index_text(path)  # released lists carry no manifest: the range check is all we have
    return validate_kept_index(kept, fingerprint.num_images, str(path))


# ---------------------------------------------------------------------------------------- label maps
def save_label_map(path, label_map: dict, stage, fingerprint, config=None, inputs=(), info=None):
    """old identity label -> new contiguous label, as JSON {"num_classes": K, "map": {"old": new}}."""
    new = sorted(label_map.values())
    if new != list(range(len(new))):
        raise ValueError("label map values must be the contiguous labels 0..K-1")
    atomic_write_json(path, {"num_classes": len(new), "map": {str(int(k)): int(v) for k, v in sorted(label_map.items())}})
    write_manifest(path, stage, fingerprint, config, inputs, info)


def load_label_map(path, fingerprint: Fingerprint) -> dict:
    """{old label: new label}; every old label an identity of the dataset, the new ones exactly 0..K-1."""
    check_fingerprint(path, fingerprint)
    expected = 'a JSON object {"num_classes": K, "map": {"old label": new label}}'
    data = read_json(path, expected)
    raw = data.get("map")
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected {expected}; 'map' is {type(raw).__name__}")
    bad_key = next((k for k in raw if not re.fullmatch(r"\d+", k)), None)
    if bad_key is not None:
        raise ArtifactError(f"{path}: old label {bad_key!r} is not a non-negative integer")
    bad = next((k for k, v in raw.items() if type(v) is not int), None)  # bool and float are not labels
    if bad is not None:
        raise ArtifactError(f"{path}: new label of {bad} is {raw[bad]!r}; expected an integer")
    mapping = {int(k): v for k, v in raw.items()}
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ArtifactError(f"{path}: new labels are not contiguous 0..{len(mapping) - 1}")
    if data.get("num_classes", len(mapping)) != len(mapping):
        raise ArtifactError(f"{path}: num_classes={data['num_classes']!r} but the map has {len(mapping)} new labels")
    outside = [k for k in mapping if k >= fingerprint.num_classes]
    if outside:
        raise ArtifactError(f"{path}: old labels {sorted(outside)[:5]} are outside the dataset's "
                            f"{fingerprint.num_classes} identities")
    return mapping


def label_map_array(label_map: dict, num_classes: int) -> np.ndarray:
    """Dense lookup table: old label -> new label, -1 for identities that vanished."""
    table = np.full(num_classes, -1, dtype=np.int64)
    for old, new in label_map.items():
        if not 0 <= old < num_classes:
            raise ArtifactError(f"label map names identity {old}, outside 0..{num_classes - 1}")
        table[old] = new
    return table


# ------------------------------------------------------------------------------- verification sets
def check_bins(cfg):
    """A real dataset's verification sets must all be there: a run that silently skipped one would report
    accuracies on fewer targets than the paper. (A synthetic dataset lacking its sets only warns.)"""
    if cfg.dataset == "synthetic":
        return
    missing = [str(path) for path in bin_paths(cfg).values() if not path.exists()]
    if missing:
        raise UserError(f"verification set {missing[0]} not found" + (f" (and {len(missing) - 1} more)" if
                                                                      len(missing) > 1 else "")
                        + f"; the {cfg.dataset} preset verifies on {','.join(cfg.val_targets)}. InsightFace "
                        f"publishes the .bin files with the training sets (its dataset zoo, recognition/_datasets_); "
                        f"put them in {cfg.rec}, or narrow the list with --val_targets")
