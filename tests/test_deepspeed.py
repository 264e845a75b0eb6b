"""DeepSpeed ZeRO-1/2/3 (+ CPU offload) through the same loop: numerically DDP, resumable, exportable.

Slow tests launch the real program with ``accelerate launch --config_file configs/accelerate/<name>.yaml`` as
2 real processes on the CPU (DeepSpeed's CPU accelerator over gloo): fp32, dropout 0, the bundled tiny model
and SST-2 sample, 128 rows x 2 epochs = 16 optimizer steps of 16 samples = 4 per device x accumulation 2 x 2
processes. Runs are launched once per module and shared between assertions (see ``RUNS``).

The fast tests check the config files and the DeepSpeed config filling of ``train/engine/backends/deepspeed.py`` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SMOKE, accelerate_cmd, load_weights

from train.config import load_config
from train.engine import backends
from train.engine.backends import deepspeed as backend
from train.errors import ConfigError
from train.tracking.tracker import read_metrics

ACCEL = REPO / "configs" / "accelerate"
DSDIR = REPO / "configs" / "deepspeed"
COMMON = [
    "model.dropout=0",
    "precision=no",
    "train.per_device_batch_size=4",
    "train.log_every=1",
    "data.max_train_samples=128",
    "train.epochs=2",
    "eval.predict_test=false",
]
STEPS = 16
RTOL = 1e-5
# bf16 ZeRO-2 vs fp32 ZeRO-2, per-step train loss (measured on CPU: <= 4e-4 relative over the 16 steps)
BF16_LOSS_RTOL = 2e-2
# name -> (accelerate config, processes, extra overrides)
RUNS: dict[str, tuple[str, int, list[str]]] = {
    "ddp": ("ddp.yaml", 2, []),
    "single": ("single.yaml", 1, []),
    "zero1": ("zero1.yaml", 2, []),
    "zero2": ("zero2.yaml", 2, []),
    "zero3": ("zero3.yaml", 2, []),
    "zero3_offload": ("zero3_offload.yaml", 2, []),
    "zero2_bf16": ("zero2.yaml", 2, ["precision=bf16"]),
}
RESUME_RUN = "zero3.yaml"  # test_zero3_resume_after_sigterm
CONFLICT_BASE = "zero2.json"  # test_conflicting_micro_batch_is_rejected
STAGE = {"zero1.yaml": 1, "zero2.yaml": 2, "zero3.yaml": 3, "zero3_offload.yaml": 3}
# Values the run config decides: every DeepSpeed JSON must leave them to it.
AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "fp16.enabled",
    "bf16.enabled",
    "data_types.grad_accum_dtype",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
)


def launch_cmd(accel_yaml: Path, nproc: int, out: Path, extra: list[str]) -> list[str]:
    args = ["--config", str(SMOKE), f"output_dir={out}", *COMMON, *extra]
    return accelerate_cmd(["--config_file", str(accel_yaml)], nproc, args)


def launch_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(
    accel_yaml: Path, nproc: int, out: Path, extra: list[str], check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    cmd = launch_cmd(accel_yaml, nproc, out, extra)
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


class Runs:
    """Each run of ``RUNS`` is launched on first use and shared by every test of the module."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def __getitem__(self, name: str) -> tuple[Path, str]:
        if name not in self.done:
            accel, nproc, extra = RUNS[name]
            out = self.root / name
            proc = launch(ACCEL / accel, nproc, out, extra)
            self.done[name] = (out, proc.stdout + proc.stderr)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("ds-runs"))


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element difference relative to the tensor's scale (as in test_batch_invariance)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def assert_same_training(run: Path, ref: Path, name: str) -> None:
    rows, ref_rows = train_rows(run), train_rows(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), name
    assert [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert [r["train/lr"] for r in rows] == [r["train/lr"] for r in ref_rows], name
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=RTOL), (name, a["step"])
        # the engine's global norm (DeepSpeed clips inside its step) is the DDP clip_grad_norm_ one
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=RTOL), (name, a["step"])
    weights, ref_weights = load_weights(run), load_weights(ref)
    assert sorted(weights) == sorted(ref_weights), name
    for key, value in ref_weights.items():
        if key.endswith("attention.self.key.bias"):
            # Softmax ignores a bias added to every key: its gradient is rounding noise that Adam turns into
            # +-lr steps, different for any change of summation order (see test_batch_invariance.py).
            continue
        assert weights[key].dtype == value.dtype == torch.float32, (name, key)
        assert rel_diff(weights[key], value) <= RTOL, (name, key, rel_diff(weights[key], value))


def assert_deepspeed_stage(run: Path, log: str, stage: int) -> dict:
    """The run really went through DeepSpeed (not DDP, which Accelerate silently falls back to on CPU)."""
    info = json.loads((run / "run_info.json").read_text())
    assert info["distributed_type"] == "DistributedType.DEEPSPEED"
    assert (info["world_size"], info["per_device_batch_size"], info["grad_accum_steps"]) == (2, 4, 2)
    assert f"DeepSpeed ZeRO-{stage}: micro batch 4 x accumulation 2 x 2 processes = 16" in log
    ds = info["deepspeed"]
    assert ds["zero_stage"] == stage and ds["optimizer"] == "AdamW"
    assert {
        k: ds["config"][k]
        for k in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "gradient_clipping",
        )
    } == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "gradient_clipping": 1.0,
    }
    assert (
        ds["config"]["bf16.enabled"] == (info["precision"] == "bf16")
        and ds["config"]["fp16.enabled"] is False
    )
    return ds


# ----------------------------------------------------------------------------------------------------------
# slow: real 2-process runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_zero_matches_ddp(runs, name):
    ddp, _ = runs["ddp"]
    info = json.loads((ddp / "run_info.json").read_text())
    assert info["distributed_type"] == "DistributedType.MULTI_CPU" and info["grad_accum_steps"] == 2
    assert "deepspeed" not in info and info["backend"] == "DDP (2 processes, gloo backend)"
    run, log = runs[name]
    ds = assert_deepspeed_stage(run, log, STAGE[RUNS[name][0]])
    offload = ds["config"].get("zero_optimization.offload_optimizer.device", "none")
    assert offload == ("cpu" if name.endswith("offload") else "none")
    assert_same_training(run, ddp, name)
    ev, ref_ev = (json.loads((d / "eval_results.json").read_text()) for d in (run, ddp))
    for which in ("final", "best"):
        got, want = ev[which]["splits"]["validation"], ref_ev[which]["splits"]["validation"]
        assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=RTOL)


@pytest.mark.slow
def test_single_process_matches_ddp(runs):
    """configs/accelerate/single.yaml: 1 process x 4 per device x accumulation 4, the same training."""
    run, _ = runs["single"]
    info = json.loads((run / "run_info.json").read_text())
    assert (info["world_size"], info["grad_accum_steps"], info["distributed_type"]) == (
        1,
        4,
        "DistributedType.NO",
    )
    assert_same_training(run, runs["ddp"][0], "single")


@pytest.mark.slow
def test_bf16_zero2_tracks_fp32(runs):
    run, log = runs["zero2_bf16"]
    ref, _ = runs["zero2"]
    ds = assert_deepspeed_stage(run, log, 2)
    assert json.loads((run / "run_info.json").read_text())["precision"] == "bf16"
    assert ds["config"]["bf16.enabled"] is True and ds["config"]["data_types.grad_accum_dtype"] == "fp32"
    rows, ref_rows = train_rows(run), train_rows(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    diffs = [
        abs(a["train/loss"] - b["train/loss"]) / b["train/loss"] for a, b in zip(rows, ref_rows, strict=True)
    ]
    assert max(diffs) <= BF16_LOSS_RTOL, diffs
    assert max(diffs) > 0, "bf16 gave bit-identical losses: it did not train in bf16"
    weights = load_weights(run)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}  # DeepSpeed bf16 holds the model in bf16
    got = json.loads((run / "eval_results.json").read_text())["final"]["splits"]["validation"]["loss"]
    want = json.loads((ref / "eval_results.json").read_text())["final"]["splits"]["validation"]["loss"]
    assert got == pytest.approx(want, rel=BF16_LOSS_RTOL)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.Process(launcher.pid).children(recursive=False)
        if "train" in p.cmdline() and "-m" in p.cmdline()
    ]


@pytest.mark.slow
def test_zero3_resume_after_sigterm(runs, tmp_path):
    """SIGTERM mid-run -> checkpoint -> exit 0; the same command resumes; the losses and weights are those
    of the uninterrupted ZeRO-3 run."""
    out = tmp_path / "zero3-resumed"
    extra = ["checkpoint.every_steps=5"]
    cmd = launch_cmd(ACCEL / RESUME_RUN, 2, out, extra)
    first = subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 600
        while not (out / "metrics.jsonl").exists() or not train_rows(out):
            assert first.poll() is None, (
                f"the run ended before it was signalled:\n{first.stdout.read()[-4000:]}"
            )
            assert time.time() < deadline
            time.sleep(0.05)
        pids = worker_pids(first)
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        log1, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log1[-6000:]
    assert not (out / "eval_results.json").exists(), "the signal came too late: the run had finished"
    (ckpt,) = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())[-1:]
    stopped = int(ckpt.name.split("-")[1])
    assert 1 <= stopped < STEPS
    assert list(ckpt.rglob("*optim_states.pt")), "no DeepSpeed ZeRO optimizer shards in the checkpoint"
    assert max(r["step"] for r in train_rows(out)) == stopped

    second = launch(ACCEL / RESUME_RUN, 2, out, extra)
    assert (
        f"at step {stopped}" in second.stdout + second.stderr
        and "resumed from" in second.stdout + second.stderr
    )
    assert_same_training(out, runs["zero3"][0], "zero3 resumed")
    assert [r["train/loss"] for r in train_rows(out)] == pytest.approx(
        [r["train/loss"] for r in train_rows(runs["zero3"][0])], rel=1e-6
    )


FRESH_EVAL = textwrap.dedent("""
    import json, sys
    sys.modules["deepspeed"] = None  # the reading side has no DeepSpeed: `import deepspeed` fails
    import numpy as np, torch
    from pathlib import Path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from train.data.glue import BUILTIN_DATA, read_tsv
    from train.data.metrics import compute_metrics
    from train.tasks import TASKS

    final = Path(sys.argv[1])
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    task = TASKS["sst2"]
    split = task.split("dev")[0]
    dev = read_tsv(Path(BUILTIN_DATA["builtin:glue-sample"]) / split.tsv, task, split)
    with torch.no_grad():
        enc = tok(dev["sentence"], truncation=True, max_length=128, padding=True, return_tensors="pt")
        logits = model(**enc).logits.float()
    labels = torch.tensor(dev["label"])
    got = compute_metrics(task, logits.argmax(-1).numpy(), labels.numpy())
    got["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    got["deepspeed_imported"] = sys.modules.get("deepspeed") is not None
    got["dtype"] = str(next(model.parameters()).dtype)
    print(json.dumps(got))
""")


@pytest.mark.slow
def test_zero3_export_loads_without_deepspeed(runs):
    """final/ of a ZeRO-3 run (gathered from the shards) is a plain HF folder: from_pretrained in a fresh
    process without DeepSpeed gives the run's dev metrics."""
    run, _ = runs["zero3"]
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_EVAL, str(run / "final")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = json.loads((run / "eval_results.json").read_text())["final"]
    assert want["step"] == STEPS
    assert not got["deepspeed_imported"] and got["dtype"] == "torch.float32"
    assert got["accuracy"] == want["splits"]["validation"]["accuracy"]
    assert got["loss"] == pytest.approx(want["splits"]["validation"]["loss"], rel=RTOL)


@pytest.mark.slow
def test_conflicting_micro_batch_is_rejected(tmp_path):
    """A user JSON hard-coding train_micro_batch_size_per_gpu=8 while the run config gives 4: the project's
    one-paragraph error naming both values, not DeepSpeed's bare batch assertion."""
    ds = json.loads((DSDIR / CONFLICT_BASE).read_text())
    ds["train_micro_batch_size_per_gpu"] = 8
    (tmp_path / "mine.json").write_text(json.dumps(ds))
    accel = yaml.safe_load((ACCEL / "zero2.yaml").read_text())
    accel["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "mine.json")
    (tmp_path / "accel.yaml").write_text(yaml.safe_dump(accel))
    proc = launch(tmp_path / "accel.yaml", 2, tmp_path / "run", [], check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    msg = [ln for ln in out.splitlines() if ln.startswith("error: DeepSpeed config")]
    assert msg, out[-4000:]
    assert "train_micro_batch_size_per_gpu=8 contradicts the run config" in msg[0]
    assert "train_micro_batch_size_per_gpu=4" in msg[0] and "train.per_device_batch_size" in msg[0]
    assert "Traceback" not in "\n".join(ln for ln in out.splitlines() if ln.startswith("[rank"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------
# fast: config files and the DeepSpeed config filling


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_every_config_file_parses_and_is_used_by_a_test():
    from accelerate.commands.config.config_args import load_config_from_file

    accel_files = sorted(p.name for p in ACCEL.glob("*.yaml") if p.name != "fsdp.yaml")  # tests/test_fsdp.py
    ds_files = sorted(p.name for p in DSDIR.glob("*.json"))
    assert accel_files == sorted(
        ["single.yaml", "ddp.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml"]
    )
    used_accel = {accel for accel, _, _ in RUNS.values()} | {RESUME_RUN}
    assert used_accel == set(accel_files), set(accel_files) - used_accel
    referenced = set()
    for name in accel_files:
        cfg = load_config_from_file(str(ACCEL / name))  # Accelerate's own parser
        ds_file = (cfg.deepspeed_config or {}).get("deepspeed_config_file")
        if name.startswith("zero"):
            assert str(cfg.distributed_type) == "DistributedType.DEEPSPEED", name
            assert (REPO / ds_file).is_file(), (name, ds_file)
            referenced.add(Path(ds_file).name)
            ds = json.loads((REPO / ds_file).read_text())
            assert ds["zero_optimization"]["stage"] == STAGE[name]
            assert cfg.mixed_precision in (None, "no"), "precision comes from the run config"
        else:
            assert ds_file is None
    assert referenced | {CONFLICT_BASE} == set(ds_files)
    assert (
        json.loads((DSDIR / "zero3_offload.json").read_text())["zero_optimization"]["offload_optimizer"][
            "device"
        ]
        == "cpu"
    )
    for name in ds_files:
        ds = json.loads((DSDIR / name).read_text())
        for key in AUTO_KEYS:
            assert _get(ds, key) == "auto", (name, key)
        assert "scheduler" not in ds, name


def _cfg(*overrides: str):
    return load_config(SMOKE, ["precision=no", *overrides])  # setup() resolves "auto" before prepare


def _zero2() -> dict:
    return json.loads((DSDIR / "zero2.json").read_text())


def test_fill_from_run_config():
    cfg = _cfg("train.max_grad_norm=0.5", "precision=no")
    raw = _zero2()
    live = backend.check_and_fill(json.loads(json.dumps(raw)), raw, cfg, 4, 2, 2, "zero2.json")
    assert (
        live["train_micro_batch_size_per_gpu"],
        live["gradient_accumulation_steps"],
        live["train_batch_size"],
        live["gradient_clipping"],
    ) == (4, 2, 16, 0.5)
    assert live["fp16"]["enabled"] is False and live["bf16"]["enabled"] is False
    assert "grad_accum_dtype" not in live["data_types"]  # fp32 training: DeepSpeed's default
    assert "optimizer" not in live  # built from the run config in code
    assert live["zero_allow_untested_optimizer"] is True and live["zero_force_ds_cpu_optimizer"] is False
    assert not [k for k, v in backend._walk(live) if v == "auto" and "bucket" not in k]

    bf16 = backend.check_and_fill(
        _zero2(), _zero2(), _cfg("precision=bf16", "train.max_grad_norm=null"), 8, 1, 2, "zero2.json"
    )
    assert bf16["bf16"]["enabled"] is True and bf16["data_types"]["grad_accum_dtype"] == "fp32"
    assert bf16["gradient_clipping"] == 0.0 and bf16["train_batch_size"] == 16

    z3 = json.loads((DSDIR / "zero3_offload.json").read_text())
    live = backend.check_and_fill(json.loads(json.dumps(z3)), z3, _cfg(), 16, 1, 1, "zero3_offload.json")
    assert live["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert backend.offloads_optimizer(live) and not backend.offloads_optimizer(_zero2())


def test_hard_coded_values_must_agree():
    cfg = _cfg("train.lr=3e-5")
    raw = {
        **_zero2(),
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 16,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": False},
    }
    raw["optimizer"] = {
        "type": "AdamW",
        "params": {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    }
    backend.check_and_fill(json.loads(json.dumps(raw)), raw, cfg, 4, 2, 2, "mine.json")  # all agree

    cases = {
        "train_micro_batch_size_per_gpu": (
            8,
            ["train_micro_batch_size_per_gpu=8", "=4", "train.per_device_batch_size"],
        ),
        "gradient_accumulation_steps": (
            4,
            ["gradient_accumulation_steps=4", "gradient_accumulation_steps=2"],
        ),
        "train_batch_size": (
            32,
            ["train_batch_size=32", "train_batch_size=16", "train.effective_batch_size"],
        ),
        "gradient_clipping": (0.5, ["gradient_clipping=0.5", "gradient_clipping=1.0", "train.max_grad_norm"]),
        "bf16.enabled": (True, ["bf16.enabled=true", "bf16.enabled=false", "precision=no"]),
        "optimizer.params.lr": (1e-3, ["optimizer.params.lr=0.001", "optimizer.params.lr=3e-05", "train.lr"]),
        "optimizer.type": ("Lamb", ["optimizer.type='Lamb'", "AdamW"]),
    }
    for key, (value, needles) in cases.items():
        bad = json.loads(json.dumps(raw))
        *parents, leaf = key.split(".")
        node = bad
        for part in parents:
            node = node[part]
        node[leaf] = value
        with pytest.raises(ConfigError) as e:
            backend.check_and_fill(json.loads(json.dumps(bad)), bad, cfg, 4, 2, 2, "mine.json")
        msg = str(e.value)
        assert msg.startswith("DeepSpeed config mine.json: ")
        for needle in needles:
            assert needle in msg, (key, needle, msg)


def test_rejects_scheduler_section_and_unfillable_auto():
    raw = {**_zero2(), "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    with pytest.raises(ConfigError, match="'scheduler' section"):
        backend.check_and_fill(json.loads(json.dumps(raw)), raw, _cfg(), 4, 2, 2, "x.json")
    raw = {**_zero2(), "zero_optimization": {"stage": 2, "sub_group_size": "auto"}}
    with pytest.raises(ConfigError, match="zero_optimization.sub_group_size"):
        backend.check_and_fill(json.loads(json.dumps(raw)), raw, _cfg(), 4, 2, 2, "x.json")
    z3 = json.loads((DSDIR / "zero3.json").read_text())
    z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save=false"):
        backend.check_and_fill(json.loads(json.dumps(z3)), z3, _cfg(), 4, 2, 2, "x.json")


def test_fused_adam_switch(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    params = [torch.nn.Parameter(torch.zeros(3, 3))]
    ddp = backends.current()
    assert ddp.name == "ddp"
    opt = ddp.make_optimizer(_cfg("train.lr=3e-4"), [{"params": params, "weight_decay": 0.1}])
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["lr"] == 3e-4
    with pytest.raises(ConfigError, match="needs a DeepSpeed launch"):
        ddp.make_optimizer(_cfg("deepspeed.fused_adam=true"), [{"params": params}])
    raw = _zero2()
    live = backend.check_and_fill(
        json.loads(json.dumps(raw)), raw, _cfg("deepspeed.fused_adam=true"), 4, 2, 2, "x"
    )
    assert live["zero_force_ds_cpu_optimizer"] is True


def test_zero3_parameter_rank_and_export_names():
    p = torch.nn.Parameter(torch.empty(0))
    zero = backend.DeepSpeed()
    assert zero.param_ndim(p) == 1
    p.ds_shape = torch.Size([4, 8])  # what a ZeRO-3 partitioned weight carries
    p.ds_numel = 32
    assert zero.param_ndim(p) == 2 and zero.param_numel(p) == 32

    class Conv:
        def __init__(self, used: bool):
            self.used = used

        def was_used(self) -> bool:
            return self.used

    model = torch.nn.Linear(2, 2)
    model._weight_conversions = [Conv(True), Conv(False)]
    backend.keep_used_weight_conversions(model)
    assert [c.used for c in model._weight_conversions] == [True]


def test_relative_deepspeed_config_path_is_found_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/zero2.json")
    backend.locate_config_file()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(DSDIR / "zero2.json")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/nope.json")
    with pytest.raises(ConfigError, match="nope.json' does not exist"):
        backend.locate_config_file()
