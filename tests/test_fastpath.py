"""The fast path on CPU: compiled == eager, bucketing keeps the logits, shapes are bounded, sampler.

Compiled runs use ``fast.backend=aot_eager`` (dynamo + AOTAutograd graphs, run with eager kernels: the same
capture and backward graph as inductor, without minutes of C++ code generation on 2 cores); the inductor
variant is marked ``slow``; the CUDA-graph checks are marked ``gpu`` (``bench/gpu_check.sh`` runs them).

Tolerances (documented in bench/README.md):
- compiled vs eager train losses, fp32, dropout 0: |a - b| <= 1e-5 * max(1, |b|) per step (measured: 0.0 with
  aot_eager; bucketed padding changes only the length of masked reductions).
- bucketed vs unbucketed logits, fp32: atol 1e-5, rtol 1e-5 (measured ~1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SMOKE, load_weights, run_train

from train.config import load_config
from train.data import batches, tokenized
from train.engine import fastpath
from train.tracking.tracker import read_metrics

LOSS_TOL = 1e-5
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------------------------
# units: buckets, collator, decision, optimizer


def test_bucket_lengths():
    assert fastpath.bucket_lengths(128, 32) == (32, 64, 96, 128)
    assert fastpath.bucket_lengths(100, 32) == (32, 64, 96, 100)  # max_length always closes the set
    assert fastpath.bucket_lengths(128, 32, [16, 64, 512]) == (16, 64, 128)
    assert [fastpath.bucket_for(n, (32, 64, 128)) for n in (1, 32, 33, 64, 65, 128)] == [
        32,
        32,
        64,
        64,
        128,
        128,
    ]


def _rows(lengths: list[int]) -> list[dict]:
    return [
        {
            "input_ids": np.arange(1, n + 1),
            "token_type_ids": np.zeros(n, dtype=np.int64),
            "label": 1,
            "idx": i,
            "weight": 1.0,
        }
        for i, n in enumerate(lengths)
    ]


def test_collator_pads_to_smallest_bucket():
    collate = batches.make_collator(batches.Inputs(), False, buckets=(32, 64, 128))
    for lengths, want in (([5, 3], 32), ([5, 33], 64), ([64], 64), ([100, 2], 128)):
        b = collate(_rows(lengths))
        assert b["input_ids"].shape == (len(lengths), want)
        assert b["attention_mask"].sum(1).tolist() == lengths  # real tokens only are attended
        assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    assert batches.make_collator(batches.Inputs(), False)(_rows([5, 33]))["input_ids"].shape == (
        2,
        33,
    )  # off: longest in batch


def test_decide_reasons():
    cfg = load_config(None, [])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    off = fastpath.decide(cfg, cpu, backend_off="", world=1)
    assert not off.enabled and "no CUDA device" in off.reason and off.buckets is None
    on = fastpath.decide(cfg, cuda, backend_off="", world=1)
    assert on.enabled and on.mode == "reduce-overhead" and on.cudagraphs and on.fused_adamw
    assert on.buckets == (32, 64, 96, 128)
    ddp = fastpath.decide(cfg, cuda, backend_off="", world=2)
    assert ddp.mode == "default" and not ddp.cudagraphs and "CUDA graphs off with 2 processes" in ddp.reason
    from train.engine.backends.deepspeed import DeepSpeed

    ds = fastpath.decide(cfg, cuda, backend_off=DeepSpeed().fast_path_off, world=1)
    assert not ds.enabled and "DeepSpeed owns backward" in ds.reason
    assert not fastpath.decide(load_config(None, ["fast.enabled=false"]), cuda, "", 1).enabled
    forced = fastpath.decide(load_config(None, ["fast.enabled=true", "fast.backend=aot_eager"]), cpu, "", 1)
    assert forced.enabled and forced.compile and not forced.cudagraphs and forced.mode is None


def test_fused_adamw_same_update():
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = torch.optim.AdamW(models[0].parameters(), lr=1e-2, weight_decay=0.01)
    fused = fastpath.use_fused_adamw(torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.01))
    assert fused.param_groups[0]["fused"] and fused.param_groups[0]["weight_decay"] == 0.01
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, opt in zip(models, (plain, fused), strict=True):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# the length-grouped sampler


def _plan(sampler: batches.PlanSampler) -> list[tuple[int, float]]:
    return [pair for micro in sampler for pair in micro]


@pytest.mark.parametrize("layout", [(16, None, 1), (16, 4, 2)])
def test_grouped_sampler_covers_every_row_once_and_is_deterministic(layout):
    n = 1003  # 62 full batches + a short one of 11
    lengths = np.random.default_rng(0).integers(3, 129, n)
    lay = batches.Layout.derive(*layout)
    ranks = [batches.PlanSampler(n, lay, r, seed=7, lengths=lengths) for r in range(lay.world)]
    real = sorted(i for s in ranks for i, w in _plan(s) if w > 0)
    assert real == list(range(n))  # every row exactly once per epoch, over all ranks
    again = batches.PlanSampler(n, lay, 0, seed=7, lengths=lengths)
    assert _plan(again) == _plan(ranks[0])  # deterministic per seed and epoch
    other_seed = batches.PlanSampler(n, lay, 0, seed=8, lengths=lengths)
    assert _plan(other_seed) != _plan(ranks[0])
    again.set_epoch(1)
    assert _plan(again) != _plan(ranks[0])  # reshuffled per epoch
    s = ranks[0]
    assert len(s.global_batch(s.steps_per_epoch() - 1)) == n % 16  # the short batch stays last


def test_grouped_batches_have_similar_lengths():
    n = 4096
    lengths = np.random.default_rng(1).integers(3, 129, n)
    lay = batches.Layout.derive(16, None, 1)
    grouped = batches.PlanSampler(n, lay, 0, seed=3, lengths=lengths)
    plain = batches.PlanSampler(n, lay, 0, seed=3)

    def padding(s: batches.PlanSampler) -> float:  # padded tokens / real tokens when padding to the longest
        planned = [lengths[s.global_batch(k)] for k in range(s.steps_per_epoch())]
        return sum(len(b) * b.max() for b in planned) / lengths.sum()

    assert padding(grouped) < 1.1 < 1.5 < padding(plain)
    assert sorted(grouped.order()) == list(range(n))


def test_packed_rows_match_the_dataset():
    from train.model.load import load_tokenizer
    from train.tasks import get_task

    cfg = load_config(SMOKE, [])
    task = get_task("sst2")
    ds = tokenized.tokenize_split(cfg.data, task, task.split("train")[0], load_tokenizer(cfg))
    for sub in (ds, ds.select([5, 3, 400, 7]), ds.shuffle(seed=1).select(range(40))):
        packed = batches.Packed(sub)
        assert len(packed) == len(sub)
        for i in range(len(sub)):
            row, want = packed.row(i), sub[i]
            assert row["input_ids"].tolist() == want["input_ids"] and row["label"] == want["label"]
            assert row["token_type_ids"].tolist() == want["token_type_ids"] and row["idx"] == want["idx"]


# ----------------------------------------------------------------------------------------------------------
# the model: bucketed padding and compiled shapes


@pytest.fixture(scope="module")
def tiny():
    """The bundled tiny BERT (fp32, dropout 0, eval mode) and 16 real SST-2 rows."""
    from train.model.load import load_model, load_tokenizer
    from train.tasks import get_task

    cfg = load_config(SMOKE, ["model.dropout=0"])
    task = get_task("sst2")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, task, tok).eval()
    ds = tokenized.tokenize_split(cfg.data, task, task.split("train")[0], tok)
    rows = batches.Weighted(ds).__getitems__(list(range(16)))
    return model, rows


def _forward(model):
    def fwd(batch: dict) -> torch.Tensor:
        return model(
            input_ids=batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
        ).logits

    return fwd


def _fast(model, buckets, backend: str = "eager") -> fastpath.FastPath:
    torch._dynamo.reset()  # every FastPath shares its step functions' code objects (one per process in a run)
    d = fastpath.Decision(True, "test", compile=True, backend=backend, buckets=buckets)
    loss = lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # noqa: E731
    return fastpath.FastPath(d, _forward(model), loss, eval_rows=16)


def _hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states of the real tokens (the tiny random model's logits vary too little to judge by)."""
    h = model.bert(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
    ).last_hidden_state
    return h[batch["attention_mask"].bool()]


@torch.no_grad()
def test_bucketing_keeps_the_logits(tiny):
    model, rows = tiny
    plain = batches.make_collator(batches.Inputs(), False)(rows)  # padded to the longest row only
    ref, ref_h = _forward(model)(plain), _hidden(model, plain)
    longest = plain["input_ids"].shape[1]
    for buckets in ((64, 128), (longest + 1,), (97,)):
        batch = batches.make_collator(batches.Inputs(), False, buckets=buckets)(rows)
        assert batch["input_ids"].shape[1] > longest
        torch.testing.assert_close(_hidden(model, batch), ref_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_forward(model)(batch), ref, rtol=1e-5, atol=1e-6)
    compiled = _fast(model, (64, 128), backend="aot_eager")
    got = compiled.eval_logits(batches.make_collator(batches.Inputs(), False, buckets=(64, 128))(rows))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the check can fail: attending to the padding changes the real tokens' states
    wrong = batches.make_collator(batches.Inputs(), False, buckets=(128,))(rows)
    wrong_h = model.bert(
        input_ids=wrong["input_ids"],
        token_type_ids=wrong["token_type_ids"],
        attention_mask=torch.ones_like(wrong["attention_mask"]),
    ).last_hidden_state
    assert (wrong_h[wrong["attention_mask"].bool()] - ref_h).abs().max() > 1e-2


@torch.no_grad()
def test_compiled_shapes_are_bounded_by_the_buckets(tiny):
    model, rows = tiny
    lengths = (5, 20, 40)  # three distinct batch lengths, two buckets

    def bucketed(buckets):
        collate = batches.make_collator(batches.Inputs(), False, buckets=buckets)
        for n in lengths:
            cut = [
                {
                    **r,
                    "input_ids": r["input_ids"][:1].repeat(n),
                    "token_type_ids": r["token_type_ids"][:1].repeat(n),
                }
                for r in rows
            ]
            yield collate(cut)

    fast = _fast(model, (32, 64))
    for b in bucketed((32, 64)):
        fast.eval_logits(b)
        fast.eval_logits(b)
    assert fast.shapes["eval"] == {(16, 32), (16, 64)}
    assert fast.graph_count() == 2 and fast.recompiles == 0  # one graph per bucket, no graph breaks
    unbucketed = _fast(model, None)
    for b in bucketed(None):
        unbucketed.eval_logits(b)
    assert unbucketed.graph_count() == len(lengths)  # the counter sees every new shape


@torch.no_grad()
def test_eval_pads_the_last_batch_to_a_constant_shape(tiny):
    model, rows = tiny
    fast = _fast(model, (64,))
    part = batches.make_collator(batches.Inputs(), False, buckets=(64,))(rows[:5])
    got = fast.eval_logits(part)
    assert got.shape[0] == 5 and fast.shapes["eval"] == {(16, 64)}
    torch.testing.assert_close(got, _forward(model)(part), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# the real program: compiled vs eager training


COMMON = [
    "model.dropout=0",
    "precision=no",
    "train.max_steps=10",
    "train.log_every=1",
    "eval.predict_test=false",
    "data.max_length=64",
    "fast.bucket_multiple=64",
]  # one bucket: compiling on 2 CPU cores is slow


def _train_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def _compare(eager_dir, fast_dir, tol: float) -> None:
    eager, fast = _train_rows(eager_dir), _train_rows(fast_dir)
    assert [r["step"] for r in fast] == list(range(1, 11)) == [r["step"] for r in eager]
    for a, b in zip(fast, eager, strict=True):
        assert abs(a["train/loss"] - b["train/loss"]) <= tol * max(1.0, abs(b["train/loss"])), (a, b)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=100 * tol, abs=1e-6)
    w_fast, w_eager = load_weights(fast_dir), load_weights(eager_dir)
    for key, ref in w_eager.items():
        torch.testing.assert_close(w_fast[key], ref, rtol=100 * tol, atol=1e-6)
    assert fast[-1]["perf/compiled_graphs"] <= 2  # (train, eval) x the one bucket
    assert fast[-1]["perf/recompiles"] == 0


def test_compiled_training_matches_eager(tmp_path):
    eager = run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'eager'}", *COMMON])
    assert "fast path off: no CUDA device" in eager.stderr + eager.stdout
    fast = run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={tmp_path / 'fast'}",
            *COMMON,
            "fast.enabled=true",
            "fast.backend=aot_eager",
        ]
    )
    assert "fast path on" in fast.stderr + fast.stdout
    _compare(tmp_path / "eager", tmp_path / "fast", LOSS_TOL)
    ev = [json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("eager", "fast")]
    assert (
        ev[0]["final"]["splits"]["validation"]["accuracy"]
        == ev[1]["final"]["splits"]["validation"]["accuracy"]
    )
    # run_info.json: what compiling cost, and where the shared compile cache is
    eager_info, fast_info = (
        json.loads((tmp_path / d / "run_info.json").read_text()) for d in ("eager", "fast")
    )
    assert eager_info["compile_s"] == 0.0 and eager_info["compile_cache"] is None
    assert eager_info["fast_path"].startswith("fast path off: no CUDA device")
    cache = fast_info["compile_cache"]
    folder = Path(os.environ["GLUE_TRAIN_CACHE"]) / "compile"  # the session's cache (tests/conftest.py)
    assert cache["dir"] == str(folder) and fast_info["compile_s"] > 0
    assert cache["misses"] == 0  # aot_eager has no torch cache to miss
    assert f"compiling before the first step; compile cache {folder}" in fast.stderr + fast.stdout
    record = json.loads((folder / "glue-train" / f"{cache['key']}.json").read_text())
    assert record["last"]["compile_s"] == fast_info["compile_s"] and record["shapes"] == 2


def _direct_steps(run) -> None:
    """What train() sets up before train_one_epoch (a progress bar, where the loop has one), here disabled."""
    if getattr(run, "bar", "absent") is None:
        from tqdm.auto import tqdm

        run.bar = tqdm(disable=True)


def test_group_by_length_is_wired_into_the_loop(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from train.engine import loop

    cfg = load_config(
        SMOKE,
        [
            f"output_dir={tmp_path}",
            "data.group_by_length=true",
            "eval.predict_test=false",
            "checkpoint.resume=never",
            "train.log_every=1",
        ],
    )
    run = loop.setup(cfg)
    try:
        assert run.built.data.sampler.lengths is not None and len(run.built.data.sampler.lengths) == 512
        assert not run.built.fast.compiled  # CPU, auto: eager
        run.built.total_steps = 2
        _direct_steps(run)
        loop.train_one_epoch(run)
        assert run.state.global_step == 2
    finally:
        run.acc.end_training()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _losses_in_process(
    tmp_path, overrides: list[str], monkeypatch=None, cudagraph_grads: bool = False
) -> list:
    from accelerate.state import AcceleratorState, GradientState

    from train.engine import build, loop

    if cudagraph_grads:  # the CUDA-graph gradient policy (kept, accumulated in place), exercised on CPU
        real = fastpath.decide_for_run

        def decide(*args, **kwargs):
            d = real(*args, **kwargs)
            d.cudagraphs = True
            return d

        monkeypatch.setattr(build, "decide_for_run", decide)
    cfg = load_config(
        SMOKE,
        [
            f"output_dir={tmp_path}",
            "eval.predict_test=false",
            "checkpoint.resume=never",
            "train.log_every=1",
            "model.dropout=0",
            "precision=no",
            "data.max_length=64",
            "fast.bucket_multiple=64",
            *overrides,
        ],
    )
    run = loop.setup(cfg)
    try:
        assert run.built.fast.set_to_none is not cudagraph_grads
        run.built.total_steps = 6
        _direct_steps(run)
        loop.train_one_epoch(run)
    finally:
        run.acc.end_training()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return [r["train/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]


def test_gradients_kept_for_cuda_graphs_accumulate_like_eager(tmp_path, monkeypatch):
    """With CUDA graphs + accumulation, grads are preallocated and zeroed in place (not set to None); the
    policy itself runs on CPU: 4 rows x accumulation 4 compiled == 16 rows eager."""
    eager = _losses_in_process(tmp_path / "eager", [])
    kept = _losses_in_process(
        tmp_path / "kept",
        ["fast.enabled=true", "fast.backend=aot_eager", "train.per_device_batch_size=4"],
        monkeypatch,
        cudagraph_grads=True,
    )
    assert len(eager) == len(kept) == 6
    for a, b in zip(kept, eager, strict=True):
        assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), (kept, eager)


def test_dynamic_length_one_graph_for_every_bucket(tmp_path):
    """fast.dynamic: the sequence dimension is symbolic, so two buckets cost one train and one eval graph, and
    the training equals the eager one."""
    common = [c for c in COMMON if not c.startswith("fast.")] + ["fast.bucket_multiple=32"]  # buckets 32, 64
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'eager'}", *common])
    fast = run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={tmp_path / 'fast'}",
            *common,
            "fast.enabled=true",
            "fast.backend=aot_eager",
            "fast.dynamic=true",
        ]
    )
    assert "padding buckets [32, 64] (one graph for all lengths)" in fast.stderr + fast.stdout
    _compare(tmp_path / "eager", tmp_path / "fast", LOSS_TOL)  # at most 2 graphs, no recompiles


@pytest.mark.slow
def test_inductor_training_matches_eager(tmp_path):
    common = [c for c in COMMON if not c.startswith("fast.")] + ["fast.bucket_multiple=64"]
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'eager'}", *common])
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'fast'}", *common, "fast.enabled=true"])
    _compare(tmp_path / "eager", tmp_path / "fast", 1e-4)  # inductor fuses and reorders fp32 reductions


@pytest.mark.slow
def test_compiled_ddp_with_accumulation_matches_eager(tmp_path):
    """2 processes x 4 rows x accumulation 2, compiled (DDP + dynamo), vs 1 process x 16 eager."""
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'eager'}", *COMMON])
    run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={tmp_path / 'fast'}",
            *COMMON,
            "fast.enabled=true",
            "fast.backend=aot_eager",
            "train.per_device_batch_size=4",
        ],
        nproc=2,
    )
    eager, fast = _train_rows(tmp_path / "eager"), _train_rows(tmp_path / "fast")
    for a, b in zip(fast, eager, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert fast[-1]["perf/recompiles"] == 0


# ----------------------------------------------------------------------------------------------------------
# the benchmark script (a smoke run: it runs and prints valid JSON; no timing assertions)


def test_compare_trainer_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "compare_trainer.py"),
        "--model",
        "tiny",
        "--lengths",
        "fixed128",
        "--max-length",
        "32",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--fast-backend",
        "aot_eager",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == ["trainer", "loop_eager", "loop_fast"]
    assert out.read_text().splitlines() == proc.stdout.splitlines()
    for r in rows:
        for key in (
            "samples_per_s",
            "ms_per_step",
            "real_tokens_per_s",
            "warmup_s",
            "device",
            "versions",
            "ratio_to_trainer",
            "mfu",
        ):
            assert key in r, key
        assert r["samples_per_s"] > 0 and r["mean_real_length"] == 32
    assert rows[0]["ratio_to_trainer"] == 1.0 and rows[2]["perf/compiled_graphs"] == 2


# ----------------------------------------------------------------------------------------------------------
# GPU only (bench/gpu_check.sh): CUDA graphs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_gpu_fast_matches_eager_bf16(tmp_path, dynamic):
    common = [
        "model.dropout=0",
        "precision=bf16",
        "train.max_steps=10",
        "train.log_every=1",
        "eval.predict_test=false",
        "data.max_length=64",
        "fast.bucket_multiple=32",
    ]
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'eager'}", *common, "fast.enabled=false"])
    # fast.enabled=true: auto would take the eager path here (10 steps cannot pay back a cold compile)
    fast = run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={tmp_path / 'fast'}",
            *common,
            "fast.enabled=true",
            f"fast.dynamic={str(dynamic).lower()}",
        ]
    )
    assert "CUDA graphs on" in fast.stderr + fast.stdout
    eager_rows, fast_rows = _train_rows(tmp_path / "eager"), _train_rows(tmp_path / "fast")
    for a, b in zip(fast_rows, eager_rows, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=2e-2)  # bf16 autocast, other kernels
    assert fast_rows[-1]["perf/recompiles"] == 0 and fast_rows[-1]["perf/compiled_graphs"] <= 2 * 2


@pytest.mark.gpu
@gpu
def test_gpu_cudagraphs_with_accumulation_fp32(tmp_path):
    """Accumulating into gradients kept outside the CUDA-graph pool: 4 x 4 with graphs == 1 x 16 eager."""
    common = [
        "model.dropout=0",
        "precision=no",
        "train.max_steps=10",
        "train.log_every=1",
        "eval.predict_test=false",
        "fast.compile_mode=reduce-overhead",
        "data.max_length=64",
        "fast.bucket_multiple=64",
    ]
    run_train(["--config", str(SMOKE), f"output_dir={tmp_path / 'eager'}", *common, "fast.enabled=false"])
    run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={tmp_path / 'fast'}",
            *common,
            "fast.enabled=true",
            "train.per_device_batch_size=4",
        ]
    )
    for a, b in zip(_train_rows(tmp_path / "fast"), _train_rows(tmp_path / "eager"), strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_no_host_sync_inside_the_step(tmp_path):
    """After warm-up, optimizer steps between two logs never wait for the GPU (sync debug mode = error)."""
    from train.engine import loop

    cfg = load_config(
        SMOKE,
        [
            f"output_dir={tmp_path}",
            "train.log_every=1000",
            "eval.predict_test=false",
            "checkpoint.resume=never",
            "data.max_length=64",
            "fast.bucket_multiple=64",
            "fast.enabled=true",  # auto would not compile for a run this short
        ],
    )
    run = loop.setup(cfg)
    assert run.built.fast.decision.cudagraphs
    run.built.total_steps = 3
    _direct_steps(run)
    loop.train_one_epoch(run)  # warm-up; logs (a sync) at its last step

    class Five:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for k, b in enumerate(self.inner):
                if k == 5:
                    return
                yield b

    run.built.data.train_loader, run.built.total_steps = Five(run.built.data.train_loader), 10_000
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.train_one_epoch(run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert run.state.global_step == 8
    assert run.built.fast.recompiles == 0
