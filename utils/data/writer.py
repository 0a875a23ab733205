"""Writing a dataset folder: staged in a temporary folder and renamed into place (complete or absent),
RecordIO records copied byte for byte in bounded chunks, side files linked or copied.

Used by the export (utils/data/export.py) and the noise injection (utils/data/noise.py). The InsightFace layout:
record 0 is the header (flag 2, label [first_identity_key, end_key]), image records 1..N keep their
payload bytes (only the label in the IRHeader changes), then one record per identity whose label is its
[start, end) range of image keys. Records are read in chunks of at most `CHUNK_BYTES` by their byte
offsets and written sequentially, so memory does not grow with the dataset.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.artifacts.files import ArtifactError
from utils.data.recordio import MAGIC, IRHeader, RecordIOError, frame_record, pack, read_record_at, unpack

CHUNK_BYTES = 16 << 20  # source bytes read per chunk: bounds the memory of the copy
GAP_BYTES = 32 << 10  # records this close in the source are read with one call (see _read_chunk)
ORIGIN_INDEX = "origin_index.npy"
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
            payload, _ = read_record_at(io.BytesIO(view[at:at + int(spans[i])]), 0, int(spans[i]), rec_path,
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
        raise RecordIOError("identity record layout differs from utils.data.recordio's writer (internal error)")
    return data
