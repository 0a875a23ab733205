"""Blocks of samples: read the training records a chunk at a time, and compute a chunk on every core.

The top-k records of a Glint360K-size run (17.1M samples x 20 epochs x top 10) are 21 GB, more than the
memory of the machines that prune them. `iter_chunks` reads (epochs, samples, ...) arrays a chunk of
samples at a time. An array that is a read-only memory map or a view of one (`utils.artifacts.records.open_npz`,
`open_npy`) is read with plain file reads, one contiguous run per epoch, by a background thread while the
caller computes the previous chunk: the reads are large and sequential, and the bytes read stay in the
operating system's page cache instead of the process (touching a memory map's pages counts them in the
process's resident memory). Other arrays are sliced. `for_each_block` then runs a function over blocks of
a chunk on threads (numpy releases the GIL in sorts and array arithmetic, the compiled kernels throughout).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from utils.errors import InputError

__all__ = ["CHUNK_BYTES", "for_each_block", "iter_chunks", "chunk_samples", "file_region"]

CHUNK_BYTES = 64 << 20  # bytes of records per chunk (two are in memory: one computed, one being read)


def for_each_block(fn: Callable[[int, int], None], n: int, chunk: int, max_workers: int = 8) -> None:
    """Call fn(a, b) for every block [a, b) of range(n) in steps of `chunk`, on up to `max_workers` threads
    (one per core). Blocks must write disjoint outputs. The first error, in block order, is raised after the
    blocks not yet started are cancelled."""
    starts = range(0, n, max(1, chunk))
    workers = max(1, min(len(starts), os.cpu_count() or 1, max_workers))

    def block(a):
        fn(a, min(n, a + chunk))

    if workers == 1:
        for a in starts:
            block(a)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for _ in pool.map(block, starts):
                pass
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def file_region(arr) -> Optional[tuple]:
    """(file name, byte position of arr[0, 0]) when `arr` is a read-only memory map, or a view of one, whose
    rows arr[e, a:b] are contiguous in the file; else None."""
    if not isinstance(arr, np.memmap) or arr.ndim < 2 or arr.size == 0 or arr.strides[0] < 0:
        return None
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or getattr(root, "filename", None) is None or root.mode != "r":
        return None
    step = arr.dtype.itemsize
    for dim in range(arr.ndim - 1, 0, -1):
        if arr.strides[dim] != step and arr.shape[dim] > 1:
            return None
        step *= arr.shape[dim]
    return root.filename, int(root.offset) + arr.ctypes.data - root.ctypes.data


def chunk_samples(arrays: Sequence[Optional[np.ndarray]], block: int = 1) -> int:
    """Samples per chunk of `iter_chunks` for these (epochs, samples, ...) arrays: CHUNK_BYTES of them, a
    multiple of `block`."""
    per_sample = sum(x.dtype.itemsize * x.size // max(1, x.shape[1]) for x in arrays if x is not None)
    return max(block, CHUNK_BYTES // max(1, per_sample) // block * block)


def _read_rows(arr, region, files: dict, a: int, b: int) -> np.ndarray:
    """arr[:, a:b] as an in-memory array: one file read per epoch where arr is a file region."""
    if region is None:
        return np.asarray(arr[:, a:b])
    path, start = region
    out = np.empty((arr.shape[0], b - a) + arr.shape[2:], dtype=arr.dtype)
    f = files[path]
    for e in range(arr.shape[0]):
        view = memoryview(out[e]).cast("B")
        f.seek(start + e * arr.strides[0] + a * arr.strides[1])
        done = 0
        while done < view.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise InputError(f"{path}: ends before the records it declares (cut while being read?)")
            done += got
    return out


def iter_chunks(arrays: Sequence[Optional[np.ndarray]], n: int, chunk: int) -> Iterator[tuple]:
    """(a, b, [x[:, a:b] for x in arrays]) for consecutive chunks [a, b) of range(n), the next chunk read in
    the background while the caller computes this one; None entries of `arrays` stay None."""
    regions = [None if x is None else file_region(x) for x in arrays]
    with ExitStack() as stack:
        files = {r[0]: stack.enter_context(open(r[0], "rb", buffering=0)) for r in regions if r is not None}
        io = stack.enter_context(ThreadPoolExecutor(max_workers=1))

        def read(a):
            b = min(n, a + chunk)
            return a, b, [None if x is None else _read_rows(x, r, files, a, b) for x, r in zip(arrays, regions)]

        pending = io.submit(read, 0) if n > 0 else None
        try:
            while pending is not None:
                a, b, rows = pending.result()
                pending = io.submit(read, b) if b < n else None
                yield a, b, rows
        finally:
            if pending is not None:
                pending.cancel()
