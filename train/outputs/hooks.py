"""The run's outputs, written when the engine's hooks fire (what a person reads and keeps besides the model).

The start block, test predictions, model cards, curves, the summary block, and the W&B panels beyond scalars
(through the Tracker). ``glue-train train`` hands :class:`RunOutputs` to the engine (train/cli.py); the engine
never imports this package. The cards, curves and summary are built from the run folder's files alone, so
``glue-train card`` and ``glue-train summary`` give the same after the fact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.engine import dist
from train.engine.hooks import Hooks
from train.outputs import submission, summary
from train.outputs.card import write_model_cards
from train.outputs.curves import plot_run
from train.tracking.panels import summary_numbers

if TYPE_CHECKING:
    import numpy as np

    from train.engine.evaluator import Evaluation
    from train.engine.run import Run
    from train.tasks import Split

log = logging.getLogger(__name__)


class RunOutputs(Hooks):
    def on_skip(self, out: Path) -> None:
        log.info("\n".join(summary.lines(out)))

    def on_start(self, run: Run) -> None:
        if run.acc.is_main_process:
            log.info("\n".join(start_block(run)))

    def on_eval(self, run: Run, evaluation: Evaluation) -> None:
        for split, p in evaluation.predictions.items():
            run.tracker.eval_details(evaluation.record.step, split, run.task, p)  # W&B confusion matrix

    def on_best(self, run: Run, evaluation: Evaluation, tests: dict[Split, dict[str, np.ndarray]]) -> None:
        run.tracker.best(evaluation.row)  # best/<metric> in the W&B summary
        if tests and run.acc.is_main_process:
            folder = run.out / "predictions"
            folder.mkdir(exist_ok=True)
            for split, p in tests.items():
                submission.write_predictions(folder / split.submission, run.task, p["idx"], p["pred"])

    def on_finish(self, run: Run, results: dict[str, Any]) -> None:
        if run.acc.is_main_process:
            write_model_cards(run.out)  # best/README.md, final/README.md (the Hub's model-card format)
            plot_run(run.out)  # curves.png (one log line instead when matplotlib is missing)
            log.info("\n".join(summary.lines(run.out)))
        speed = run.info.get("throughput") or {}
        timing = {
            "train_time_s": run.info.get("train_time_s"),
            **{f"perf/mean_{k}": v for k, v in speed.items()},
        }
        numbers = {**summary_numbers(results, run.task), **timing}
        numbers.update({f"early_stopped/{k}": v for k, v in (results.get("early_stopped") or {}).items()})
        run.tracker.summary(numbers)  # the summary block's numbers in the W&B run summary
        run.tracker.wrong_predictions(run.task, run.cfg.data)  # W&B table of the best model's mistakes


def start_block(run: Run) -> list[str]:
    """What a person needs to know before the first step, in one block (main process)."""
    cfg, lay, d = run.cfg, run.layout, run.built.data
    dev = ", ".join(f"{s.name} {d.rows[s.name]}" for s in d.eval_loaders)
    test = ", ".join(f"{s.name} {d.rows[s.name]}" for s in d.test_loaders) or "none (eval.predict_test=false)"
    source = cfg.data.glue_dir or f"Hub {cfg.data.hub_dataset}"
    capped = f", capped by train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps else ""
    steps = f"{d.sampler.steps_per_epoch()} per epoch x {cfg.train.epochs} epochs{capped}"
    return [
        f"==== {run.task.name} · {cfg.model.name_or_path} · seed {cfg.seed} ====",
        f"  {'run folder':<12}{run.out.resolve()}",
        f"  {'data':<12}train {d.train_rows} rows; dev {dev}; test {test} ({source})",
        f"  {'batch':<12}{lay.describe()}",
        f"  {'steps':<12}{run.built.total_steps} optimizer steps ({steps})",
        f"  {'compute':<12}precision {run.precision}; {lay.world} x {dist.device_name(run.acc)}; "
        f"{run.backend.title(run.acc)}",
        f"  {'fast path':<12}{fast_line(run.built.fast.run_info())}",
        f"  {'start':<12}{run.resumed}",
    ]


def fast_line(info: dict) -> str:
    """The fast-path decision and, when it compiled, what compiling cost and what the cache held."""
    cache = info.get("compile_cache")
    if not cache:
        return info["fast_path"]
    seen = (
        f"{cache['hits']} hits, {cache['misses']} misses" if cache.get("hits") is not None else "no lookups"
    )
    state = "warm" if cache.get("warm_before") else "cold"
    return f"{info['fast_path']}; compiled in {info['compile_s']} s (cache {cache['dir']}: {state}, {seen})"
