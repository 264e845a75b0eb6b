"""FSDP through the backend seam (train/engine/backends/fsdp.py): configs/accelerate/fsdp.yaml, DDP's math, exact resume,
a plain Hugging Face export.

Accelerate runs FSDP only from a GPU-like distributed type (accelerate/state.py: DistributedType.FSDP is set inside
the MULTI_GPU/NPU/XPU/... branch; a CPU launch is MULTI_CPU), so on this CPU machine the launch is refused with an
error (checked here, for real); the equivalence, resume and export tests need a GPU (``gpu`` marker, run by
bench/gpu_check.sh on a lent machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, SMOKE, accelerate_cmd, free_port, load_weights, run_train

FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"
EXACT = [
    "model.dropout=0",
    "precision=no",
    "train.log_every=1",
    "data.max_train_samples=128",
    "train.epochs=2",
    "eval.predict_test=false",
]


def launch(nproc: int, out, *extra: str, config=FSDP, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = accelerate_cmd(
        ["--config_file", str(config)], nproc, ["--config", str(SMOKE), f"output_dir={out}", *EXACT, *extra]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kw.get("popen"):
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_fsdp_config_is_fsdp2_with_layer_units():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(FSDP))
    assert str(cfg.distributed_type) == "DistributedType.FSDP"
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and cfg.mixed_precision in (None, "no")


def test_backend_seam_picks_fsdp_from_the_launch(monkeypatch):
    from train.engine.backends import current

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    backend = current()
    assert backend.name == "fsdp" and not backend.owns_optimizer_step and "FSDP" in backend.fast_path_off


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine FSDP runs (see the gpu tests)")
def test_fsdp_launch_without_gpus_is_refused_not_run_unsharded(tmp_path):
    proc = launch(2, tmp_path / "run")
    # the launcher reports the failed workers with its own traceback; the program's processes print none
    assert proc.returncode != 0 and f'File "{REPO}/train/' not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "an FSDP launch (configs/accelerate/fsdp.yaml) needs GPUs" in errors[0], (
        errors
    )
    assert not (tmp_path / "run").exists()


SHARD = """
import sys, torch, torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForSequenceClassification
from train.engine.backends.fsdp import layer_units

dist.init_process_group("gloo", rank=0, world_size=1)
acc = Accelerator(cpu=True)
for arg in sys.argv[1:]:
    folder, names = arg.rsplit("=", 1)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.transformer_cls_names_to_wrap = None if names == "accelerate" else layer_units(model)
    acc.state.fsdp_plugin = plugin  # Accelerate runs FSDP on GPUs only; its sharding function runs on CPU too
    try:
        model = fsdp2_prepare_model(acc, model)
        model(input_ids=torch.tensor([[2, 40, 41, 42, 3]]), labels=torch.tensor([1])).loss.backward()
    except Exception as e:
        print("RESULT", folder, "failed:", repr(e)[:200])
        continue
    units = sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})
    print("RESULT", folder, ",".join(units))
"""


def test_fsdp_layer_units_shard_every_family(families):
    """One FSDP unit per layer, the word embeddings on their own, for every family: Accelerate's own FSDP2
    sharding (one gloo process) with :func:`train.engine.backends.fsdp.layer_units`, then a forward and backward.
    Found on an H200: BERT lists its embeddings block among its layer classes, and with Accelerate's default
    (``_no_split_modules``) the word embeddings were sharded twice."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0"}
    env.update(WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    args = [f"{families['bert']}=accelerate", *(f"{folder}=ours" for folder in families.values())]
    proc = subprocess.run(
        [sys.executable, "-c", SHARD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(families) + 1, proc.stdout
    assert "value was None" in results[0][1], f"Accelerate's default now shards BERT: {results[0]}"
    for folder, units in results[1:]:
        assert not units.startswith("failed"), (folder, units)
        units = units.split(",")
        assert any("Embedding" in u for u in units) and len(units) >= 3, (
            folder,
            units,
        )  # root, embeddings, layers


# ----------------------------------------------------------------------------------------------------------
# on a GPU: FSDP == DDP, exact resume, export


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA GPU")
    n = min(2, torch.cuda.device_count())
    root = tmp_path_factory.mktemp("fsdp")
    ddp = root / "ddp"
    run_train(["--config", str(SMOKE), f"output_dir={ddp}", *EXACT], nproc=n)
    fsdp = root / "fsdp"
    proc = launch(n, fsdp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return n, ddp, fsdp


def _rows(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


@pytest.mark.gpu
def test_fsdp_matches_ddp(gpu_runs):
    _, ddp, fsdp = gpu_runs
    info = json.loads((fsdp / "run_info.json").read_text())
    assert info["backend"].startswith("FSDP2") and info["fsdp"]["fsdp_version"] == "2"
    a, b = _rows(ddp), _rows(fsdp)
    assert [r["train/lr"] for r in a] == [r["train/lr"] for r in b]
    assert [r["train/loss"] for r in b] == pytest.approx([r["train/loss"] for r in a], rel=1e-5)
    wa, wb = load_weights(ddp), load_weights(fsdp)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_fsdp_export_loads_with_plain_from_pretrained(gpu_runs):
    from transformers import AutoModelForSequenceClassification

    _, ddp, fsdp = gpu_runs
    model = AutoModelForSequenceClassification.from_pretrained(fsdp / "final")
    ref = load_weights(ddp)
    for key, value in model.state_dict().items():
        if key in ref:
            torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_fsdp_resume_after_sigterm_is_exact(gpu_runs, tmp_path):
    n, _, fsdp_ref = gpu_runs
    out = tmp_path / "resumed"
    first = launch(n, out, "checkpoint.every_steps=5", popen=True)
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").exists() or len(_rows(out)) < 3:
        assert first.poll() is None and time.time() < deadline, first.stdout.read()[-4000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # accelerate launch forwards it to the workers
    log, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and not (out / "eval_results.json").exists(), log[-4000:]
    second = launch(n, out, "checkpoint.every_steps=5")
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr[-4000:]
    wa, wb = load_weights(fsdp_ref), load_weights(out)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-8)
