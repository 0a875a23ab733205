"""Native, byte-compatible MXNet indexed RecordIO (dmlc-core ``recordio``), without mxnet.

Mirrors the part of ``mxnet.recordio`` that face-recognition tools use (``IRHeader``, ``pack``,
``unpack``, ``pack_img``, ``unpack_img``, ``MXRecordIO``, ``MXIndexedRecordIO``), plus
``rebuild_index`` and ``read_layout`` for datasets.

One module over 600 lines on purpose: it is one file format (framing, the magic-word split, headers, image
payloads, the index and the dataset layout), read and written by the same few functions; split, each part would
import the others' private framing details.

On disk, every record is::

    uint32 magic = 0xced7230a | uint32 lrec = (cflag << 29) | length | payload | zero pad to 4 bytes

(little-endian). The dmlc writer never lets the magic word appear at a 4-byte-aligned position
inside a record: where the payload holds it at aligned offset ``i`` the record is split there, the
magic bytes are dropped and the parts are flagged ``cflag`` 1 (first), 2 (middle), 3 (last); an
unsplit record has ``cflag`` 0. Readers re-insert the magic word between parts. That lets a reader
resynchronise on any aligned magic word, and it is why a reader must rejoin parts.

The ``.idx`` file is text, one ``key<TAB>byte_offset`` line per record.

A payload packed by ``pack`` starts with the 24-byte ``IRHeader`` (``struct 'IfQQ'``: flag, label,
id, id2); when the label is a vector, ``flag`` is its length, the header's label field is 0 and the
float32 label vector follows the header.
"""
from __future__ import annotations

import argparse
import numbers
import os
import struct
import sys
import warnings
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from utils.artifacts.files import Fingerprint, atomic_write_text
from utils.errors import ToolkitError

__all__ = [
    "MAGIC", "IRHeader", "RecordIOError", "RecordLayout", "MXRecordIO", "MXIndexedRecordIO",
    "pack", "unpack", "pack_img", "unpack_img", "frame_record", "read_index", "rebuild_index",
    "read_layout",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_REC_HEAD = struct.Struct("<II")  # magic, lrec
# mxnet uses native 'IfQQ'; on the little-endian machines it runs on that is exactly '<IfQQ' (24 bytes).
_IR_HEAD = struct.Struct("<IfQQ")
_IR_SIZE = _IR_HEAD.size
# cflag values of the dmlc writer.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """Header of a packed record: flag (label vector length, 0 for a scalar label),
label (float, or float32 array when flag > 0), id and id2 (uint64)."""


class MissingRecordFile(ToolkitError, FileNotFoundError):
    """A .rec or .idx file that is not there (also a FileNotFoundError, as mxnet raises)."""


class RecordIOError(ToolkitError, ValueError):
    """A RecordIO file or its index does not hold what it should (messages name file, key, byte offset)."""


def _where(path, key=None, offset=None, part_offset=None) -> str:
    """'file x.rec, key 5, byte offset 1234' — the location part of every error message."""
    parts = [f"file {os.fspath(path)!r}"]
    if key is not None:
        parts.append(f"key {_key_text(key)}")
    if offset is not None:
        parts.append(f"byte offset {int(offset)}")
    if part_offset is not None and part_offset != offset:
        parts.append(f"part at byte offset {int(part_offset)}")
    return ", ".join(parts)


def _key_text(key) -> str:
    return repr(key.item() if isinstance(key, np.generic) else key)  # 'key 5', not 'key np.int64(5)'


def _padded(length: int) -> int:
    return (length + 3) & ~3


# --------------------------------------------------------------------------------------------
# Records: framing (dmlc) and packing (mxnet)
# --------------------------------------------------------------------------------------------

def frame_record(payload) -> bytes:
    """The exact bytes dmlc-core's ``RecordIOWriter::WriteRecord`` writes for one payload."""
    data = bytes(memoryview(payload))
    size = len(data)
    if size > _LENGTH_MASK:
        raise RecordIOError(f"RecordIO records must be shorter than 2**29 bytes, got {size} bytes")
    # Aligned occurrences of the magic word are where dmlc splits the record.
    words = np.frombuffer(data, dtype="<u4", count=size // 4) if size >= 4 else np.zeros(0, "<u4")
    split_at = (np.flatnonzero(words == MAGIC) * 4).tolist()
    pad = b"\0" * (_padded(size) - size)
    if not split_at:
        return _REC_HEAD.pack(MAGIC, size) + data + pad
    chunks = []
    start = 0
    for i in split_at:
        # Parts before the last end at an aligned offset, so they need no padding.
        cflag = _FIRST if start == 0 else _MIDDLE
        chunks += [_REC_HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | (i - start)), data[start:i]]
        start = i + 4
    chunks += [_REC_HEAD.pack(MAGIC, (_LAST << _LENGTH_BITS) | (size - start)), data[start:], pad]
    return b"".join(chunks)


def read_record_at(f, offset: int, file_size: int, path, key=None) -> Tuple[bytes, int]:
    """Read the (possibly split) record that starts at ``offset`` of the binary file ``f``.

    Returns the payload with split parts rejoined, and the byte offset just past the record.
    """
    if offset < 0 or offset + _REC_HEAD.size > file_size:
        raise RecordIOError(f"record offset beyond the end of the file (size {file_size} bytes): "
                            f"{_where(path, key, offset)}")
    chunks = []
    pos = offset
    f.seek(pos)
    while True:
        head = f.read(_REC_HEAD.size)
        if len(head) < _REC_HEAD.size:
            raise RecordIOError(f"truncated file: expected an 8-byte record header, found {len(head)} bytes "
                                f"before the end of the file: {_where(path, key, offset, pos)}")
        magic, lrec = _REC_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"bad magic word 0x{magic:08x} (expected 0x{MAGIC:08x}); the file is corrupt "
                                f"or the index does not belong to it: {_where(path, key, offset, pos)}")
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        allowed = (_WHOLE, _FIRST) if pos == offset else (_MIDDLE, _LAST)
        if cflag not in allowed:
            raise RecordIOError(f"unexpected continuation flag {cflag} (expected one of {allowed}); the offset "
                                f"points into a split record or the file is corrupt: "
                                f"{_where(path, key, offset, pos)}")
        body = f.read(_padded(length))
        if len(body) < _padded(length):
            raise RecordIOError(f"truncated file: the record needs {_padded(length)} bytes after its header, "
                                f"found {len(body)}: {_where(path, key, offset, pos)}")
        chunks.append(body[:length] if length != len(body) else body)
        pos += _REC_HEAD.size + len(body)
        if cflag in (_WHOLE, _LAST):
            break
        chunks.append(_MAGIC_BYTES)  # the writer dropped it where it split
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), pos


def pack(header, payload) -> bytes:
    """Prepend ``header`` (an ``IRHeader`` or 4-tuple) to ``payload``, exactly as ``mxnet.recordio.pack``.

    A scalar label is stored in the header (flag forced to 0); a sequence/array label is stored as a
    float32 vector in front of the payload, with flag = its length and the header's label = 0.
    """
    header = IRHeader(*header)
    payload = bytes(memoryview(payload))
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.ascontiguousarray(header.label, dtype=np.float32)
        header = header._replace(flag=label.size, label=0)
        payload = label.tobytes() + payload
    return _IR_HEAD.pack(*header) + payload


def unpack(record) -> Tuple[IRHeader, bytes]:
    """Split a packed record into ``(IRHeader, payload)``; the label is a float32 array when flag > 0."""
    record = bytes(memoryview(record))
    if len(record) < _IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    header = IRHeader(*_IR_HEAD.unpack_from(record, 0))
    if header.flag == 0:
        return header, record[_IR_SIZE:]
    end = _IR_SIZE + 4 * header.flag
    if len(record) < end:
        raise RecordIOError(f"record of {len(record)} bytes cannot hold the IRHeader and the "
                            f"{header.flag}-element label vector its flag announces ({end} bytes)")
    label = np.frombuffer(record, dtype="<f4", count=header.flag, offset=_IR_SIZE).astype(np.float32)
    return header._replace(label=label), record[end:]


def _cv2():
    import cv2  # imported here so that label-only users (read_layout) do not pay for OpenCV
    return cv2


def pack_img(header, img, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode an image with OpenCV and ``pack`` it with ``header``.

    ``img`` is an **RGB** uint8 array of shape (H, W, 3) (or (H, W) grayscale). Unlike
    ``mxnet.recordio.pack_img``, which takes OpenCV's BGR order, this takes RGB, so that
    ``unpack_img(pack_img(h, img))`` gives ``img`` back (exactly for PNG). The bytes on disk are the
    same as mxnet's for the same picture. ``quality`` is the JPEG quality (0-100) for '.jpg'/'.jpeg',
    and the PNG compression level for '.png' (clamped to 0-9, as OpenCV does with mxnet's default 95).
    """
    cv2 = _cv2()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"pack_img expects a uint8 image, got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
    elif img.ndim != 2:
        raise ValueError(f"pack_img expects an RGB (H, W, 3) or grayscale (H, W) image, got shape {img.shape}")
    fmt = img_fmt.lower()
    if fmt in (".jpg", ".jpeg"):
        if not 0 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 0..100, got {quality}")
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, min(max(int(quality), 0), 9)]
    else:
        params = []
    ok, buf = cv2.imencode(img_fmt, np.ascontiguousarray(img), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {img.shape} image as {img_fmt!r}")
    return pack(header, buf.tobytes())


def unpack_img(record, *, where: Optional[str] = None) -> Tuple[IRHeader, np.ndarray]:
    """``unpack`` a record and decode its image: returns ``(IRHeader, RGB uint8 array (H, W, 3))``.

    Decodes with ``cv2.imdecode(IMREAD_COLOR)`` (grayscale images come back with 3 equal channels).
    ``where`` (e.g. "train.rec key 17") goes into the error raised when the payload is not an image.
    """
    cv2 = _cv2()
    header, payload = unpack(record)
    where = f" ({where})" if where else ""
    if not payload:
        raise RecordIOError(f"record has no image payload{where}")
    try:
        bgr = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise RecordIOError(f"OpenCV failed to decode the {len(payload)}-byte image payload{where}: "
                            f"{exc}") from exc
    if bgr is None:
        raise RecordIOError(f"the {len(payload)}-byte payload is not an image OpenCV can decode{where}")
    return header, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _missing_index_message(idx_path, rec_path) -> str:
    return (f"index file {os.fspath(idx_path)!r} is missing; rebuild it from {os.fspath(rec_path)!r} with "
            f"`python -m utils.data.recordio rebuild-index {os.fspath(rec_path)}` "
            f"(or utils.data.recordio.rebuild_index / read_layout(..., rebuild_missing_index=True))")


def _parse_index_lines(text: str, idx_path, key_type):
    """Line-by-line parser: any key type, and the exact line number when a line is malformed."""
    keys, offsets = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # a blank line (e.g. a trailing one) holds no record
        fields = line.strip().split("\t")
        if len(fields) == 1:
            fields = fields[0].split()
        if len(fields) != 2:
            raise RecordIOError(f"{os.fspath(idx_path)!r} line {lineno}: expected 'key<TAB>offset', got {line!r}")
        try:
            key, offset = key_type(fields[0]), int(fields[1])
        except ValueError as exc:
            raise RecordIOError(f"{os.fspath(idx_path)!r} line {lineno}: cannot parse {line!r}: {exc}") from exc
        keys.append(key)
        offsets.append(offset)
    return keys, offsets


def read_index(idx_path, rec_path=None) -> Tuple[np.ndarray, np.ndarray]:
    """Integer keys and byte offsets of a ``.idx`` file, as int64 arrays in file order.

    Raises ``FileNotFoundError`` (saying how to rebuild it) when the file is missing and
    ``RecordIOError`` naming the line when a line is malformed or a key repeats.
    """
    if not os.path.isfile(idx_path):
        raise MissingRecordFile(_missing_index_message(idx_path, rec_path or Path(idx_path).with_suffix(".rec")))
    with open(idx_path, "rb") as f:
        data = f.read()
    tokens = data.split()
    try:
        # Vectorised parse; any irregular line sends us to the slow parser for a precise message.
        lines = data.splitlines()
        if len(tokens) != 2 * (len(lines) - lines.count(b"")):
            raise ValueError("not two fields per line")
        pairs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        keys, offsets = _parse_index_lines(data.decode("utf-8", errors="replace"), idx_path, int)
        pairs = np.array([keys, offsets], dtype=np.int64).T.reshape(-1, 2)
    keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
    _check_unique_keys(keys, idx_path)
    return keys, offsets


def _check_unique_keys(keys: np.ndarray, idx_path) -> None:
    if keys.size < 2:
        return
    order = np.argsort(keys, kind="stable")
    dup = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    if dup.size:
        line = int(order[dup[0] + 1]) + 1
        raise RecordIOError(f"{os.fspath(idx_path)!r} line {line}: key {int(keys[order[dup[0]]])} appears more "
                            f"than once ({dup.size} repeated keys in all)")


class MXRecordIO:
    """Sequential RecordIO reader (``flag='r'``) or writer (``flag='w'``), like ``mxnet.recordio.MXRecordIO``.

    Readers open their file lazily in each process (a handle inherited through ``fork``, e.g. by a
    DataLoader worker, is replaced on first use) and pickle without their handle, so one reader object
    can be handed to many worker processes. Writers are tied to the process that created them.
    """

    def __init__(self, uri, flag: str):
        if flag not in ("r", "w"):
            raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
        self.uri = os.fspath(uri)
        self.flag = flag
        self.writable = flag == "w"
        self.is_open = False
        self._file = None
        self._pid = None
        self._size = 0
        self._pos = 0
        self.open()

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Open (or re-open) the file; a reader starts at offset 0."""
        self._pos = 0
        if self.writable:
            self._file = open(self.uri, "wb", buffering=0)  # unbuffered: nothing for a forked child to flush twice
            self._pid = os.getpid()
        else:
            os.stat(self.uri)  # fail now (FileNotFoundError) rather than in a worker process
        self.is_open = True

    def close(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def reset(self) -> None:
        """Close and re-open (a reader goes back to the first record; a writer truncates the file)."""
        self.close()
        self.open()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        if getattr(self, "is_open", False):
            self.close()

    def __getstate__(self):
        if self.writable:
            raise TypeError(f"a RecordIO writer ({self.uri!r}) cannot be pickled; pickle a reader instead")
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- handles ---------------------------------------------------------------------------
    def _reader_file(self):
        if not self.is_open:
            raise RecordIOError(f"{self.uri!r} is closed")
        if self.writable:
            raise RecordIOError(f"{self.uri!r} is open for writing ('w'); reading needs flag 'r'")
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # After fork the parent's handle shares its file position with the parent: never use it.
            self._file = open(self.uri, "rb")
            self._pid = pid
            self._size = os.fstat(self._file.fileno()).st_size
        return self._file

    def _writer_file(self):
        if not self.is_open:
            raise RecordIOError(f"{self.uri!r} is closed")
        if not self.writable:
            raise RecordIOError(f"{self.uri!r} is open for reading ('r'); writing needs flag 'w'")
        if self._pid != os.getpid():
            raise RecordIOError(f"{self.uri!r} was opened for writing in process {self._pid} and cannot be "
                                f"written from process {os.getpid()}")
        return self._file

    # -- I/O -------------------------------------------------------------------------------
    def write(self, buf) -> None:
        """Append one record (any bytes-like payload, usually from ``pack``)."""
        f = self._writer_file()
        data = memoryview(frame_record(buf))
        while data:  # a raw write may be partial
            data = data[f.write(data):]

    def read(self) -> Optional[bytes]:
        """The next record's payload, or None at the end of the file."""
        return self._read_next(key=None)

    def _read_next(self, key):
        f = self._reader_file()
        if key is None and self._pos == self._size:
            return None
        record, self._pos = read_record_at(f, self._pos, self._size, self.uri, key)
        return record

    def tell(self) -> int:
        """Byte offset of the next record to read or write."""
        if self.writable:
            return self._writer_file().tell()
        if not self.is_open:
            raise RecordIOError(f"{self.uri!r} is closed")
        return self._pos

    def seek(self, pos: int) -> None:
        """Move a reader to byte offset ``pos`` (the start of a record)."""
        self._reader_file()
        self._pos = int(pos)


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a ``.idx`` of ``key<TAB>offset`` lines, like ``mxnet.recordio.MXIndexedRecordIO``.

    ``keys`` lists the keys in index order and ``idx`` maps key -> byte offset. A writer keeps the
    index in memory and writes the ``.idx`` atomically on ``close()``. ``seek`` takes a key, as in mxnet.
    """

    def __init__(self, idx_path, uri, flag: str, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.idx = {}
        self.keys = []
        super().__init__(uri, flag)

    def open(self) -> None:
        if self.flag == "w" and os.path.exists(self.idx_path):
            # A stale index beside a new .rec would point at the wrong bytes until close() rewrites it.
            os.remove(self.idx_path)
        super().open()
        self.idx, self.keys = {}, []
        if self.writable:
            return
        if self.key_type is int:
            keys, offsets = read_index(self.idx_path, self.uri)
            self.keys = keys.tolist()
            self.idx = dict(zip(self.keys, offsets.tolist()))
            return
        if not os.path.isfile(self.idx_path):
            raise MissingRecordFile(_missing_index_message(self.idx_path, self.uri))
        with open(self.idx_path, "r") as f:
            keys, offsets = _parse_index_lines(f.read(), self.idx_path, self.key_type)
        self.keys, self.idx = keys, dict(zip(keys, offsets))
        if len(self.idx) != len(self.keys):
            raise RecordIOError(f"{self.idx_path!r}: {len(self.keys) - len(self.idx)} keys appear more than once")

    def close(self) -> None:
        if self.is_open and self.writable and self._pid == os.getpid():
            atomic_write_text(self.idx_path, "".join(f"{k}\t{self.idx[k]}\n" for k in self.keys))
        super().close()

    def _offset(self, key) -> int:
        try:
            return self.idx[key]
        except KeyError:
            raise RecordIOError(f"key {_key_text(key)} is not in the index "
                                f"{self.idx_path!r} ({len(self.keys)} keys) of file {self.uri!r}") from None

    def seek(self, idx) -> None:
        """Move the read position to the record with key ``idx`` (mxnet semantics)."""
        self._reader_file()
        self._pos = self._offset(idx)

    def read_idx(self, idx) -> bytes:
        """The payload of the record with key ``idx``."""
        self._reader_file()
        self._pos = self._offset(idx)
        return self._read_next(key=idx)

    def read_img(self, idx) -> Tuple[IRHeader, np.ndarray]:
        """``unpack_img`` of the record with key ``idx``; errors name this file and key."""
        return unpack_img(self.read_idx(idx), where=_where(self.uri, idx))

    def write_idx(self, idx, buf) -> None:
        """Append a record under key ``idx``."""
        key = self.key_type(idx)
        if key in self.idx:
            raise RecordIOError(f"key {key!r} was already written to {self.uri!r}")
        pos = self.tell()
        self.write(buf)
        self.idx[key] = pos
        self.keys.append(key)


# --------------------------------------------------------------------------------------------
# Index rebuild and dataset layout
# --------------------------------------------------------------------------------------------

def _scan_record_offsets(rec_path, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Byte offsets of every record (split parts joined) of ``rec_path``, reading large chunks."""
    offsets = []
    with open(rec_path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf, base = b"", 0
        pos, start = 0, None  # start: offset of the split record being scanned, if any
        while pos < size:
            rel = pos - base
            if rel + _REC_HEAD.size > len(buf):
                f.seek(pos)
                buf, base, rel = f.read(chunk_bytes), pos, 0
                if len(buf) < _REC_HEAD.size:
                    raise RecordIOError(f"truncated file: {len(buf)} stray bytes where a record header should "
                                        f"start: {_where(rec_path, len(offsets), pos)}")
            magic, lrec = _REC_HEAD.unpack_from(buf, rel)
            if magic != MAGIC:
                raise RecordIOError(f"bad magic word 0x{magic:08x} (expected 0x{MAGIC:08x}) at record number "
                                    f"{len(offsets)}: {_where(rec_path, None, pos)}")
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            if (cflag in (_WHOLE, _FIRST)) != (start is None):
                raise RecordIOError(f"unexpected continuation flag {cflag} at record number {len(offsets)}: "
                                    f"{_where(rec_path, None, start if start is not None else pos, pos)}")
            nxt = pos + _REC_HEAD.size + _padded(length)
            if nxt > size:
                raise RecordIOError(f"truncated file: the record needs {_padded(length)} bytes after its header, "
                                    f"the file ends {size - pos - _REC_HEAD.size} bytes after it: "
                                    f"{_where(rec_path, len(offsets), start if start is not None else pos, pos)}")
            if cflag == _FIRST:
                start = pos
            elif cflag in (_WHOLE, _LAST):
                offsets.append(pos if start is None else start)
                start = None
            pos = nxt
        if start is not None:
            raise RecordIOError(f"truncated file: a split record has no last part: "
                                f"{_where(rec_path, len(offsets), start)}")
    return np.asarray(offsets, dtype=np.int64)


def rebuild_index(rec_path, idx_path=None) -> int:
    """Scan ``rec_path`` and (re)write its ``.idx`` with keys 0..n-1 in file order, as im2rec does.

    ``idx_path`` defaults to ``rec_path`` with suffix ``.idx``. Written atomically. Returns n.
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    offsets = _scan_record_offsets(rec_path)
    atomic_write_text(idx_path, "".join(f"{k}\t{o}\n" for k, o in enumerate(offsets.tolist())))
    return int(offsets.size)


@dataclass(frozen=True, eq=False)
class RecordLayout:
    """What a dataset folder holds, read from the record headers only (no image is decoded).

    ``image_keys[i]``, ``image_offsets[i]`` and ``labels[i]`` describe sample index ``i`` (the i-th
    image record). ``identity_ranges[c] = [start_key, end_key)`` of identity record ``c`` (InsightFace
    layout only). ``image_size`` is ``(height, width)`` from the ``property`` file, when present.
    """
    rec_path: Path
    idx_path: Path
    layout: str  # 'insightface' or 'plain'
    image_keys: np.ndarray  # int64 (num_images,)
    image_offsets: np.ndarray  # int64 (num_images,), byte offsets in rec_path
    labels: np.ndarray  # int64 (num_images,)
    num_classes: int
    image_size: Optional[Tuple[int, int]]
    identity_ranges: Optional[np.ndarray]  # int64 (num_identity_records, 2) or None
    idx_size: int  # bytes of the .idx file, part of the dataset fingerprint

    @property
    def num_images(self) -> int:
        return int(self.image_keys.size)

    @property
    def fingerprint(self) -> Fingerprint:
        """The dataset fingerprint every stage records in its manifests: images, classes, size of the .idx."""
        return Fingerprint(self.num_images, int(self.num_classes), int(self.idx_size))


def read_property(path: Path) -> Optional[Tuple[int, int, int]]:
    """``(num_classes, height, width)`` from an InsightFace ``property`` file, or None when absent."""
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise RecordIOError(f"{os.fspath(path)!r}: expected 'num_classes,height,width', got {text!r}")
    return values


class _KeyLookup:
    """Vectorised key -> byte offset over the integer keys of an index."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, idx_path):
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        self.offsets = offsets
        self.idx_path = idx_path

    def __contains__(self, key) -> bool:
        i = np.searchsorted(self.sorted_keys, key)
        return bool(i < self.sorted_keys.size and self.sorted_keys[i] == key)

    def offsets_of(self, wanted: np.ndarray, what: str) -> np.ndarray:
        n = self.sorted_keys.size
        pos = np.searchsorted(self.sorted_keys, wanted)
        pos_c = np.minimum(pos, max(n - 1, 0))
        found = (pos < n) & (self.sorted_keys[pos_c] == wanted) if n else np.zeros(wanted.shape, bool)
        if not found.all():
            missing = wanted[~found]
            raise RecordIOError(f"{os.fspath(self.idx_path)!r} has no key {int(missing[0])} for {what} "
                                f"({missing.size} of keys {int(wanted[0])}..{int(wanted[-1])} missing)")
        return self.offsets[self.order[pos_c]]


def _gather_header_labels(words, file_size, keys, offsets, rec_path, width, read_record):
    """``(flag, labels)`` of the records at ``offsets``, reading only their header bytes from ``words``.

    ``words`` is the .rec memory-mapped as little-endian uint32 (records start 4-byte aligned).
    ``labels`` is float64 (N, width): column 0 holds the scalar label when flag == 0, else label
    vector element 0; column j > 0 holds vector element j where flag > j, NaN elsewhere. Records the
    writer split (cflag != 0) are read whole with ``read_record(key, offset)``.
    """
    n = offsets.size
    flags = np.zeros(n, np.int64)
    labels = np.full((n, width), np.nan)
    if n == 0:
        return flags, labels

    def fail(mask, message):
        i = int(np.flatnonzero(mask)[0])
        raise RecordIOError(f"{message} ({int(mask.sum())} of {n} records): "
                            f"{_where(rec_path, int(keys[i]), int(offsets[i]))}")

    bad = (offsets < 0) | (offsets % 4 != 0) | (offsets + _REC_HEAD.size > file_size)
    if bad.any():
        fail(bad, f"record offset not 4-byte aligned or beyond the end of the file (size {file_size} bytes)")
    w = offsets // 4
    last = words.size - 1

    def at(word_index):
        return words[np.minimum(word_index, last)]

    magic, lrec = words[w], words[w + 1]
    if (magic != MAGIC).any():
        fail(magic != MAGIC, f"bad magic word (expected 0x{MAGIC:08x}); the file is corrupt or the index "
                             f"does not belong to it")
    cflag = (lrec >> _LENGTH_BITS).astype(np.int64)
    length = (lrec & _LENGTH_MASK).astype(np.int64)
    if (cflag > _FIRST).any():
        fail(cflag > _FIRST, "the offset points into the middle of a split record")
    truncated = offsets + _REC_HEAD.size + ((length + 3) & ~3) > file_size
    if truncated.any():
        fail(truncated, "truncated file: the record runs past the end of the file")
    whole = cflag == _WHOLE
    if (whole & (length < _IR_SIZE)).any():
        fail(whole & (length < _IR_SIZE), f"record shorter than the {_IR_SIZE}-byte IRHeader")

    flags[:] = at(w + 2)
    scalar = at(w + 3).view("<f4")
    if (whole & (length < _IR_SIZE + 4 * flags)).any():
        fail(whole & (length < _IR_SIZE + 4 * flags), "record too short for the label vector its flag announces")
    labels[:, 0] = np.where(flags > 0, at(w + 8).view("<f4"), scalar)
    for j in range(1, width):
        labels[:, j] = np.where(flags > j, at(w + 8 + j).view("<f4"), np.nan)

    for i in np.flatnonzero(~whole):  # split records are rare: read them the ordinary way
        header, _ = unpack(read_record(int(keys[i]), int(offsets[i])))
        flags[i] = header.flag
        vector = np.atleast_1d(np.asarray(header.label, dtype=np.float64))
        labels[i] = np.nan
        labels[i, :min(width, vector.size)] = vector[:width]
    return flags, labels


def _as_int_labels(values: np.ndarray, keys: np.ndarray, offsets: np.ndarray, rec_path, what: str) -> np.ndarray:
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RecordIOError(f"{what} must be non-negative whole numbers, found {values[i]!r} "
                            f"({int(bad.sum())} bad values): {_where(rec_path, int(keys[i]), int(offsets[i]))}")
    return values.astype(np.int64)


def read_layout(rec_dir, *, rebuild_missing_index: bool = False, layout: Optional[str] = None,
                name: str = "train") -> RecordLayout:
    """Keys, labels and identity ranges of the dataset in ``rec_dir`` (``train.rec/.idx``, ``property``).

    ``layout`` is detected as InsightFace does (record 0 with flag > 0 and no payload is a header)
    unless given as 'insightface' or 'plain'. Labels come from the record headers only, gathered
    for all records at once from a memory map of the .rec. A missing .idx raises ``FileNotFoundError`` unless
    ``rebuild_missing_index`` (then it is rebuilt like im2rec would, keys 0..n-1).
    """
    if layout not in (None, "insightface", "plain"):
        raise ValueError(f"layout must be None, 'insightface' or 'plain', got {layout!r}")
    rec_dir = Path(rec_dir)
    rec_path, idx_path = rec_dir / f"{name}.rec", rec_dir / f"{name}.idx"
    if not rec_path.is_file():
        raise MissingRecordFile(f"record file {os.fspath(rec_path)!r} not found")
    if not idx_path.is_file() and rebuild_missing_index:
        rebuild_index(rec_path, idx_path)
    keys, offsets = read_index(idx_path, rec_path)
    idx_size = idx_path.stat().st_size
    prop = read_property(rec_dir / "property")
    lookup = _KeyLookup(keys, offsets, idx_path)
    file_size = rec_path.stat().st_size
    words = (np.memmap(rec_path, dtype="<u4", mode="r", shape=(file_size // 4,)) if file_size >= 4
             else np.zeros(0, "<u4"))

    with open(rec_path, "rb") as rec_file:
        def read_record(key, offset):
            return read_record_at(rec_file, offset, file_size, rec_path, key)[0]

        header0 = None
        if 0 in lookup:
            offset0 = int(lookup.offsets_of(np.zeros(1, np.int64), "the header record")[0])
            header0, payload0 = unpack(read_record(0, offset0))
        if layout is None:
            # InsightFace's rule (record 0 with flag > 0 is the header), except that a header never carries
            # a payload: record 0 with a vector label and an image is a plain dataset's first image.
            layout = "insightface" if header0 is not None and header0.flag > 0 and not payload0 else "plain"

        identity_ranges = None
        if layout == "insightface":
            if header0 is None or header0.flag < 2:
                raise RecordIOError(f"InsightFace layout needs record 0 to be a header with label "
                                    f"[first_identity_key, end_key], found "
                                    f"{'no key 0' if header0 is None else f'flag {header0.flag}'}: "
                                    f"{_where(rec_path, 0)} (index {os.fspath(idx_path)!r})")
            if payload0:
                raise RecordIOError(f"record 0 has flag {header0.flag} like an InsightFace header but also a "
                                    f"{len(payload0)}-byte payload, so it is not one: "
                                    f"{_where(rec_path, 0, offset0)}")
            bounds = header0.label[:2].astype(np.float64)
            integral = bool(np.all(np.isfinite(bounds)) and np.all(bounds == np.round(bounds)))
            first_id, end = (int(v) for v in bounds) if integral else (0, -1)
            if not 1 <= first_id <= end:
                raise RecordIOError(f"header record label {header0.label.tolist()} is not "
                                    f"[first_identity_key, end_key] with 1 <= first <= end: "
                                    f"{_where(rec_path, 0, offset0)}")
            image_keys = np.arange(1, first_id, dtype=np.int64)
            identity_keys = np.arange(first_id, end, dtype=np.int64)
            image_offsets = lookup.offsets_of(image_keys, f"an image record (header says 1..{first_id - 1})")
            identity_offsets = lookup.offsets_of(identity_keys,
                                                 f"an identity record (header says {first_id}..{end - 1})")
            id_flags, id_labels = _gather_header_labels(words, file_size, identity_keys, identity_offsets,
                                                        rec_path, 2, read_record)
            if (id_flags < 2).any():
                i = int(np.flatnonzero(id_flags < 2)[0])
                raise RecordIOError(f"identity record has flag {int(id_flags[i])}, expected a label vector "
                                    f"[start, end) (flag >= 2): "
                                    f"{_where(rec_path, int(identity_keys[i]), int(identity_offsets[i]))}")
            identity_ranges = _as_int_labels(id_labels, identity_keys, identity_offsets, rec_path,
                                             "identity record labels [start, end)")
            _check_identity_ranges(identity_ranges, first_id, identity_keys, identity_offsets, rec_path)
        else:
            image_keys, image_offsets = keys, offsets

        _, image_labels = _gather_header_labels(words, file_size, image_keys, image_offsets, rec_path, 1,
                                                read_record)
    del words  # release the memory map
    labels = _as_int_labels(image_labels[:, 0], image_keys, image_offsets, rec_path, "image labels")

    if identity_ranges is not None and identity_ranges.shape[0] > 0:
        num_classes = int(identity_ranges.shape[0])
    elif prop is not None:
        num_classes = prop[0]
    else:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if prop is not None and prop[0] != num_classes:
        raise RecordIOError(f"{os.fspath(rec_dir / 'property')!r} says {prop[0]} classes but {rec_path!s} has "
                            f"{num_classes} identity records")
    too_big = labels >= num_classes
    if too_big.any():
        i = int(np.flatnonzero(too_big)[0])
        raise RecordIOError(f"image label {int(labels[i])} is not below num_classes={num_classes} "
                            f"({int(too_big.sum())} such images): "
                            f"{_where(rec_path, int(image_keys[i]), int(image_offsets[i]))}")
    if identity_ranges is not None and identity_ranges.shape[0] > 0:
        implied = np.repeat(np.arange(num_classes), identity_ranges[:, 1] - identity_ranges[:, 0])
        if not np.array_equal(implied, labels):
            i = int(np.flatnonzero(implied != labels)[0])
            warnings.warn(f"{rec_path}: {int((implied != labels).sum())} image labels differ from the identity "
                          f"record that holds them, e.g. key {int(image_keys[i])} has label {int(labels[i])} in "
                          f"identity record {int(implied[i])}; using the labels in the image headers",
                          stacklevel=2)

    return RecordLayout(rec_path=rec_path, idx_path=idx_path, layout=layout, image_keys=image_keys,
                        image_offsets=image_offsets, labels=labels, num_classes=num_classes,
                        image_size=(prop[1], prop[2]) if prop is not None else None,
                        identity_ranges=identity_ranges, idx_size=int(idx_size))


def _check_identity_ranges(ranges, first_id, identity_keys, identity_offsets, rec_path) -> None:
    """Identity ranges must tile the image keys 1..first_id-1 in order, each non-empty."""
    if ranges.shape[0] == 0:
        return
    expected_start = np.concatenate([[1], ranges[:-1, 1]])
    bad = (ranges[:, 0] != expected_start) | (ranges[:, 1] <= ranges[:, 0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RecordIOError(f"identity record range {ranges[i].tolist()} does not continue the previous one "
                            f"(expected a non-empty range starting at {int(expected_start[i])}): "
                            f"{_where(rec_path, int(identity_keys[i]), int(identity_offsets[i]))}")
    if ranges[-1, 1] != first_id:
        raise RecordIOError(f"identity ranges end at key {int(ranges[-1, 1])} but the header says image keys end "
                            f"at {first_id - 1}: "
                            f"{_where(rec_path, int(identity_keys[-1]), int(identity_offsets[-1]))}")


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.data.recordio", description="RecordIO maintenance.")
    sub = parser.add_subparsers(dest="command", required=True)
    rebuild = sub.add_parser("rebuild-index", help="rewrite X.idx from X.rec (keys 0..n-1 in file order)")
    rebuild.add_argument("rec", help="a .rec file, or a dataset folder holding train.rec")
    args = parser.parse_args(argv)
    rec = Path(args.rec)
    if rec.is_dir():
        rec = rec / "train.rec"
    try:
        n = rebuild_index(rec)
    except (OSError, RecordIOError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {rec.with_suffix('.idx')} ({n} records)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
