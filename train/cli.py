"""``glue-train COMMAND ...``: the one command line (``python -m train ...`` is the same program).

Commands: ``train`` (the default: ``python -m train ARGS`` = ``glue-train train ARGS``), ``sweep``, ``report``,
``card``, ``push``, ``prepare``, ``summary``, ``submission``, ``slurm-info``. Each runs through the one error
boundary (:func:`train.errors.guarded`): a :class:`~train.errors.UserError` becomes one ``error: ...`` paragraph
and exit code 2 (3 for a non-finite loss); Ctrl-C exits 130; anything else is a bug and keeps its traceback.
Imports stay light here: ``--help`` of every command does not import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from train.config import describe, load_config
from train.errors import StopRequested, guarded, rank


def _help_epilog() -> str:
    rows = describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in the YAML file or as key.sub=value; later wins):"]
    lines += [f"  {k:<{width}}  {doc} [default: {default!r}]" for k, doc, default in rows]
    return "\n".join(lines)


def keys_markdown() -> str:
    """The README's config table (regenerate with ``python -m train --keys-markdown``)."""
    rows = ["| key | default | what |", "|---|---|---|"]
    rows += [f"| `{k}` | `{default!r}` | {doc} |" for k, doc, default in describe()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="glue-train train",
        description="Fine-tune a Hugging Face encoder on a GLUE task (effective batch 16 on any world size).\n\n"
        + commands_help(),
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config file (see configs/); repeat to merge several in order, later files win "
        "(e.g. --config configs/tasks/rte.yaml --config configs/models/roberta-base.yaml)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--keys-markdown", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return parser.parse_args(argv)


class _Quiet(logging.Filter):
    """Drops a third-party logger's records below ``level`` (a filter survives the library's own setLevel)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def setup_logging() -> None:
    """Our log lines at INFO on rank 0 (WARNING elsewhere: N processes say each thing once); third parties
    quiet: no progress bars, a backend library's messages only when its backend runs, transformers at warning
    level."""
    logging.basicConfig(
        level=logging.INFO if rank() == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank()}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.engine.backends import log_levels

    for name, level in log_levels(rank()).items():
        logging.getLogger(name).addFilter(_Quiet(level))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # tokenize/save bars; read at import


def quiet_transformers() -> None:
    """No "Loading weights"/"Writing model shards" bars; its warnings from rank 0 only (run start, not --help)."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    if rank() == 0:
        tlog.set_verbosity_warning()
    else:
        tlog.set_verbosity_error()


# name -> (module with ``main(argv) -> int``, what it does); ``train`` is this module's own :func:`train_main`
COMMANDS = {
    "train": ("train.cli", "fine-tune one model on one GLUE task (the default command)"),
    "sweep": ("train.sweeps.sweep", "tasks x seeds x override sets, locally or as SLURM job arrays"),
    "report": ("train.sweeps.report", "results.md/.csv/.png and the GLUE submission zip of a sweep folder"),
    "card": ("train.outputs.card", "(re)write the model cards of a run folder"),
    "push": ("train.outputs.push", "upload a run's best/ or final/ model to the Hugging Face Hub"),
    "prepare": ("train.model.prepare", "fill the model, dataset and tokenized caches for an offline run"),
    "summary": ("train.outputs.summary", "print the end-of-run summary of a finished run folder"),
    "submission": ("train.outputs.submission", "check a GLUE submission zip or folder of prediction files"),
    "slurm-info": (
        "train.engine.slurm_info",
        "record this SLURM job start in the run folder (sbatch scripts)",
    ),
}


def commands_help() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "commands (glue-train COMMAND --help for each):\n" + "\n".join(rows)


def train_main(argv: list[str]) -> int:
    """``glue-train train``: one fine-tuning run."""
    from train.engine.preempt import StopFlag  # standard library only: the handler is in place within ms

    stop = StopFlag().install()  # first: a SIGTERM/SIGUSR1 at any moment of the start-up is honoured
    exit_note("running")  # until the exit code replaces it (a process killed leaves "running")
    args = parse_args(argv)
    if args.keys_markdown:
        print(keys_markdown())
        return 0
    setup_logging()

    def command() -> int:
        try:
            return start(args, argv, stop)
        except StopRequested as stopped:  # every rank agreed, before this start trained a step
            return stop.exit_early(stopped)

    code = guarded(
        command,
        interrupted="interrupted (Ctrl-C) before training started or during a save; rerun the same command to "
        "start or resume",
    )
    exit_note(str(code))
    return code


def exit_note(text: str) -> None:
    """Under launch/relay.sh (``$GLUE_EXIT_DIR``): this process's exit code, in a file named by its rank. After a
    stop signal torchrun exits 1 whatever its processes did; the relay reports theirs."""
    folder = os.environ.get("GLUE_EXIT_DIR")
    if folder and os.path.isdir(folder):
        with contextlib.suppress(OSError), open(os.path.join(folder, str(rank())), "w") as fh:
            fh.write(text)


def start(args: argparse.Namespace, argv: list[str], stop) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from train.config import dump

        print(dump(cfg), end="")
        return 0
    stop.check("reading the config")
    quiet_transformers()
    from train.engine.loop import run
    from train.folders.runfolder import hold
    from train.outputs.hooks import RunOutputs

    stop.check("importing the libraries")
    with hold(cfg):  # one run per folder: its lock for the run's life (train/folders/lock.py)
        return run(cfg, argv, hooks=RunOutputs(), stop=stop)  # the engine trains; the outputs hook in


def main(argv: list[str] | None = None) -> int:
    """``glue-train [COMMAND] ARGS``; without a known command, ARGS go to ``train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if name == "train":
        return train_main(argv)
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    return guarded(lambda: module.main(argv))
