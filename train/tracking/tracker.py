"""Where metrics go: sinks behind one interface (``log(row, step)``, ``close()``), and the Tracker the loop calls.

``metrics.jsonl`` (:class:`JsonlSink`) always, on the main process; Weights & Biases (train/tracking/wandb_sink.py) there too
when configured. The loop calls the Tracker only; adding a sink touches no call site. Throughput and MFU come from
train/tracking/throughput.py, and the run info W&B shows is passed in memory.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from train.config import Config, DataConfig
    from train.tasks import Split, Task

from train.files import read_jsonl, write_atomic
from train.tracking import panels
from train.tracking.throughput import ParamCounter, Throughput
from train.tracking.wandb_sink import WandbSink, resolve_wandb

log = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, row: dict, step: int) -> None: ...

    def close(self, preempted: bool = False) -> None: ...


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


class JsonlSink:
    """Append-only JSON lines, one object per logged step; rewound on resume so no step appears twice."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def rows(self) -> list[tuple[str, dict]]:
        """(line, row) for every complete row; a line cut short by a crash is dropped with a warning."""
        lines = self.path.read_text(errors="replace").splitlines()
        out = []
        for n, line in enumerate(lines, 1):
            row = _parse_row(line)
            if row is not None:
                out.append((line, row))
            elif line.strip():
                where = "its last line" if n == len(lines) else f"line {n}"
                log.warning(
                    "%s: dropping %s, which is not a complete row (a write cut short)", self.path, where
                )
        return out

    def last_step(self) -> int:
        if not self.enabled or not self.path.exists():
            return 0
        return max((row["step"] for _, row in self.rows()), default=0)

    def rewind(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to work a resumed run will redo)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line, row in self.rows() if row["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in keep))

    def log(self, row: dict, step: int) -> None:  # noqa: ARG002 - the row carries its step
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    def close(self, preempted: bool = False) -> None:  # noqa: ARG002 - appends are already on disk
        return None


class Tracker:
    """The loop's one handle on its sinks and throughput figures.

    Life cycle: ``rewind`` (resume) -> ``start`` -> ``throughput``/``write``/``eval_details``/``best`` ->
    ``summary``/``wrong_predictions`` -> ``close``. W&B settings problems (bad mode, wandb missing) are raised as
    ``ConfigError`` on every rank at construction, before any collective, so no rank is left waiting.
    """

    def __init__(self, cfg: Config, out: Path, main: bool, backend: ParamCounter | None = None):
        self.cfg, self.out, self.main, self.backend = cfg, Path(out), main, backend
        self.jsonl = JsonlSink(self.out / "metrics.jsonl", main)
        self.settings = resolve_wandb(cfg, self.out)  # on every rank: the same error everywhere
        self.wandb: WandbSink | None = None
        self.sinks: list[Sink] = [self.jsonl]
        self.speed = Throughput()
        self.sent_before = 0  # last step in metrics.jsonl before a resume rewound it

    @property
    def info(self) -> dict[str, Any]:
        """The W&B run's id and URL or offline folder (for run_info.json and the summary); {} without W&B."""
        return self.wandb.info if self.wandb else {}

    def rewind(self, step: int) -> None:
        self.sent_before = self.jsonl.last_step()
        self.jsonl.rewind(step)

    def start(
        self,
        run_id: str | None,
        global_step: int,
        model: torch.nn.Module,
        device: torch.device,
        device_name: str,
        precision: str,
        world: int,
        any_rank: Callable[[bool], bool] | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> str | None:
        """Set up throughput figures (every rank) and the W&B run (main process). Returns the run id to keep
        in the training state: the checkpoint's one when resuming, a new one on a fresh start. ``any_rank``:
        whether a flag is set on any rank (every rank stops when W&B failed on the main one; default: this
        process alone, as in a single-process run)."""
        from train.errors import ConfigError

        self.speed = Throughput.of(model, device, device_name, precision, world, self.backend)
        error = None
        if self.main and self.settings is not None:
            info = {"device": device_name, "precision": precision, **(run_info or {})}
            info.update(
                flops_per_token=self.speed.flops_per_token, peak_tflops_per_device=_tflops(self.speed.peak)
            )
            sink = WandbSink(self.settings, self.cfg, self.out)
            try:
                run_id = sink.start(run_id, global_step, self.sent_before, info)
                self.wandb = sink
                self.sinks.append(sink)
            except ConfigError as e:
                error = e
        if (any_rank or bool)(error is not None):  # every rank stops, not only the one that ran wandb.init
            raise error or ConfigError("W&B could not start on the main process (its error is printed there)")
        return run_id

    def throughput(self, tokens: float, padded: float, elapsed: float) -> dict[str, float]:
        return self.speed.window(tokens, padded, elapsed)

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row, int(row["step"]))

    # -- W&B beyond scalars (nothing without W&B) -----------------------------------------------------------
    def best(self, row: dict) -> None:
        if self.wandb:
            self.wandb.best(row)

    def eval_details(self, step: int, split: Split, task: Task, p: dict[str, np.ndarray]) -> None:
        if self.wandb:
            self.wandb.eval_details(step, split, task, p)

    def wrong_predictions(self, task: Task, data_cfg: DataConfig, limit: int = panels.WRONG_LIMIT) -> None:
        if self.wandb:
            self.wandb.wrong_predictions(task, data_cfg, limit)

    def summary(self, numbers: dict[str, Any]) -> None:
        if self.wandb:
            self.wandb.summary(numbers)

    def close(self, preempted: bool = False) -> None:
        for sink in self.sinks:
            sink.close(preempted)
        self.sinks = [self.jsonl]
        self.wandb = None


def _tflops(peak: float | None) -> float | None:
    return peak / 1e12 if peak else None


def read_metrics(path: Path) -> list[dict]:
    return read_jsonl(path)
