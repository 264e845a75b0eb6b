"""Determinism: the data order is a function of (seed, epoch) only, every world size / accumulation sees the
same global batches, and two CPU runs with the same seed and layout end bitwise equal (different seeds
differ). Also: no environment value (API keys, tokens) ends up in any file of the run folder or its logs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import SMOKE, load_weights, run_train

from train.data.batches import Layout, PlanSampler, epoch_order

# ----------------------------------------------------------------------------------------------------------
# data order


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a = epoch_order(150, seed=42, epoch=0)
    assert sorted(a.tolist()) == list(range(150))
    assert np.array_equal(a, epoch_order(150, seed=42, epoch=0))
    assert not np.array_equal(a, epoch_order(150, seed=42, epoch=1))
    assert not np.array_equal(a, epoch_order(150, seed=43, epoch=0))


LAYOUTS = [(16, None, 1), (16, 4, 1), (16, None, 2), (16, 2, 2), (16, 4, 4), (16, 1, 8), (12, 2, 3)]


def _step_batches(
    n: int, effective: int, per_device: int | None, world: int, seed: int, epoch: int, start: int = 0
) -> list[list[int]]:
    """The real (weight 1) samples of each optimizer step, over every rank and micro-batch."""
    lay = Layout.derive(effective, per_device, world)
    per_rank = []
    for rank in range(world):
        s = PlanSampler(n, lay, rank, seed)
        s.set_epoch(epoch, start)
        micro = list(s)
        assert len(micro) == len(s) == (s.steps_per_epoch() - start) * lay.accum
        assert all(len(m) == lay.per_device for m in micro)  # same shape on every rank (pads weigh 0)
        per_rank.append(micro)
    steps = []
    for k in range(len(per_rank[0]) // lay.accum):
        got = [
            i
            for rank in per_rank
            for m in rank[k * lay.accum : (k + 1) * lay.accum]
            for i, w in m
            if w == 1.0
        ]
        steps.append(sorted(got))
    return steps


@pytest.mark.parametrize(("effective", "per_device", "world"), LAYOUTS)
def test_plan_sampler_same_global_batches_on_any_world(
    effective: int, per_device: int | None, world: int
) -> None:
    n = 150  # 9 full batches of 16 and a short one of 6
    for epoch in (0, 3):
        order = epoch_order(n, 42, epoch)
        want = [sorted(order[k : k + effective].tolist()) for k in range(0, n, effective)]
        got = _step_batches(n, effective, per_device, world, 42, epoch)
        assert got == want
        assert sorted(itertools.chain(*got)) == list(range(n))  # every row once per epoch
        # resuming at step 4 of the epoch yields exactly the rest of it
        assert _step_batches(n, effective, per_device, world, 42, epoch, start=4) == want[4:]


# ----------------------------------------------------------------------------------------------------------
# whole runs (dropout on: the RNG streams must be reproducible too)

RUN = [
    "precision=no",
    "data.max_train_samples=96",
    "train.epochs=2",
    "eval.predict_test=false",
    "train.log_every=2",
]
SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0c7f2a9e41d8b3a6e5f1c2d3b4a5968778695a4b",
    "HF_TOKEN": "hf_secretTokenXq7ZpL2mN9vB4cR8tY1uK3oI6",
    "GLUE_TEST_PASSWORD": "pa55-w0rd-that-must-not-leak",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    out = {}
    for name, seed, env in (("a", 42, SECRETS), ("b", 42, None), ("c", 43, None)):
        d = tmp_path_factory.mktemp(name)
        proc = run_train(["--config", str(SMOKE), f"output_dir={d}", f"seed={seed}", *RUN], env=env)
        out[name] = (d, proc)
    return out


def test_same_seed_bitwise_identical(runs) -> None:
    a, b = load_weights(runs["a"][0]), load_weights(runs["b"][0])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [(runs[k][0] / "metrics.jsonl").read_text().splitlines() for k in "ab"]
    strip = [[line.split('"perf/')[0] for line in r] for r in rows]  # everything but the timings
    assert strip[0] == strip[1]


def test_different_seed_differs(runs) -> None:
    a, c = load_weights(runs["a"][0]), load_weights(runs["c"][0])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_no_secrets_in_run_folder_or_logs(runs) -> None:
    d, proc = runs["a"]
    texts = {"stdout": proc.stdout, "stderr": proc.stderr}
    for path in d.rglob("*"):
        if path.is_file() and path.suffix in ("", ".json", ".jsonl", ".yaml", ".txt", ".tsv", ".log"):
            texts[str(path)] = path.read_text(errors="replace")
    assert "config.yaml" in " ".join(texts) and "run_info.json" in " ".join(texts)
    for where, text in texts.items():
        for name, secret in SECRETS.items():
            assert secret not in text, f"{name} leaked into {where}"
            assert secret[:12] not in text, f"part of {name} leaked into {where}"
