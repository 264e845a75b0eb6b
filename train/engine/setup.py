"""Starting a run: everything the loop needs, put together once into a :class:`~train.engine.run.Run`.

The run folder's verdict, the backend (chosen here, once), the Accelerator, the build, the restore,
``run_info.json`` and the W&B run. The run folder is only read until the model and the data have loaded
(runfolder.claim writes it), so a start that fails on a typo leaves nothing behind that would block the
corrected rerun.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from train.config import Config
from train.data.batches import Layout
from train.engine import backends, checkpoint, dist
from train.engine.build import build
from train.engine.checkpointer import Checkpointer
from train.engine.evaluator import Evaluator
from train.engine.hooks import Hooks
from train.engine.nonfinite import Guard
from train.engine.preempt import StopFlag
from train.engine.progress import Progress
from train.engine.run import Run
from train.engine.run_info import write_run_info
from train.folders import runfolder
from train.tasks import get_task
from train.tracking.tracker import Tracker

log = logging.getLogger(__name__)


def setup(
    cfg: Config, hooks: Hooks | None = None, argv: list[str] | None = None, stop: StopFlag | None = None
) -> Run | None:
    """Everything a run needs; None when the run folder holds this run already finished (``hooks.on_skip``).

    ``argv``: the command line's arguments (for messages that say what to run). ``stop``: the signal flag the CLI
    installed first thing (installed here when not given). Every stage ends with its check (a stop agreed there
    raises :class:`~train.errors.StopRequested`: nothing trained, nothing saved)."""
    hooks = hooks or Hooks()
    stop = stop or StopFlag().install()
    task = get_task(cfg.data.task)
    start = runfolder.inspect(cfg, lambda p: dist.resolve_precision(p, torch.cuda.is_available()), argv)
    if not start.trains:
        if dist.launched_rank() == 0:
            log.info("%s: nothing to train.", start.reason)
            hooks.on_skip(start.out)
        return None
    layout = Layout.derive(
        cfg.train.effective_batch_size, cfg.train.per_device_batch_size, dist.launched_world_size()
    )
    backend = backends.current()  # chosen by the launch (configs/accelerate/*.yaml), never by the run config
    acc = dist.make_accelerator(cfg.precision, layout.accum, backend)
    stop.check("starting")  # the first check every rank of a launch takes together
    tracker = Tracker(cfg, start.out, acc.is_main_process, backend)  # W&B settings checked before loading
    built = build(cfg, task, acc, layout, backend, stop)
    precision = acc.mixed_precision  # what the run computes in: no, bf16 or fp16 (cfg.precision may say auto)
    max_skips = cfg.train.max_nonfinite_skips
    guard = Guard(acc, built.model, precision, max_skips, partial(checkpoint.newest, start.out), backend)
    checkpointer = Checkpointer(cfg, acc, backend, start.out, guard, built.scheduler, built.data.sources)
    state, resumed = checkpointer.restore(start)  # after compiling: the RNG states are the checkpoint's
    stop.check("restoring the checkpoint")
    # only now that nothing can refuse the start: a refused one leaves the folder as it was
    if acc.is_main_process:
        runfolder.claim(start, cfg)  # the marker, the old run moved aside, config.yaml
    acc.wait_for_everyone()
    tracker.rewind(state.global_step)
    run = Run(
        cfg=cfg,
        task=task,
        out=start.out,
        acc=acc,
        backend=backend,
        layout=layout,
        precision=precision,
        built=built,
        tracker=tracker,
        stop=stop,
        state=state,
        guard=guard,
        checkpointer=checkpointer,
        evaluator=Evaluator(cfg, task, acc, built, state, tracker, guard, stop),
        bar=Progress(built.total_steps, state.global_step, f"train {task.name}", acc.is_main_process),
        resumed=resumed,
    )
    write_run_info(run)
    state.wandb_run_id = tracker.start(
        state.wandb_run_id,
        state.global_step,
        acc.unwrap_model(built.model),
        acc.device,
        dist.device_name(acc),
        precision,
        layout.world,
        dist.any_rank,
        run_info=run.info,  # in memory: what W&B shows beside the config
    )
    hooks.on_start(run)
    return run
