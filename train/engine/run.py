"""The Run: what a started run holds, built once by train/engine/setup.py (the config itself is never changed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.config import Config
from train.data.batches import Layout
from train.engine.build import Built
from train.engine.checkpointer import Checkpointer
from train.engine.evaluator import Evaluator
from train.engine.nonfinite import Guard
from train.engine.preempt import StopFlag
from train.engine.progress import Progress
from train.engine.state import TrainState
from train.tasks import Task
from train.tracking.tracker import Tracker

if TYPE_CHECKING:
    from accelerate import Accelerator

    from train.engine.backends import Backend


@dataclass(kw_only=True)
class Run:
    cfg: Config
    task: Task
    out: Path
    acc: Accelerator
    backend: Backend  # DDP, a sharded or an engine-owned backend (train/engine/backends/)
    layout: Layout
    precision: str  # what the run computes in: no, bf16 or fp16 (cfg.precision may say auto)
    built: Built  # model, optimizer, schedule, data and step functions (train/engine/build.py)
    tracker: Tracker  # metrics.jsonl + W&B (train/tracking/tracker.py)
    stop: StopFlag  # signals, and whether every rank agreed to stop (train/engine/preempt.py)
    state: TrainState  # what a resume restores (checkpointed; train/engine/state.py)
    guard: Guard  # non-finite loss/grad policy (train/engine/nonfinite.py)
    checkpointer: Checkpointer  # when and what to save (train/engine/checkpointer.py)
    evaluator: Evaluator  # when and what to evaluate (train/engine/evaluator.py)
    bar: Progress  # progress over optimizer steps (train/engine/progress.py), main process only
    resumed: str  # where this start began, in words: "fresh (...)" or "resumed from ..."
    info: dict[str, Any] = field(default_factory=dict)  # run_info.json's content (train/engine/run_info.py)

    @property
    def epoch(self) -> float:
        """The fractional epoch reached: epochs done plus the share of the current one."""
        st = self.state
        return st.epoch + st.step_in_epoch / self.built.data.sampler.steps_per_epoch()
