"""``run_info.json``: what a run derived (never in its config), written at the start and completed at the end.

At the start: world, batch layout, precision, backend, versions, SLURM ids; at the end: the training time,
mean throughput and where W&B keeps the run. The dict lives in memory (``run.info``, also what W&B shows
beside the config); the file follows it.
"""

from __future__ import annotations

import json
import os

import torch

from train.engine import dist
from train.engine.run import Run
from train.files import write_atomic

SLURM_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_JOB_NODELIST",
)


def update_run_info(run: Run, **values) -> None:
    """Add ``values`` to ``run_info.json`` (the dict lives in memory, the main process writes the file)."""
    run.info.update(values)
    if run.acc.is_main_process:
        write_atomic(run.out / "run_info.json", json.dumps(run.info, indent=1))


def write_run_info(run: Run) -> None:
    """Derived values of this start: ``run_info.json`` from scratch."""
    import accelerate
    import transformers

    b, acc, lay = run.built, run.acc, run.layout
    info = {
        "world_size": lay.world,
        "per_device_batch_size": lay.per_device,
        "grad_accum_steps": lay.accum,
        "effective_batch_size": lay.effective,
        "precision": run.precision,
        "device": dist.device_name(acc),
        "distributed_type": str(acc.distributed_type),
        "backend": run.backend.title(acc),
        run.backend.name: run.backend.describe(acc),  # its own settings (e.g. the filled engine config)
        "card": run.backend.card(acc),  # what the model card says of the backend (train/outputs/card.py)
        "model_inputs": list(b.inputs.model_keys),
        "init_from": getattr(acc.unwrap_model(b.model), "init_source", None),  # train/model/warm_start.py
        "train_rows": b.data.train_rows,
        "steps_per_epoch": b.data.sampler.steps_per_epoch(),
        "total_steps": b.total_steps,
        **b.fast.run_info(),  # fast_path, compile_s, compile_cache (train/engine/fastpath.py)
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
    }
    run.info = {}
    update_run_info(run, **info)


def end_info(run: Run) -> dict:
    """What run_info.json gains at the end: training time and mean throughput over the whole run (all starts)."""
    st = run.state
    seconds = max(st.train_seconds, 1e-9)
    perf = {"samples_per_s": st.samples / seconds, "tokens_per_s": st.tokens / seconds}
    mfu = run.tracker.speed.mfu(st.tokens, seconds)
    if mfu is not None:
        perf["mfu"] = mfu
    return {"train_time_s": round(st.train_seconds, 3), "throughput": perf, "wandb": run.tracker.info or None}
