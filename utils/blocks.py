"""Run a function over blocks of samples on every core (threads: numpy releases the GIL in sorts and array
arithmetic). Used by the block-wise soft-label computations that read memory-mapped training records."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


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
