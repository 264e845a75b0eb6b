"""The hooks a run's outputs attach to: the engine calls them and never imports what implements them.

The entry point (train/cli.py) hands ``run(cfg, argv, hooks=...)`` the implementation: train/outputs/hooks.py's
``RunOutputs`` writes the model cards, curves, test predictions and summary, and the W&B panels beyond scalars.
The engine keeps the files a resume or a restart depends on (checkpoints, ``best/``, ``final/``,
``metrics.jsonl``, ``run_info.json``, ``eval_results.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from train.engine.evaluator import Evaluation
    from train.engine.run import Run
    from train.tasks import Split


class Hooks:
    """Does nothing; an implementation overrides what it needs.

    Every hook but :meth:`on_skip` runs on every rank at the same point of the run, so an implementation may run
    collectives; it writes files on the main process only (``run.acc.is_main_process``).
    """

    def on_skip(self, out: Path) -> None:
        """The run folder ``out`` holds this run, finished: nothing is trained (on the launched rank 0 only: no
        process group exists yet)."""

    def on_start(self, run: Run) -> None:
        """The run is built and restored; the first step comes next."""

    def on_eval(self, run: Run, evaluation: Evaluation) -> None:
        """An evaluation was made (its row is in ``metrics.jsonl``)."""

    def on_best(self, run: Run, evaluation: Evaluation, tests: dict[Split, dict[str, np.ndarray]]) -> None:
        """``evaluation`` is the best so far and ``best/`` holds its model; ``tests``: its predictions of the test
        splits (``{}`` with ``eval.predict_test=false``)."""

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        """Training ended: ``final/`` and ``eval_results.json`` (``results``) are written."""
