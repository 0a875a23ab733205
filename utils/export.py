"""Export a selection of a dataset as a dataset folder of its own, copying records byte for byte.

A kept list (and the label map that goes with it) becomes a folder that any stage opens with no
kept list: `open_dataset(DST)` lists exactly the kept images, with the renumbered labels, in the
order training on the source with the kept list sees them (see `export_dataset`).

RecordIO sources are written in the InsightFace layout: record 0 is the header
(flag 2, label [first_identity_key, end_key]), image records 1..N keep their payload bytes (only
the label in the IRHeader changes), then one record per identity whose label is its [start, end)
range of image keys. The copy streams: records are read in chunks of at most `CHUNK_BYTES` by their
byte offsets and written sequentially, so memory does not grow with the dataset.

Beside the records: `origin_index.npy` (new sample index -> source sample index, int64), the
verification `.bin` files and `ijb/` (hard links, or copies where a hard link is refused), `noise.json`
remapped to the new sample indices when the source has one, and the manifest `export.json`.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.artifacts import (ArtifactError, Fingerprint, atomic_save_npy, atomic_write_json, label_map_array,
                             load_array, load_kept_index, load_label_map, validate_kept_index)
from utils.recordio import MAGIC, IRHeader, RecordIOError, _read_record, frame_record, pack, read_property, unpack

CHUNK_BYTES = 16 << 20  # source bytes read per chunk: bounds the memory of the copy
GAP_BYTES = 32 << 10  # records this close in the source are read with one call (see _read_chunk)
ORIGIN_INDEX = "origin_index.npy"
NOISE_FILE = "noise.json"
EXPORT_MANIFEST = "export.json"
_LENGTH_BITS, _LENGTH_MASK = 29, (1 << 29) - 1
_REC_HEAD_BYTES = 8


# ----------------------------------------------------------------------------------- destination folder
def check_destination(src, dst, overwrite: bool, overwrite_flag: str = "--overwrite true") -> Path:
    """The absolute destination; refuses one that exists (unless `overwrite`), overlaps `src`, or cannot be made.

    `overwrite_flag` is how the command that calls this spells `overwrite`, for the message.
    """
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    if dst == src or src in dst.parents or dst in src.parents:
        raise ArtifactError(f"--out {dst} must lie outside the source dataset {src} (and not contain it)")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise ArtifactError(f"{dst} exists and is not a folder; choose another --out")
        if any(dst.iterdir()) and not overwrite:
            raise ArtifactError(f"{dst} already exists; pass {overwrite_flag} to replace it")
    ancestor = dst.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArtifactError(f"cannot create {dst}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot create {dst}: {ancestor} is not writable")
    return dst


@contextlib.contextmanager
def staged_folder(dst: Path):
    """Yield a hidden folder beside `dst`; it becomes `dst` only if the block finishes (all or nothing).

    An existing `dst` (allowed by `check_destination`) is replaced only after the new folder is complete.
    """
    dst = Path(os.path.abspath(dst))
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise ArtifactError(f"cannot create {dst}: {exc.strerror} ({exc.filename})") from None
    try:
        yield tmp
        old = tmp.with_name(tmp.name + ".old") if dst.exists() else None
        if old is not None:
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_or_copy(src, dst) -> str:
    """Hard-link `src` to `dst` ('hard link'); copy it ('copy') where the file system refuses the link."""
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def carry_files(src_dir: Path, dst_dir: Path, folders=("ijb",)) -> dict:
    """The verification `.bin` files and the named folders of `src_dir`, linked (or copied) into `dst_dir`.

    Returns {name: 'hard link' | 'copy' | 'hard link and copy'}. Hard links take no space and survive the
    source folder being moved or deleted; this toolkit replaces files (never edits them in place), so a
    write to one side never shows on the other.
    """
    carried = {}
    for path in sorted(src_dir.glob("*.bin")):
        if path.is_file():
            carried[path.name] = link_or_copy(path, dst_dir / path.name)
    for name in folders:
        if (src_dir / name).is_dir():
            modes = set()
            shutil.copytree(src_dir / name, dst_dir / name,
                            copy_function=lambda s, d: modes.add(link_or_copy(s, d)))
            carried[name + "/"] = " and ".join(sorted(modes)) or "empty"
    return carried


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------------------ RecordIO writing
def _spans(layout) -> np.ndarray:
    """Bytes from each image record to the next image record (or the end of the file) in the .rec.

    dmlc writes records back to back, so that is the record's framed size, except where a record of
    another kind follows (the identity records after the last image); the copy checks each span
    against the record's own length word and copies only the record.
    """
    bounds = np.sort(np.append(layout.image_offsets, layout.rec_path.stat().st_size))
    return bounds[np.searchsorted(bounds, layout.image_offsets, side="right")] - layout.image_offsets


def _chunks(lengths: np.ndarray, limit: int):
    """[a, b) ranges of consecutive records whose lengths add up to at most `limit` (at least one record)."""
    ends = np.cumsum(lengths)
    a = 0
    while a < lengths.size:
        base = ends[a - 1] if a else 0
        b = max(int(np.searchsorted(ends, base + limit, side="right")), a + 1)
        yield a, b
        a = b


def _read_chunk(fd: int, scratch: bytearray, offsets: np.ndarray, spans: np.ndarray, merged: np.ndarray, path):
    """Read the records at source `offsets` into `scratch` (grown as needed): one call per group of records
    `merged` with the one before (they follow it in the source within GAP_BYTES; the gap is read too, since
    a few KB of copying cost less than a system call). Returns (scratch, view of the bytes read, position of
    each record in it)."""
    first = np.flatnonzero(~merged)
    last = np.r_[first[1:], offsets.size] - 1
    sizes = offsets[last] + spans[last] - offsets[first]
    group_at = np.r_[0, np.cumsum(sizes)[:-1]]
    group = np.repeat(np.arange(first.size), last - first + 1)
    record_at = group_at[group] + offsets - offsets[first][group]
    total = int(sizes.sum())
    if total > len(scratch):
        scratch = bytearray(total)  # reused by the next chunks: no fresh pages to fault in
    view = memoryview(scratch)[:total]
    for base, at, size in zip(offsets[first].tolist(), group_at.tolist(), sizes.tolist()):
        got = os.preadv(fd, [view[at:at + size]], base)
        if got != size:
            raise RecordIOError(f"truncated file {os.fspath(path)!r}: {size} bytes expected at byte offset {base}, "
                                f"found {got}")
    return scratch, view, record_at


def relabelled_record(payload: bytes, label: int, image: bytes = None) -> bytes:
    """`payload` (a packed record) with its identity label set to `label` (element 0 of a label
    vector), and its image replaced by `image` when given; flag, id and id2 are kept."""
    header, img = unpack(payload)
    if header.flag:
        vector = np.array(header.label, dtype=np.float32)
        vector[0] = label
        header = header._replace(label=vector)
    else:
        header = header._replace(label=float(label))
    return pack(header, img if image is None else image)


def _relabel_chunk(view, record_at, spans, labels, keys, offsets, rec_path, replaced: dict):
    """Set the labels of the records in `view` (in place, vectorised) after checking their framing.

    Returns (framed size of each record, {record: new bytes}) where the bytes in `view` cannot be written
    as they are: records the dmlc writer split (rejoined and written again with the new label) and the
    records of `replaced` ({record: image bytes}: the record keeps its header, label included).
    """
    words = np.frombuffer(view, dtype="<u4")
    w = record_at // 4
    magic, lrec = words[w], words[w + 1]
    cflag, length = lrec >> _LENGTH_BITS, (lrec & _LENGTH_MASK).astype(np.int64)
    framed = _REC_HEAD_BYTES + ((length + 3) & ~3)
    whole = cflag == 0
    bad = (magic != MAGIC) | (whole & (framed > spans)) | ~np.isin(cflag, (0, 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RecordIOError(f"record is not where the index says (bad magic word, continuation flag or length): "
                            f"file {os.fspath(rec_path)!r}, key {int(keys[i])}, byte offset {int(offsets[i])}")
    flag = words[np.minimum(w + 2, words.size - 1)]
    label_word = np.where(flag == 0, w + 3, w + 8)  # scalar label in the header, else label vector element 0
    words.view("<f4")[label_word[whole]] = labels[whole].astype(np.float32)
    special = {}
    for i in sorted(set(np.flatnonzero(~whole).tolist()) | set(replaced)):
        at = int(record_at[i])
        if whole[i]:
            payload = view[at + _REC_HEAD_BYTES:at + _REC_HEAD_BYTES + int(length[i])]
        else:  # split by the writer: rejoin its parts
            payload, _ = _read_record(io.BytesIO(view[at:at + int(spans[i])]), 0, int(spans[i]), rec_path,
                                      int(keys[i]))
        special[i] = frame_record(relabelled_record(payload, int(labels[i]), replaced.get(i)))
    return framed, special


def _write_chunk(fd: int, view, record_at, framed, special: dict) -> np.ndarray:
    """Write the records of `view` (at `record_at`, `framed` bytes each; `special` ones from their own bytes)
    in order, one slice per run of records adjacent in `view`. Returns the bytes written per record."""
    is_special = np.zeros(record_at.size, bool)
    is_special[list(special)] = True
    joined = (record_at[1:] == record_at[:-1] + framed[:-1]) & ~is_special[1:] & ~is_special[:-1]
    first = np.flatnonzero(np.r_[True, ~joined])
    last = np.r_[first[1:], record_at.size] - 1
    pieces = [special[f] if is_special[f] else view[a:e] for f, a, e in
              zip(first.tolist(), record_at[first].tolist(), (record_at[last] + framed[last]).tolist())]
    write_all(fd, pieces)
    sizes = framed.copy()
    for i, data in special.items():
        sizes[i] = len(data)
    return sizes


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def write_all(fd: int, pieces) -> None:
    """Write the bytes-like `pieces` in order with gathered writes (`os.writev`), whatever they return."""
    for k in range(0, len(pieces), _IOV_MAX):
        batch = pieces[k:k + _IOV_MAX]
        done = os.writev(fd, batch)
        if done < sum(len(p) for p in batch):  # a short write (a signal, a full disk): finish with plain writes
            rest = memoryview(b"".join(batch))[done:]
            while rest:
                rest = rest[os.write(fd, rest):]


def write_recordio(layout, out_dir, origin_index, labels, num_classes: int, replace=None,
                   progress: bool = True, desc: str = "export") -> int:
    """Write `train.rec`/`train.idx` (InsightFace layout) of the source records `origin_index`, in that order.

    `layout` is the source's `RecordLayout`; `labels[j]` (int, sorted ascending, every class of
    0..num_classes-1 present) is the label of new sample j. Payloads are copied byte for byte; only the
    IRHeader label changes. `replace = (positions, fetch)` gives new samples `positions` (sorted) the
    image bytes `fetch(k)` for the k-th position instead (their header, label included, is kept).
    Returns the size of `train.rec` in bytes.
    """
    from tqdm import tqdm

    origin_index = np.asarray(origin_index, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    n = origin_index.size
    counts = np.bincount(labels, minlength=num_classes) if n else np.zeros(num_classes, np.int64)
    if n == 0 or labels.shape != origin_index.shape or np.any(np.diff(labels) < 0) or \
            counts.size != num_classes or (counts == 0).any():
        raise ValueError("write_recordio: labels must be sorted, one per record, with every class of "
                         f"0..{num_classes - 1} present (found {np.count_nonzero(counts)} classes in {n} records)")
    offsets = layout.image_offsets[origin_index]
    spans = _spans(layout)[origin_index]
    keys = layout.image_keys[origin_index]
    gap = np.r_[-1, offsets[1:] - (offsets + spans)[:-1]]  # source bytes between a record and the one before
    merged = (gap >= 0) & (gap <= GAP_BYTES)
    replace_pos, fetch = replace if replace is not None else (np.zeros(0, np.int64), None)
    out_dir = Path(out_dir)
    header = frame_record(pack(IRHeader(2, [n + 1, n + 1 + num_classes], 0, 0), b""))
    with open(out_dir / "train.rec", "wb", buffering=0) as out, open(out_dir / "train.idx", "w") as idx, \
            open(layout.rec_path, "rb") as src, tqdm(total=n, unit="img", desc=desc, disable=not progress) as bar:
        write_all(out.fileno(), [header])
        idx.write("0\t0\n")
        pos = len(header)
        scratch = bytearray(0)
        for a, b in _chunks(spans + np.where(merged, gap, 0), CHUNK_BYTES):  # bytes read per chunk
            scratch, view, record_at = _read_chunk(src.fileno(), scratch, offsets[a:b], spans[a:b],
                                                   np.r_[False, merged[a + 1:b]], layout.rec_path)
            first, last = np.searchsorted(replace_pos, [a, b])
            replaced = {int(replace_pos[k]) - a: fetch(k) for k in range(first, last)}
            framed, special = _relabel_chunk(view, record_at, spans[a:b], labels[a:b], keys[a:b], offsets[a:b],
                                             layout.rec_path, replaced)
            sizes = _write_chunk(out.fileno(), view, record_at, framed, special)
            record_pos = pos + np.r_[0, np.cumsum(sizes)[:-1]]
            idx.write("".join(f"{k}\t{o}\n" for k, o in zip(range(a + 1, b + 1), record_pos.tolist())))
            pos += int(sizes.sum())
            bar.update(b - a)
        identities = _identity_records(counts)
        size = len(identities) // num_classes
        idx.write("".join(f"{n + 1 + c}\t{pos + c * size}\n" for c in range(num_classes)))
        write_all(out.fileno(), [identities])
    return pos + len(identities)


_IDENTITY_RECORD = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                             ("id2", "<u8"), ("range", "<f4", 2)])


def _identity_records(counts: np.ndarray) -> bytes:
    """The framed identity records (flag 2, label [start, end) of image keys), built at once: Glint360K has 360K.

    Same bytes as `frame_record(pack(IRHeader(2, [start, end], 0, 0), b""))` (checked on the first): no word
    of them can be the magic word, so the writer never splits one.
    """
    ends = np.cumsum(counts) + 1
    table = np.zeros(counts.size, dtype=_IDENTITY_RECORD)
    table["magic"], table["lrec"], table["flag"] = MAGIC, _IDENTITY_RECORD.itemsize - _REC_HEAD_BYTES, 2
    table["range"] = np.stack([ends - counts, ends], 1)
    data = table.tobytes()
    if data[:table.itemsize] != frame_record(pack(IRHeader(2, [int(ends[0] - counts[0]), int(ends[0])], 0, 0), b"")):
        raise RecordIOError("identity record layout differs from utils.recordio's writer (internal error)")
    return data


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class ExportPlan:
    """What the exported folder holds: new sample j is source sample `origin_index[j]` with label `labels[j]`."""
    origin_index: np.ndarray  # int64 (M,)
    labels: np.ndarray  # int64 (M,), sorted ascending
    num_classes: int
    label_table: np.ndarray  # int64 (source classes,): old label -> new label, -1 for identities that vanish
    inputs: dict  # what the manifest records about the selection, label map and relabel file


def _describe(path, what: str, count=None) -> dict:
    info = {"path": os.path.abspath(path), "sha256": file_sha256(path)} if path is not None else {"path": None}
    if count is not None:
        info[what] = count
    return info


def _as_path(value):
    return value if isinstance(value, (str, os.PathLike)) else None


def _load_relabel(path, dataset):
    """(sample indices, suggested labels) of cleaning's relabel.npz, checked against `dataset`."""
    fp = dataset.fingerprint
    rel = load_array(path, fp)
    missing = {"index", "label", "suggested_label"} - set(rel if isinstance(rel, dict) else ())
    if missing:
        raise ArtifactError(f"{path}: expected a relabel.npz with arrays index, label, suggested_label "
                            f"(clean_trainset.py --relabel true); missing {sorted(missing)}")
    order = np.argsort(rel["index"], kind="stable")
    index = rel["index"][order].astype(np.int64)
    if index.size and (index[0] < 0 or index[-1] >= fp.num_images or np.any(np.diff(index) == 0)):
        raise ArtifactError(f"{path}: 'index' must hold distinct sample indices in [0, {fp.num_images})")
    if not np.array_equal(dataset.all_labels[index], rel["label"][order]):
        raise ArtifactError(f"{path}: its 'label' array does not hold this dataset's labels of its samples")
    suggested = rel["suggested_label"][order].astype(np.int64)
    if suggested.size and (suggested.min() < 0 or suggested.max() >= dataset.source_num_classes):
        raise ArtifactError(f"{path}: suggested labels must be in [0, {dataset.source_num_classes})")
    return index, suggested


def plan_export(dataset, kept_index=None, label_map=None, relabel=None) -> ExportPlan:
    """Resolve the selection against `dataset` (a `FaceDataset`); every input is checked before a byte is written.

    `kept_index`: a file (toolkit `.npy` with manifest, or the paper's `kept_index = [...]` text), an array
    of sample indices, or None (every sample). `label_map`: a label-map JSON, a dict, or None (the
    contiguous map of the labels that survive). `relabel`: cleaning's `relabel.npz` (index, label,
    suggested_label) or None; its samples take the suggested label before renumbering.
    """
    from utils.pruning import label_map_for

    fp = dataset.fingerprint
    assigned = dataset.all_labels.copy()  # each sample's label after --relabel, in the source's numbering
    inputs = {"relabel": None}
    if relabel is not None:
        index, suggested = _load_relabel(relabel, dataset)
        assigned[index] = suggested
        inputs["relabel"] = _describe(relabel, "relabelled", int(index.size))

    if kept_index is None:
        kept = np.arange(fp.num_images, dtype=np.int64)
    elif _as_path(kept_index) is not None:
        kept = load_kept_index(kept_index, fp)
    else:
        kept = validate_kept_index(kept_index, fp.num_images)
    inputs["selection"] = _describe(_as_path(kept_index), "kept", int(kept.size))

    if label_map is None:
        label_map = label_map_for(kept, assigned)
        inputs["label_map"] = {"path": None, "derived": "contiguous map of the surviving labels (ascending)"}
    else:
        map_path = _as_path(label_map)
        label_map = load_label_map(map_path, fp) if map_path is not None else dict(label_map)
        inputs["label_map"] = _describe(map_path, "num_classes", len(label_map))
    table = label_map_array(label_map, dataset.source_num_classes)
    new = table[assigned[kept]]
    where = _as_path(inputs["label_map"]["path"]) or "the label map"
    if (new < 0).any():
        i = int(np.flatnonzero(new < 0)[0])
        raise ArtifactError(f"{where}: has no new label for identity {int(assigned[kept[i]])} of kept sample "
                            f"{int(kept[i])} ({int((new < 0).sum())} kept samples unmapped); it does not go with "
                            f"this kept list")
    empty = np.setdiff1d(np.arange(len(label_map)), new)
    if empty.size:
        raise ArtifactError(f"{where}: new label {int(empty[0])} has no kept sample ({empty.size} such labels); the "
                            f"InsightFace layout has no empty identities")
    order = np.argsort(new, kind="stable")
    return ExportPlan(kept[order], new[order], len(label_map), table, inputs)


# ------------------------------------------------------------------------------------------ noise.json
def remap_noise(noise: dict, plan: ExportPlan, source_labels: np.ndarray) -> dict:
    """The source's `noise.json` for the exported samples: surviving samples only, new indices and labels.

    A sample is noisy in the export when its true identity (from the source's ground truth) is not its
    exported label: an open-set outlier stays one, and a flipped sample whose true identity vanished
    becomes one (no class of the export shows it); with --relabel, a sample moved to its true identity
    is clean again and a clean sample moved elsewhere is a flip.
    """
    from utils.noise import noise_record, true_identities

    truth = true_identities(source_labels, noise)[plan.origin_index]
    known = truth >= 0
    true_new = np.full(truth.shape, -1, dtype=np.int64)
    true_new[known] = plan.label_table[truth[known]]
    return noise_record(plan.labels, true_new, noise.get("flip_rate"), noise.get("open_rate"), noise.get("seed"),
                        plan.num_classes)


# ------------------------------------------------------------------------------------------ export
def _dataset_bytes(dataset) -> int:
    if hasattr(dataset, "layout"):
        return sum((dataset.rec_dir / name).stat().st_size for name in ("train.rec", "train.idx"))
    return sum((dataset.root / f).stat().st_size for f in dataset.files)


def _export_image_folder(dataset, plan: ExportPlan, tmp: Path) -> tuple[np.ndarray, dict]:
    """Link (or copy) the kept images into `tmp/<identity>/<file>`; returns (origin index in listing order, modes).

    An identity folder keeps the name of the source identity its new label came from; where those
    names would not sort in new-label order (a label map that reorders, or --relabel), the name gets a
    zero-padded new-label prefix, since `ImageFolderDataset` numbers identities in sorted folder order.
    """
    identities = sorted(d.name for d in dataset.root.iterdir() if d.is_dir())  # as ImageFolderDataset numbers them
    ident_of_file = np.array([f.split("/", 1)[0] for f in dataset.files])
    basename = np.array([f.split("/", 1)[1] for f in dataset.files])
    source_of = np.zeros(plan.num_classes, dtype=np.int64)  # new label -> the source label it renumbers
    mapped = np.flatnonzero(plan.label_table >= 0)
    source_of[plan.label_table[mapped]] = mapped
    names = [identities[old] for old in source_of.tolist()]
    if any(a >= b for a, b in zip(names[:-1], names[1:])):
        width = len(str(plan.num_classes - 1))
        names = [f"{c:0{width}d}_{name}" for c, name in enumerate(names)]
    origin = plan.origin_index
    # A file --relabel moved to another identity is prefixed with the identity it came from (no name clash).
    moved = dataset.all_labels[origin] != source_of[plan.labels]
    files = np.where(moved, np.char.add(np.char.add(ident_of_file[origin], "__"), basename[origin]), basename[origin])
    order = np.lexsort((files, plan.labels))  # the order ImageFolderDataset lists them in
    for name in names:
        (tmp / name).mkdir()
    modes = {link_or_copy(dataset.root / dataset.files[origin[i]], tmp / names[plan.labels[i]] / files[i])
             for i in order.tolist()}
    return origin[order], {"images": " and ".join(sorted(modes))}


def export_dataset(src, kept_index, label_map, dst, relabel=None, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Write the selection of dataset `src` as the dataset folder `dst` (all of it or nothing); returns a summary.

    `src`: a dataset folder, or a `FaceDataset` already opened on one (its own selection is ignored).
    `kept_index`, `label_map`, `relabel`: see `plan_export`. New samples are sorted by new label, stable in
    source order; for an InsightFace-layout source (images contiguous per identity, as in CASIA-WebFace)
    with a label map that keeps the label order (the derived one does), that is exactly the kept order.
    A RecordIO source exports as RecordIO (InsightFace layout), an image folder as an image folder.
    """
    from utils.data import FaceDataset, open_dataset
    from utils.selection import load_noise

    t0 = time.time()
    dataset = src if isinstance(src, FaceDataset) else open_dataset(src)
    src = Path(dataset.rec_dir if hasattr(dataset, "layout") else dataset.root)
    plan = plan_export(dataset, kept_index, label_map, relabel)
    dst = check_destination(src, dst, overwrite)
    noise = load_noise(src)
    is_recordio = hasattr(dataset, "layout")
    try:
        with staged_folder(dst) as tmp:
            if is_recordio:
                write_recordio(dataset.layout, tmp, plan.origin_index, plan.labels, plan.num_classes,
                               progress=progress)
                prop = read_property(src / "property")
                if prop is not None:
                    (tmp / "property").write_text(f"{plan.num_classes},{prop[1]},{prop[2]}\n")
                origin, carried = plan.origin_index, carry_files(src, tmp)
            else:
                origin, carried = _export_image_folder(dataset, plan, tmp)
                carried.update(carry_files(src, tmp, folders=()))  # no ijb/: it would read as an identity
                plan.origin_index = origin  # the listing order (labels stay sorted)
            atomic_save_npy(tmp / ORIGIN_INDEX, origin)
            exported_noise = remap_noise(noise, plan, dataset.all_labels) if noise is not None else None
            if exported_noise is not None:
                atomic_write_json(tmp / NOISE_FILE, exported_noise)
            fingerprint, bytes_after = _written(tmp, plan, is_recordio)
            summary = _summary(src, dst, dataset, plan, bytes_after, carried, exported_noise, t0)
            atomic_write_json(tmp / EXPORT_MANIFEST, _manifest(src, dataset, fingerprint, plan, summary))
    except OSError as exc:
        raise ArtifactError(f"writing {dst} failed: {exc.strerror or exc} ({exc.filename})") from None
    return summary


def _written(tmp: Path, plan: ExportPlan, is_recordio: bool) -> tuple[Fingerprint, int]:
    """(fingerprint, bytes) of the exported dataset, as `open_dataset` will see it (without reading it back)."""
    if is_recordio:
        sizes = [(tmp / name).stat().st_size for name in ("train.rec", "train.idx")]
        return Fingerprint(int(plan.labels.size), plan.num_classes, sizes[1]), sum(sizes)
    from utils.data import ImageFolderDataset

    out = ImageFolderDataset(tmp)
    return out.fingerprint, _dataset_bytes(out)


def _summary(src, dst, dataset, plan, bytes_after, carried, noise, t0) -> dict:
    before = _dataset_bytes(dataset)
    return {
        "out": str(dst), "source": os.path.abspath(src),
        "format": "recordio" if hasattr(dataset, "layout") else "image_folder",
        "images_before": dataset.num_images, "images_after": int(plan.labels.size),
        "identities_before": dataset.source_num_classes, "identities_after": plan.num_classes,
        "bytes_before": before, "bytes_after": bytes_after, "saving_percent": 100.0 * (1 - bytes_after / before),
        "kept_order": bool(np.all(np.diff(plan.origin_index) > 0)),
        "carried": carried, "noise": None if noise is None else
        {"flipped": len(noise["flipped"]), "open_set": len(noise["open_set"])},
        "seconds": time.time() - t0,
    }


def _manifest(src, dataset, fingerprint, plan, summary) -> dict:
    return {
        "stage": "export_trainset", "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "source": {"path": os.path.abspath(src), "fingerprint": dataset.fingerprint.to_dict()},
        "fingerprint": fingerprint.to_dict(), **plan.inputs,
        "counts": {k: summary[k] for k in ("images_before", "images_after", "identities_before", "identities_after")},
        "bytes": {"before": summary["bytes_before"], "after": summary["bytes_after"]},
        "order": "kept order" if summary["kept_order"] else "sorted by new label, stable in source order",
        "carried": summary["carried"], "noise": summary["noise"],
    }


def format_summary(summary: dict) -> str:
    """The lines `export_trainset.py` prints."""
    mb = 1 << 20
    carried = ", ".join(f"{k} ({v})" for k, v in summary["carried"].items()) or "nothing"
    lines = [
        f"exported {summary['source']} -> {summary['out']} ({summary['format']})",
        f"images {summary['images_before']} -> {summary['images_after']}, identities "
        f"{summary['identities_before']} -> {summary['identities_after']}",
        f"bytes {summary['bytes_before'] / mb:.1f} MB -> {summary['bytes_after'] / mb:.1f} MB "
        f"(saving {summary['saving_percent']:.1f}%), in {summary['seconds']:.1f} s",
        f"order: {'the kept order' if summary['kept_order'] else 'sorted by new label (see origin_index.npy)'}; "
        f"carried: {carried}",
    ]
    if summary["noise"] is not None:
        lines.append(f"noise.json remapped: {summary['noise']['flipped']} flipped, "
                     f"{summary['noise']['open_set']} open-set samples survive")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- export_trainset.py
def add_export_args(parser):
    parser.add_argument("--out", default=None, help="dataset folder to create (refused if it exists, unless "
                                                    "--overwrite true)")
    parser.add_argument("--overwrite", default="false", type=str.lower, choices=("true", "false"),
                        help="replace an existing --out folder")
    parser.add_argument("--relabel_file", default=None,
                        help="cleaning's relabel.npz: its samples take the suggested label before renumbering")


def run_export(cfg, ctx, args) -> dict:
    """export_trainset.py: the kept samples of --rec as the new dataset folder --out."""
    from utils.runtime import UserError

    if not args.out:
        raise UserError("--out DST is required: the dataset folder to create")
    if not cfg.kept_index and not args.relabel_file:
        raise UserError("--kept_index FILE is required: a kept list (.npy with its manifest, or the paper's "
                        "'kept_index = [...]' text)")
    summary = export_dataset(cfg.rec, cfg.kept_index or None, cfg.label_map or None, args.out,
                             relabel=args.relabel_file, overwrite=args.overwrite == "true")
    print(format_summary(summary))
    return summary
