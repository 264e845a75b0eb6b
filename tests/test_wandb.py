"""W&B tracking, offline only: what the real program writes into W&B's own run files.

wandb 0.31 writes offline runs only as the binary ``run-<id>.wandb`` (a LevelDB-style log of protobuf
``Record`` messages, no summary json). ``read_wandb_file`` below parses it; it relies on wandb internals, so
pyproject's ``test`` extra pins the wandb range this was tested with (``wandb>=0.31,<0.32``).
Every W&B path (run dir, cache, config, data, HOME) points into the test's temp folder.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SMOKE, run_train

from train.config import load_config
from train.errors import ConfigError
from train.tracking.throughput import PEAK_TFLOPS, peak_flops
from train.tracking.tracker import Tracker, read_metrics
from train.tracking.wandb_sink import resolve_wandb

# ----------------------------------------------------------------------------------------------------------
# reading run-<id>.wandb

BLOCK = 32768  # wandb's record log: 7-byte file header, then 32 KiB blocks of chunks
HEADER = 7  # chunk header: crc32 (uint32) | length (uint16) | type (uint8), little-endian
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    path: Path
    run: Any = None  # the RunRecord
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per history row, with "_step"
    summary: dict = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)  # MetricRecords (define_metric)
    kinds: list[str] = field(default_factory=list)  # record types in order

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    def series(self, key: str) -> list[tuple[int, Any]]:
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_records(path: Path) -> list[Any]:
    """Every protobuf ``Record`` of a ``.wandb`` file, checking the framing and each chunk's CRC."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb 0.31 record log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: zero padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding / preallocated tail
            pos += HEADER
            continue
        data = raw[pos + HEADER : pos + HEADER + length]
        assert len(data) == length, f"{path}: truncated chunk at {pos}"
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad CRC at {pos}"
        pos += HEADER + length
        pending = data if kind in (FULL, FIRST) else pending + data
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def read_wandb_file(path: Path) -> WandbRun:
    out = WandbRun(Path(path))
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        out.kinds.append(kind)
        if kind == "run":
            out.run = rec.run
            out.config.update({_key(u): json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out.config.update({_key(u): json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            row["_step"] = rec.history.step.num if rec.history.HasField("step") else row["_step"]
            out.history.append(row)
        elif kind == "summary":
            out.summary.update({_key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "metric":
            out.metrics.append(rec.metric)
    return out


def wandb_files(root: Path) -> list[Path]:
    """All run files under ``root``, oldest run folder first (folder names start with the start time)."""
    return sorted(Path(root).rglob("run-*.wandb"), key=lambda p: p.parent.name)


# ----------------------------------------------------------------------------------------------------------
# fixtures

TRAIN_KEYS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/epoch",
    "perf/samples_per_s",
    "perf/tokens_per_s",
    "perf/padding_efficiency",
]
EVAL_KEYS = ["eval/accuracy", "eval/score", "eval/loss"]  # SST-2: accuracy; score = mean of GLUE metrics
CANARY = "canary0secret0" * 3  # 42 characters, like an API key


def wandb_env(tmp: Path) -> dict[str, str]:
    """Everything W&B writes lands in ``tmp``; an API key canary must never reach the run files."""
    for sub in ("wandb-dir", "cache", "config", "data", "home"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    return {
        "WANDB_DIR": str(tmp / "wandb-dir"),
        "WANDB_CACHE_DIR": str(tmp / "cache"),
        "WANDB_CONFIG_DIR": str(tmp / "config"),
        "WANDB_DATA_DIR": str(tmp / "data"),
        "HOME": str(tmp / "home"),
        "WANDB_API_KEY": CANARY,
        "WANDB_SILENT": "true",
    }


@pytest.fixture(autouse=True)
def _no_ambient_wandb(monkeypatch):
    """A developer's or CI's WANDB_* variables must not change what these tests see."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)


SHORT = ["train.max_steps=12", "train.log_every=4", "eval.every_steps=8", "eval.predict_test=false"]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> dict:
    """One real 1-process run in offline mode (12 steps, logs at 4, 8, 12, evals at 8 and 12)."""
    tmp = tmp_path_factory.mktemp("wandb-offline")
    env = wandb_env(tmp)
    out = tmp / "out"
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("WANDB_")]}
    try:
        t0 = time.perf_counter()
        proc = run_train(
            [
                "--config",
                str(SMOKE),
                f"output_dir={out}",
                "tracking.wandb.project=glue-test",
                "tracking.wandb.mode=offline",
                "tracking.wandb.group=sweep-a",
                "tracking.wandb.tags=smoke,ci",
                *SHORT,
            ],
            env=env,
        )
        seconds = time.perf_counter() - t0
    finally:
        os.environ.update(saved)
    return {"tmp": tmp, "out": out, "env": env, "proc": proc, "seconds": seconds}


# ----------------------------------------------------------------------------------------------------------
# a real offline run


def test_offline_run_records_config_history_summary(offline_run):
    tmp, out = offline_run["tmp"], offline_run["out"]
    files = wandb_files(tmp)
    assert len(files) == 1, files
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert files[0].name == f"run-{run_id}.wandb"
    assert files[0].is_relative_to(tmp / "wandb-dir" / "wandb")  # WANDB_DIR is respected
    wb = read_wandb_file(files[0])

    # identity
    assert wb.run.run_id == run_id and wb.run.project == "glue-test"
    assert wb.run.display_name == "sst2-tiny-bert-s42"
    assert wb.run.run_group == "sweep-a" and list(wb.run.tags) == ["smoke", "ci"]

    # config = resolved config + derived values
    cfg, info = wb.config, wb.config["run"]
    assert cfg["data"]["task"] == "sst2" and cfg["train"]["effective_batch_size"] == 16
    assert cfg["train"]["max_steps"] == 12 and cfg["tracking"]["wandb"]["project"] == "glue-test"
    assert cfg["precision"] == "auto"  # the config as asked for; what it meant is in run (below)
    assert info["world_size"] == 1 and info["per_device_batch_size"] == 16 and info["grad_accum_steps"] == 1
    assert info["device"] == "cpu" and info["precision"] == "no"
    assert {"torch", "transformers", "accelerate", "wandb"} <= set(info["versions"])
    assert "slurm" in info and info["flops_per_token"] > 0 and info["peak_tflops_per_device"] is None
    if (REPO / ".git").exists():
        assert len(info.get("git", {}).get("sha", info.get("git_sha", ""))) == 40, info.get("git")
    blob = json.dumps(cfg)
    for name in ("WANDB_DIR", "WANDB_API_KEY", "PYTHONPATH", "GLUE_TRAIN_CACHE", "OMP_NUM_THREADS"):
        assert name not in blob, f"{name}: the environment leaked into the run config"

    # the key never reaches any file W&B wrote
    for p in tmp.rglob("*"):
        if p.is_file():
            assert CANARY.encode() not in p.read_bytes(), f"API key written to {p}"

    # x axis: the optimizer step
    assert any(m.glob_name == "*" and m.step_metric == "train/global_step" for m in wb.metrics)
    assert wb.steps == sorted(set(wb.steps)), f"history steps not strictly increasing: {wb.steps}"

    # history: every metric key at the steps of metrics.jsonl, same values
    rows = read_metrics(out / "metrics.jsonl")
    for key in [*TRAIN_KEYS, *EVAL_KEYS]:
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert want, f"{key} missing from metrics.jsonl"
        got = wb.series(key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-9), key
        assert all(row["train/global_step"] == row["_step"] for row in wb.history if key in row)
    assert [s for s, _ in wb.series("train/loss")] == [4, 8, 12]
    assert [s for s, _ in wb.series("eval/score")] == [8, 12]
    # CPU: no peak FLOP/s known, no CUDA memory -> absent (not zero)
    assert not any("perf/mfu" in row or "memory/max_allocated_gib" in row for row in wb.history)
    assert 0 < wb.series("perf/padding_efficiency")[0][1] <= 1

    # summary: last values + the best eval (= eval_results.json's best)
    best = json.loads((out / "eval_results.json").read_text())["best"]
    assert wb.summary["best/step"] == best["step"]
    assert wb.summary["best/score"] == pytest.approx(best["splits"]["validation"]["score"])
    assert wb.summary["best/accuracy"] == pytest.approx(best["splits"]["validation"]["accuracy"])
    assert wb.summary["train/loss"] == pytest.approx(rows[-2]["train/loss"])
    assert wb.summary["eval/score"] == pytest.approx(rows[-1]["eval/score"])
    assert "exit" in wb.kinds  # finished cleanly

    # nothing outside the temp folder: debug logs went to WANDB_CACHE_DIR, not ~/.cache/wandb
    home = tmp / "home"
    assert not (home / ".cache" / "wandb").exists() and not (home / ".config" / "wandb").exists()
    assert any((tmp / "cache").rglob("*.log"))


def test_two_processes_make_one_wandb_run(tmp_path):
    env = wandb_env(tmp_path)
    out = tmp_path / "out"
    run_train(
        [
            "--config",
            str(SMOKE),
            f"output_dir={out}",
            "tracking.wandb.project=glue-test",
            "tracking.wandb.mode=offline",
            "train.max_steps=6",
            "train.log_every=3",
            "eval.predict_test=false",
        ],
        nproc=2,
        env=env,
    )
    files = wandb_files(tmp_path)
    assert len(files) == 1, files
    assert (
        len([d for d in (tmp_path / "wandb-dir" / "wandb").iterdir() if d.name.startswith("offline-run-")])
        == 1
    )
    wb = read_wandb_file(files[0])
    assert wb.run.run_id == (out / "wandb_run_id.txt").read_text().strip()
    assert wb.config["run"]["world_size"] == 2 and wb.config["run"]["per_device_batch_size"] == 8
    assert [s for s, _ in wb.series("train/loss")] == [3, 6]
    assert [s for s, _ in wb.series("eval/score")] == [6]


def test_sigterm_and_resume_continue_the_same_run(tmp_path):
    """SIGTERM to the whole process group (as SLURM does) mid-run: checkpoint, exit 0, W&B run marked
    preempting; the restart continues the same W&B run id with strictly increasing steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **wandb_env(tmp_path)}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--config",
        str(SMOKE),
        f"output_dir={out}",
        "tracking.wandb.project=glue-test",
        "tracking.wandb.mode=offline",
        "train.max_steps=24",
        "train.log_every=2",
        "checkpoint.every_steps=8",
        "eval.predict_test=false",
    ]
    first = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if metrics.exists() and any(r["step"] >= 2 for r in read_metrics(metrics)):
            break
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGTERM)
    log1, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log1[-4000:]
    assert not (out / "eval_results.json").exists(), "the run ended before the signal; nothing was tested"
    stopped = max(r["step"] for r in read_metrics(metrics))
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert json.loads((ckpt / "trainer_state.json").read_text())["train_state"]["wandb_run_id"] == run_id

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (out / "eval_results.json").exists()
    assert (out / "wandb_run_id.txt").read_text().strip() == run_id

    files = wandb_files(tmp_path)
    assert len(files) == 2, files  # one offline folder per process start, both the same run
    a, b = (read_wandb_file(p) for p in files)
    assert a.run.run_id == b.run.run_id == run_id
    assert "preempting" in a.kinds and "preempting" not in b.kinds
    steps = a.steps + b.steps
    assert steps == sorted(set(steps)), (
        f"steps go backwards or repeat across the restart: {a.steps} | {b.steps}"
    )
    assert a.steps and max(a.steps) <= stopped < min(b.steps)
    assert max(b.steps) == 24
    # together the two files hold every row of the final metrics.jsonl (rewound and rewritten on resume)
    rows = read_metrics(metrics)
    logged = {s for f in (a, b) for s, _ in f.series("train/loss")}
    assert logged == {r["step"] for r in rows if "train/loss" in r}


BLOCKER = """\
import sys
sys.modules["wandb"] = None  # as if wandb were not installed: find_spec() -> None, import -> ModuleNotFoundError
"""


def test_without_wandb_installed(tmp_path, offline_run):
    """wandb unimportable (an import blocker): with tracking off, training runs and leaves no W&B files."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**wandb_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(REPO)])}
    probe = subprocess.run(
        [sys.executable, "-c", "import wandb"], env={**os.environ, **env}, capture_output=True
    )
    assert probe.returncode != 0, "the import blocker does not block"

    out = tmp_path / "out"
    run_train(["--config", str(SMOKE), f"output_dir={out}", *SHORT], env=env)
    assert (out / "eval_results.json").exists()
    leftovers = [p for p in tmp_path.rglob("*") if "wandb" in p.name and p.name != "wandb-dir"]
    assert not leftovers, leftovers
    assert not any((tmp_path / "wandb-dir").iterdir()) and not any((tmp_path / "cache").iterdir())
    # metrics.jsonl has the same keys, row for row, whether or not W&B is on
    with_wb = read_metrics(offline_run["out"] / "metrics.jsonl")
    without = read_metrics(out / "metrics.jsonl")
    assert [sorted(r) for r in without] == [sorted(r) for r in with_wb]


def test_tracking_on_without_wandb_is_a_config_error(tmp_path, monkeypatch):
    """Asked for W&B but wandb is missing: a ConfigError (exit 2, one paragraph) on every rank, before training."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec -> None, as when not installed
    cfg = load_config(SMOKE, ["tracking.wandb.project=glue"])
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        Tracker(cfg, tmp_path, main=False)
    assert Tracker(load_config(SMOKE), tmp_path, main=True).settings is None  # tracking off: fine


# ----------------------------------------------------------------------------------------------------------
# settings and figures (no training)


def test_settings_from_config_and_environment(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(SMOKE)
    assert resolve_wandb(cfg, out, {}) is None  # no project anywhere: off
    s = resolve_wandb(cfg, out, {"WANDB_PROJECT": "p"})
    assert s is not None and (s.project, s.mode, s.name, s.dir) == ("p", "online", "sst2-tiny-bert-s42", out)
    assert resolve_wandb(cfg, out, {"WANDB_PROJECT": "p", "WANDB_MODE": "offline"}).mode == "offline"
    assert resolve_wandb(cfg, out, {"WANDB_PROJECT": "p", "WANDB_MODE": "dryrun"}).mode == "offline"
    assert resolve_wandb(cfg, out, {"WANDB_PROJECT": "p", "WANDB_MODE": "disabled"}) is None
    assert resolve_wandb(cfg, out, {"WANDB_PROJECT": "p", "WANDB_DIR": "/x"}).dir == Path("/x")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        resolve_wandb(cfg, out, {"WANDB_PROJECT": "p", "WANDB_MODE": "sometimes"})

    cfg = load_config(
        SMOKE,
        [
            "tracking.wandb.project=q",
            "tracking.wandb.mode=offline",
            "tracking.wandb.name=n",
            "tracking.wandb.entity=team",
            "tracking.wandb.dir=/d",
        ],
    )
    s = resolve_wandb(cfg, out, {"WANDB_PROJECT": "p", "WANDB_MODE": "online"})  # explicit config wins
    assert (s.project, s.mode, s.name, s.entity, s.dir) == ("q", "offline", "n", "team", Path("/d"))
    assert (
        resolve_wandb(load_config(SMOKE, ["tracking.wandb.mode=disabled"]), out, {"WANDB_PROJECT": "p"})
        is None
    )
    with pytest.raises(ConfigError, match="no W&B project"):
        resolve_wandb(load_config(SMOKE, ["tracking.wandb.mode=offline"]), out, {})
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_config(SMOKE, ["tracking.wandb.mode=sometimes"])


def test_peak_table_and_throughput():
    import torch

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == pytest.approx(312e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "no") == pytest.approx(19.5e12)
    assert peak_flops("NVIDIA A10", "bf16") == pytest.approx(125e12)
    assert peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)
    assert peak_flops("NVIDIA L40S", "bf16") == pytest.approx(362.1e12)
    assert peak_flops("cpu", "no") is None and peak_flops("Some Future GPU", "bf16") is None
    assert all(half >= single for _, half, single in PEAK_TFLOPS)

    t = Tracker(load_config(SMOKE), Path("/nonexistent"), main=False)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4))
    assert t.start(None, 0, model, torch.device("cpu"), "cpu", "no", 2) is None  # not main: no W&B, no files
    assert t.speed.flops_per_token == 6 * (8 * 4 + 4)  # the embedding table costs no FLOPs
    row = t.throughput(tokens=800.0, padded=1000.0, elapsed=2.0)
    assert row == {"perf/tokens_per_s": 400.0, "perf/padding_efficiency": 0.8}  # CPU: no mfu, no memory
    t.speed.peak = 1e9  # as if on a GPU with a known peak
    assert t.throughput(800.0, 1000.0, 2.0)["perf/mfu"] == pytest.approx(6 * 36 * 400.0 / (2 * 1e9))


def test_resume_after_crash_never_resends_steps(tmp_path, monkeypatch):
    """A crash (no preemption checkpoint) resumes from an older checkpoint than the last logged step: the
    rows W&B already holds are not sent again, so its history never goes backwards. In-process, offline."""
    import torch
    import wandb

    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(SMOKE, ["tracking.wandb.project=glue-test", "tracking.wandb.mode=offline"])
    model = torch.nn.Linear(4, 2)
    cpu = torch.device("cpu")
    try:
        first = Tracker(cfg, out, main=True)
        first.rewind(0)
        run_id = first.start(None, 0, model, cpu, "cpu", "no", 1)
        for step in (2, 4, 6):
            first.write({"step": step, "epoch": step / 10, "train/loss": float(step)})
        first.close()  # (a crash would leave the same rows behind, minus what was not flushed)

        second = Tracker(cfg, out, main=True)
        second.rewind(4)  # resumed from the checkpoint of step 4: metrics.jsonl drops step 6
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4]
        assert second.start(run_id, 4, model, cpu, "cpu", "no", 1) == run_id
        for step in (6, 8):
            second.write({"step": step, "epoch": step / 10, "train/loss": float(step) + 0.5})
        second.close()
    finally:
        wandb.teardown()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4, 6, 8]
    a, b = (read_wandb_file(p) for p in wandb_files(tmp_path))
    assert a.run.run_id == b.run.run_id == run_id
    assert a.steps == [2, 4, 6] and b.steps == [8]
    assert b.series("train/loss") == [(8, 8.5)]
