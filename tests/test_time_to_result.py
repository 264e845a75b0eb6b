"""Time to result: one shared compile cache, what compiling cost, the ``auto`` rule, end-to-end bench.

Fast tests: the ``auto`` rule as a pure function (fed ``cuda`` inputs: on this CPU ``auto`` is off anyway),
the cache folder and its records (run_info.json's ``compile_s``/``compile_cache`` of real eager and aot_eager
runs: tests/test_fastpath.py ``test_compiled_training_matches_eager``).
``slow``: two inductor runs filling one fresh cache at once, then a warm run (its ``compile_s`` a fraction of
theirs), then a run whose torch entries were removed, warmed again from the mega-cache; bench/gpu_check.sh's
CPU dry run, which runs ``bench/compare_trainer.py --end-to-end`` on a real task folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_GLUE, SMOKE, run_train

from train.config import load_config
from train.engine import compile_cache, fastpath
from train.engine.compile_cache import CacheState, CompileCache
from train.tracking.tracker import read_metrics

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


# ----------------------------------------------------------------------------------------------------------
# the auto rule (a pure function of device type, steps, shapes and cache state)


def test_auto_rule_picks_eager_for_a_short_cold_run_and_says_why():
    # RTE: 2490 rows / 16 x 5 epochs = 780 steps; 4 buckets x (train, eval) = 8 shapes; nothing cached yet
    pays, why = fastpath.auto_pays_off("cuda", 780, 8, CacheState())
    assert not pays
    assert "cannot pay off" in why and "780 steps" in why and "cold cache: 8 shapes x 22.6 s" in why
    assert "~181 s" in why and "~31 s saved" in why and "fast.enabled=true" in why
    # the same run with a warm cache (the sweep's first run measured 12 s for it): compiling pays off
    pays, why = fastpath.auto_pays_off("cuda", 780, 8, CacheState(warm=True, cold_s=150.0, warm_s=12.0))
    assert pays and "warm cache, as measured" in why and "~12 s" in why
    # warm, only the cold compile measured: WARM_FRACTION of it (100 s -> 25 s < 31 s saved; 150 s -> 37.5 s)
    assert fastpath.auto_pays_off("cuda", 780, 8, CacheState(warm=True, cold_s=100.0))[0]
    assert not fastpath.auto_pays_off("cuda", 780, 8, CacheState(warm=True, cold_s=150.0))[0]
    # cold but long (SST-2: 4210 steps per epoch x 5): pays off even when compiling from scratch
    assert fastpath.auto_pays_off("cuda", 21050, 8, CacheState())[0]
    # a measured cold compile replaces the table: 400 s of compiling is more than 9,000 x 40 ms
    assert not fastpath.auto_pays_off("cuda", 9000, 8, CacheState(cold_s=400.0))[0]
    # no saving per step on the CPU: never pays off
    assert not fastpath.auto_pays_off("cpu", 10**6, 2, CacheState(warm=True, warm_s=0.1))[0]


def test_decide_auto_takes_the_rule_into_account():
    auto, forced = load_config(None, []), load_config(None, ["fast.enabled=true"])
    short = fastpath.decide(auto, CUDA, "", 1, steps=780, cache=CacheState())
    assert not short.enabled and not short.fused_adamw and short.buckets is None  # eager, unbucketed
    assert short.describe().startswith("fast path off: auto: compiling cannot pay off")
    warm = fastpath.decide(auto, CUDA, "", 1, steps=780, cache=CacheState(True, 150.0, 12.0))
    assert warm.enabled and warm.cudagraphs and "compiling pays off" in warm.reason
    assert fastpath.decide(forced, CUDA, "", 1, steps=10, cache=CacheState()).enabled  # true: always
    assert fastpath.decide(auto, CUDA, "", 1).enabled  # no run facts given: device rule only
    no_compile = load_config(None, ["fast.compile=false"])  # buckets + fused AdamW cost nothing up front
    assert fastpath.decide(no_compile, CUDA, "", 1, steps=10, cache=CacheState()).enabled
    assert fastpath.planned_steps(auto, 2490, 16) == 780
    # fast.dynamic: one graph for every bucket, so 2 shapes to compile (45 s) against 4,000 x 40 ms saved
    dynamic = load_config(None, ["fast.dynamic=true"])
    assert not fastpath.decide(auto, CUDA, "", 1, steps=1500, cache=CacheState()).enabled
    d = fastpath.decide(dynamic, CUDA, "", 1, steps=1500, cache=CacheState())
    assert d.enabled and d.dynamic and d.shapes == 2 and "compiling 2 shapes" in d.reason
    assert fastpath.planned_steps(load_config(None, ["train.max_steps=100"]), 2490, 16) == 100


# ----------------------------------------------------------------------------------------------------------
# the cache folder and its records


def test_cache_folder_defaults_beside_the_tokenized_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_TRAIN_CACHE", str(tmp_path / "env"))
    assert compile_cache.cache_dir(None, None) == tmp_path / "env" / "compile"
    assert compile_cache.cache_dir(None, str(tmp_path / "data")) == tmp_path / "data" / "compile"
    assert compile_cache.cache_dir(str(tmp_path / "x"), str(tmp_path / "data")) == tmp_path / "x"
    monkeypatch.delenv("GLUE_TRAIN_CACHE")
    assert compile_cache.cache_dir(None, None) == Path.home() / ".cache" / "glue-train" / "compile"


def test_cache_records_and_warm_detection(tmp_path, monkeypatch):
    from torch.compiler._cache import CacheArtifactManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))  # restored after the test
    with CacheArtifactManager.with_fresh_cache():  # nothing compiled in this process so far, as in a new run
        _records_and_warm_detection(tmp_path)


def _records_and_warm_detection(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path / "c", "k1", {"model": "tiny"})
    assert cache.prepare() == CacheState()  # nothing recorded: cold, never measured
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c")  # torch's caches now live there
    cold = {"fxgraph": {"hits": 0, "misses": 2}, "aot_autograd": {"hits": 0, "misses": 1}}
    cache.save(100.0, cold, 2)  # nothing compiled in this process: no mega-cache, no artifact names
    assert cache.prepare() == CacheState(warm=True, cold_s=100.0)
    warm = {"fxgraph": {"hits": 2, "misses": 0}, "aot_autograd": {"hits": 1, "misses": 0}}
    cache.save(5.0, warm, 2)
    record = json.loads(cache.record_path.read_text())
    assert record["cold_s"] == 100.0 and record["warm_s"] == 5.0 and record["last"]["hits"] == 3
    # a record naming torch entries that are not in the folder (cleaned by hand, no mega-cache): cold again
    record["artifacts"] = {"aot_autograd": ["agone"], "inductor": ["fgone"]}
    cache.record_path.write_text(json.dumps(record))
    assert cache.prepare() == CacheState(warm=False, cold_s=100.0, warm_s=5.0)
    (tmp_path / "c" / "aotautograd" / "agone").mkdir(parents=True)
    (tmp_path / "c" / "fxgraph" / "go" / "fgone").mkdir(parents=True)
    assert cache.prepare().warm
    assert CompileCache(tmp_path / "c", "other").prepare() == CacheState()  # another compile key


def _run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_info.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# inductor: a shared cache filled by two processes at once, then warm (slow: cold CPU compiles take minutes)


SLOW_COMMON = [
    "--config",
    str(SMOKE),
    "model.dropout=0",
    "precision=no",
    "train.max_steps=4",
    "train.log_every=1",
    "eval.predict_test=false",
    "data.max_length=16",
    "fast.buckets=[16]",  # one bucket: 2 shapes (train, eval)
]


def _losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.slow
def test_shared_cache_filled_at_once_then_warm(tmp_path):
    folder = tmp_path / "compile"
    run_train([*SLOW_COMMON, f"output_dir={tmp_path / 'eager'}"])
    fast = [*SLOW_COMMON, "fast.enabled=true", "fast.backend=inductor", f"fast.cache_dir={folder}"]
    with ThreadPoolExecutor(2) as pool:  # two processes fill the fresh cache at the same time
        list(pool.map(lambda name: run_train([*fast, f"output_dir={tmp_path / name}"]), ("p1", "p2")))
    eager = _losses(tmp_path / "eager")
    for name in ("p1", "p2"):
        assert _losses(tmp_path / name) == pytest.approx(eager, rel=1e-4)  # inductor reorders fp32 sums
        assert _run_info(tmp_path / name)["compile_cache"]["misses"] > 0
    cold = min(_run_info(tmp_path / n)["compile_s"] for n in ("p1", "p2"))

    run_train([*fast, f"output_dir={tmp_path / 'warm'}"])
    warm = _run_info(tmp_path / "warm")
    assert warm["compile_cache"]["warm_before"] and warm["compile_cache"]["misses"] == 0
    assert warm["compile_cache"]["hits"] >= 2
    assert warm["compile_s"] < 0.35 * cold, (warm["compile_s"], cold)  # measured here: ~0.1
    assert _losses(tmp_path / "warm") == pytest.approx(_losses(tmp_path / "p1"), rel=1e-6)

    # torch's own entries gone, the record and its mega-cache kept: hot-loaded, warm again
    key = warm["compile_cache"]["key"]
    assert (folder / "glue-train" / f"{key}.bin").stat().st_size > 0
    shutil.rmtree(folder / "fxgraph")
    shutil.rmtree(folder / "aotautograd")
    run_train([*fast, f"output_dir={tmp_path / 'mega'}"])
    mega = _run_info(tmp_path / "mega")["compile_cache"]
    assert mega["mega_loaded"] and mega["warm_before"] and mega["misses"] == 0


# ----------------------------------------------------------------------------------------------------------
# bench/compare_trainer.py --end-to-end: process start to dev results, cold and warm, every path

E2E_FIELDS = (
    "path",
    "task",
    "model",
    "device",
    "precision",
    "epochs",
    "train_rows",
    "steps",
    "cache",
    "wall_s",
    "compile_s",
    "samples_per_s",
    "dev",
    "score",
    "fast_path",
    "speedup_vs_trainer",
    "train_s",
    "compile_cache",
    "versions",
    "date",
)


def check_end_to_end(rows: list[dict], task: str, steps: int, allow_lone_warm: bool = False) -> None:
    """Every field of ``--end-to-end``'s lines, and that they agree with each other."""
    for r in rows:
        assert [k for k in E2E_FIELDS if k not in r] == [], r
        assert r["task"] == task and r["steps"] == steps and r["train_rows"] > 0
        assert r["wall_s"] > r["train_s"] > 0 and r["samples_per_s"] > 0
        split = next(iter(r["dev"]))
        assert 0 <= r["score"] == r["dev"][split]["score"] <= 1
    for r in (r for r in rows if r["path"] == "loop_fast"):
        assert r["compile_s"] > 0 and r["fast_path"].startswith("fast path on")
        assert r["compile_cache"]["warm_before"] is (r["cache"] == "warm")
        # on the CPU no compiled step is faster: auto would have stayed eager, and says why
        assert r["auto"]["compile"] is False and "cannot pay off" in r["auto"]["reason"]
        assert r["auto"]["cache_before"] == r["cache"]
        # compared only with an eager run of the same invocation: in the dry run (PART=all) step 3 runs the
        # eager loop next to the cold fast path, step 5 the warm fast path alone
        eager = [e["wall_s"] for e in rows if e["path"] == "loop_eager"]
        same_call = eager and (r["cache"] == "cold" or not allow_lone_warm)
        assert r["auto"]["fast_finished_first"] == (r["wall_s"] < eager[0] if same_call else None)
    for r in (r for r in rows if r["path"] != "loop_fast"):
        assert r["compile_s"] == 0.0 and r["compile_cache"] is None


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """bench/gpu_check.sh is what a session with a 15-minute GPU lease runs once: its CPU dry run (tiny model,
    aot_eager, a real task folder where ../shared/glue is present) must produce every file the lease brings
    back (at most 8), and ``--end-to-end`` every field, or the lease is wasted."""
    out, empty = tmp_path / "out", tmp_path / "no-wheels"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DRY_RUN": "1", "PYTHON": sys.executable}
    env["WHEELS"] = str(empty)  # a developer's .whl holds the GPU image's Python 3.12 wheels
    env["WORK"] = str(tmp_path / "work")
    real = (SHARED_GLUE / "RTE" / "train.tsv").exists()
    if real:
        env["GLUE"] = str(SHARED_GLUE)
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name.split("-", 2)[2] for p in out.iterdir())  # drop the time stamp
    assert files == [
        "dry-run-end-to-end.jsonl",
        "dry-run-gpu-tests.txt",
        "dry-run-log.txt",
        "dry-run-profile.txt",
        "dry-run-runs.jsonl",
        "dry-run-summary.md",
        "dry-run-throughput.jsonl",
    ]
    (summary,) = out.glob("*-summary.md")
    steps = [line.split(" | ")[:2] for line in summary.read_text().splitlines() if line.startswith("| run-")]
    assert all(result == "ok" for _, result in steps) and len(steps) == 3, steps
    assert "| skipped:" not in summary.read_text() and "FAILED" not in summary.read_text()

    (throughput,) = out.glob("*-throughput.jsonl")
    rows = [json.loads(line) for line in throughput.read_text().splitlines()]
    assert [(r["path"], r["lengths"]) for r in rows] == [
        (p, lengths) for lengths in ("mnli", "fixed128") for p in ("trainer", "loop_eager", "loop_fast")
    ]
    assert rows[2]["compile_cache"]["dir"].endswith("compile-loop_fast")  # the cache e2e-rte filled
    assert "Self CPU time total" in next(out.glob("*-profile.txt")).read_text()

    (e2e,) = out.glob("*-end-to-end.jsonl")
    rows = [json.loads(line) for line in e2e.read_text().splitlines()]
    rte = [r for r in rows if r["task"] == "rte"]
    assert [(r["path"], r["cache"]) for r in rte] == [
        ("trainer", "cold"),
        ("loop_eager", "cold"),
        ("loop_fast", "cold"),
        ("loop_fast", "warm"),
    ]
    check_end_to_end(rte, "rte", 2, allow_lone_warm=True)  # 32 rows / 16, one epoch
    assert rte[0]["speedup_vs_trainer"] == 1.0
    assert rte[2]["speedup_vs_trainer"] == pytest.approx(rte[0]["wall_s"] / rte[2]["wall_s"], rel=1e-2)
    mrpc = [r for r in rows if r["task"] == "mrpc"]  # on the cache RTE filled: warm (same model shape)
    assert [(r["path"], r["cache"]) for r in mrpc] == [("loop_fast", "warm")]
    check_end_to_end(mrpc, "mrpc", 2)
    assert all(r["task_dir"].startswith(str(SHARED_GLUE)) for r in rows) or not real

    (runs,) = out.glob("*-runs.jsonl")
    rows = {r["run"]: r for r in map(json.loads, runs.read_text().splitlines())}
    assert sorted(rows) == ["bf16", "fp16", "zero2-bf16"]
    assert rows["bf16"]["precision"] == "bf16" and rows["zero2-bf16"]["deepspeed_stage"] == 2
    assert all(
        r["rc"] == 0 and r["steps"] == 4 and r["dev"]["validation"]["score"] >= 0 for r in rows.values()
    )
    tables = summary.read_text()
    assert " | tiny | mnli | " in tables and " | rte | tiny | " in tables and "| zero2-bf16 | 0 |" in tables
