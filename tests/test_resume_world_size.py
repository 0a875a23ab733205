"""Resume on another number of processes: the head's class shards and their momentum are re-split on load.

What "the same" means here. A run on W processes and one on W' != W do not compute the same thing: batch
norm normalises over each rank's part of the batch and every rank draws its own flips, so an epoch on 1
process differs from that epoch on 2 whatever the checkpoint. The checks are therefore:
- the re-split state is the saved state, bitwise: on the new number of processes the head rows and
  their momentum are exactly the rows of the gathered head, the backbone and its momentum unchanged;
- passing a checkpoint through another number of processes loses nothing: 2 processes -> re-split on
  1 (loaded and saved, no step) -> 2 processes gives bitwise the weights of resuming on 2 directly;
- 2 -> 1 -> 2 processes, one epoch each, trains on with finite losses and complete per-epoch records.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from config.config import parse_config
from losses import class_split
from tests.helpers import TINY_TRAIN, make_tiny_dataset, run_script
from utils.artifacts import paths
from utils.training.optimizer import HEAD_GROUP
from utils.training.resume import resplit_resume_state


def fake_resume_states(world_size, num_classes=11, dim=4, seed=0, subcenters=1):
    """Per-rank resume states as save_epoch writes them (SGD state of [backbone param 0, head weight 1]); the head
    has `subcenters` weight rows per class."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes * subcenters, dim, generator=gen)
    momentum = torch.randn(num_classes * subcenters, dim, generator=gen)
    backbone_momentum = torch.randn(3, generator=gen)
    states = []
    for rank, (start, end) in enumerate(class_split(num_classes, world_size)):
        rows = slice(start * subcenters, end * subcenters)
        states.append({
            "head_shard": {"head.weight": weight[rows].clone(), "head.t": torch.tensor([0.5])},
            "optimizer": {"state": {0: {"momentum_buffer": backbone_momentum.clone()},
                                    1: {"momentum_buffer": momentum[rows].clone()}},
                          "param_groups": [{"params": [0], "lr": 0.1}, {"params": [1], "lr": 0.1}]},
            "rng": {"rank": rank}, "scheduler": {"last_epoch": 7}, "scaler": {}, "step": 7, "epoch": 1})
    return states, weight, momentum, backbone_momentum


@pytest.mark.parametrize("old,new", [(2, 1), (1, 3), (3, 2), (4, 4)])
def test_resplit_gives_each_rank_its_rows_bitwise(old, new):
    states, weight, momentum, backbone_momentum = fake_resume_states(old)
    out = [resplit_resume_state(states, 11, new, rank) for rank in range(new)]
    assert torch.equal(torch.cat([o["head_shard"]["head.weight"] for o in out]), weight)
    assert torch.equal(torch.cat([o["optimizer"]["state"][1]["momentum_buffer"] for o in out]), momentum)
    for rank, o in enumerate(out):
        assert torch.equal(o["optimizer"]["state"][0]["momentum_buffer"], backbone_momentum)
        assert torch.equal(o["head_shard"]["head.t"], torch.tensor([0.5])) and o["step"] == 7
        assert o["rng"] == {"rank": rank if rank < old else 0}
        assert o["optimizer"]["param_groups"][HEAD_GROUP]["params"] == [1]
    with pytest.raises(ValueError, match="hold 11 classes, expected 12"):
        resplit_resume_state(states, 12, new, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _args(rec, out, per_process_batch, epochs, *extra):
    return ["--rec", str(rec), "--output", str(out), *TINY_TRAIN, "--batch_size", str(per_process_batch),
            "--num_epoch", str(epochs), "--lr_steps", "1", "--record_topk", "2", "--verify_every_epoch", "false",
            *extra]


def _head_momentum(out, rank, epoch):
    state = torch.load(out / f"resume_rank{rank}_epoch{epoch:03d}.pt", weights_only=True)
    index = state["optimizer"]["param_groups"][HEAD_GROUP]["params"][0]
    return state["optimizer"]["state"][index]["momentum_buffer"]


def _weights(out, epoch):
    ckpt = torch.load(out / f"epoch_{epoch:03d}.pt", weights_only=True)
    return ckpt["backbone"], ckpt["head"]


@pytest.mark.slow
def test_two_one_two_processes(tiny, tmp_path):
    from train_everything import train
    from utils.runtime.context import Context
    from utils.training.loop import prepare_run
    from utils.training.resume import save_epoch

    # Epoch 1 on 2 processes, 16 images each (global batch 32, as 1 process x 32 below: same lr and steps).
    run_script("train_everything.py", *_args(tiny, tmp_path / "run", 16, 1), torchrun=2)
    out = paths.original_dir(parse_config(_args(tiny, tmp_path / "run", 16, 1)))
    shutil.copytree(tmp_path / "run", tmp_path / "via_one")
    shutil.copytree(tmp_path / "run", tmp_path / "direct")
    backbone, head = _weights(out, 1)
    momentum = torch.cat([_head_momentum(out, r, 1) for r in (0, 1)])

    # On 1 process the re-split state is the gathered one, bitwise.
    cfg = parse_config(_args(tiny, tmp_path / "run", 32, 2, "--resume", "true"))
    run = prepare_run(cfg, Context())
    assert run.start_epoch == 1
    assert torch.equal(run.head.head.weight.detach(), head["weight"])
    head_param = run.optimizer.param_groups[HEAD_GROUP]["params"][0]
    assert torch.equal(run.optimizer.state[head_param]["momentum_buffer"], momentum)
    for k, v in run.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    del run
    train(cfg, Context())  # epoch 2 on 1 process
    assert not (out / "resume_rank1_epoch001.pt").exists()  # the 2-process run's files are gone

    # From 1 process back to 2: each rank's rows are the 1-process head's, bitwise.
    state = torch.load(out / "resume_rank0_epoch002.pt", weights_only=True)
    for rank in (0, 1):
        start, end = class_split(head["weight"].shape[0], 2)[rank]
        split = resplit_resume_state([state], head["weight"].shape[0], 2, rank)
        assert torch.equal(split["head_shard"]["head.weight"], state["head_shard"]["head.weight"][start:end])
    run_script("train_everything.py", *_args(tiny, tmp_path / "run", 16, 3, "--resume", "true"), torchrun=2)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {x["epoch"]: x["loss"] for x in lines if x["type"] == "epoch"}
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    history = np.load(out / "prob_history.npy")
    n = history.shape[1]
    assert history.shape == (3, n) and (np.isfinite(history).sum(1) == n // 32 * 32).all()
    assert (np.load(out / "topk_logits.npz")["topk_index"] >= 0).sum() == 3 * (n // 32 * 32) * 2

    # Through 1 process without a step (load + save) and back to 2 == resuming on 2 directly, bitwise.
    one = parse_config(_args(tiny, tmp_path / "via_one", 32, 2, "--resume", "true"))
    save_epoch(prepare_run(one, Context()), 1)
    via_one = paths.original_dir(one)
    assert torch.load(via_one / "last.pt", weights_only=True)["world_size"] == 1
    run_script("train_everything.py", *_args(tiny, tmp_path / "via_one", 16, 2, "--resume", "true"), torchrun=2)
    run_script("train_everything.py", *_args(tiny, tmp_path / "direct", 16, 2, "--resume", "true"), torchrun=2)
    direct = paths.original_dir(parse_config(_args(tiny, tmp_path / "direct", 16, 2)))
    (b1, h1), (b2, h2) = _weights(via_one, 2), _weights(direct, 2)
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k
    assert torch.equal(h1["weight"], h2["weight"])
    for r in (0, 1):
        assert torch.equal(_head_momentum(via_one, r, 2), _head_momentum(direct, r, 2))
