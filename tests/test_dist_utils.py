"""Exact per-sample gathers across ranks and the padding-aware sampler."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.data.datasets import PaddedDistributedSampler
from utils.runtime.context import Context, gather_by_index


def test_sampler_covers_each_sample_once_and_marks_padding():
    n, world = 10, 3
    shards = [list(PaddedDistributedSampler(n, r, world, shuffle=True, seed=1)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    flat = np.concatenate(shards)
    real, pad = flat[flat < n], flat[flat >= n]
    assert sorted(real.tolist()) == list(range(n)) and len(pad) == 2
    a = list(PaddedDistributedSampler(n, 0, 1, seed=1))
    s = PaddedDistributedSampler(n, 0, 1, seed=1)
    s.set_epoch(1)
    assert a != list(s) and sorted(a) == sorted(s)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, n, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = Context(rank=rank, world_size=world)
    # rank 0 sees samples 0, 2, 4 and a padding duplicate; rank 1 sees 1, 3 (sample 5 is never seen)
    idx = torch.tensor([0, 2, 4, -1]) if rank == 0 else torch.tensor([1, 3])
    vals = idx.float() * 10 + 0.5
    vals[idx < 0] = 999.0
    out = gather_by_index(ctx, idx, vals, n)
    two = gather_by_index(ctx, idx, torch.stack([vals, -vals], 1), n)
    np.save(os.path.join(out_dir, f"r{rank}.npy"), out)
    np.save(os.path.join(out_dir, f"k{rank}.npy"), two)
    dist.destroy_process_group()


@pytest.mark.slow
def test_gather_by_index_two_gloo_ranks(tmp_path):
    n = 6
    mp.spawn(_worker, args=(2, _free_port(), n, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        out = np.load(tmp_path / f"r{r}.npy")
        assert np.allclose(out[:5], [0.5, 10.5, 20.5, 30.5, 40.5]) and np.isnan(out[5])
        two = np.load(tmp_path / f"k{r}.npy")
        assert two.shape == (6, 2) and np.allclose(two[:5, 1], -out[:5])
