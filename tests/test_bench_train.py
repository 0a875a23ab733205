"""tools/bench_train.py --dynamic on tiny sizes: a smoke test of the benchmark script. Both lines it adds are printed
with every figure a number (the images/s of ours without and with dynamic pruning, the ratio and each round's, the
epoch's planning and folding, the per-step parts)."""
import math
import re

import pytest
import torch

from tools.bench_train import main

NUMBER = r"([-+]?\d+(?:\.\d+)?)"


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, which on a shared machine waits for a core (20 s, not 1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["infobatch", "ucb"])
def test_dynamic_prints_both_throughputs_the_ratio_and_the_breakdown(capsys, one_thread, method):
    main(["--network", "smallnet", "--image_size", "32", "--batch_size", "8", "--num_classes", "20",
          "--embedding_size", "16", "--device", "cpu", "--steps", "2", "--warmup", "1", "--loops", "ours",
          "--dynamic", method, "--num_samples", "400", "--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    summary = next(line for line in lines if line.startswith(f"dynamic {method}: "))
    m = re.search(rf"ours {NUMBER} images/s, with dynamic {NUMBER} images/s \(median steps\): ratio {NUMBER} "
                  rf"\({NUMBER}% time per step; median of 2 rounds: {NUMBER} {NUMBER}\); per epoch plan {NUMBER} ms, "
                  rf"fold {NUMBER} ms, over {NUMBER} steps of 8 \({NUMBER} of 400 samples kept\)", summary)
    assert m, summary
    ours, with_dynamic, ratio, _, *rounds = map(float, m.groups()[:6])
    plan_ms, fold_ms, steps, kept = map(float, m.groups()[6:])
    assert ours > 0 and with_dynamic > 0 and ratio > 0 and all(r > 0 for r in rounds)
    assert plan_ms >= 0 and fold_ms >= 0
    assert steps == kept // 8 and 0 < kept <= 400  # both methods prune with the default ratio
    assert kept == 200 if method == "ucb" else kept < 400

    breakdown = next(line for line in lines if line.startswith("dynamic breakdown per step: "))
    parts = {key: float(value) for key, value in re.findall(rf"(lr|batch_weights|add|parts) {NUMBER} us", breakdown)}
    assert set(parts) == {"lr", "batch_weights", "add", "parts"}, breakdown
    assert all(math.isfinite(v) for v in parts.values())
    heads = re.search(rf"head forward\+backward {NUMBER} ms weighted per-sample vs {NUMBER} ms plain", breakdown)
    steps_ms = re.search(rf"step {NUMBER} ms ours, {NUMBER} ms with dynamic", breakdown)
    assert heads and steps_ms, breakdown
    assert all(float(v) > 0 for v in heads.groups() + steps_ms.groups())
