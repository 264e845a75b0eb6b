"""``python -m train --config FILE [--config FILE ...] key.sub=value ...``

The one error boundary of the program: a :class:`~train.errors.UserError` (bad config, data, model folder,
checkpoint, W&B settings, a non-finite loss) and file-system errors become one ``error: ...`` paragraph with exit
code 2 (3 for a non-finite loss); Ctrl-C exits 130 (after a checkpoint, when training had started). Anything else
is a bug and keeps its traceback. Imports stay light here: ``--help`` does not import torch.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from train.config import describe, load_config
from train.errors import EnvironmentProblem, UserError

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _help_epilog() -> str:
    rows = describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in the YAML file or as key.sub=value; later wins):"]
    lines += [f"  {k:<{width}}  {doc} [default: {default!r}]" for k, doc, default in rows]
    return "\n".join(lines)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report_error(e: BaseException) -> None:
    """One write per message (several ranks share stderr); an error every rank has is printed by rank 0 only."""
    everywhere = getattr(e, "everywhere", False)
    if everywhere and rank() != 0:
        return
    tag = "" if everywhere or rank() == 0 else f"[rank {rank()}] "
    sys.stderr.write(f"error: {tag}{e}\n")
    sys.stderr.flush()


def say(text: str) -> None:
    if rank() == 0:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def describe_os_error(e: OSError) -> str:
    """A file-system error in words: which file, what happened, what to do."""
    where = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: the disk is full ({e.strerror}); free space or move output_dir to a larger disk, then rerun"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {e.strerror}; check the permissions (or choose another output_dir / data.cache_dir)"
    return f"{where}: {e.strerror or e}; check the path"


def keys_markdown() -> str:
    """The README's config table (regenerate with ``python -m train --keys-markdown``)."""
    rows = ["| key | default | what |", "|---|---|---|"]
    rows += [f"| `{k}` | `{default!r}` | {doc} |" for k, doc, default in describe()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune a Hugging Face encoder on a GLUE task (effective batch 16 on any world size).",
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
    quiet: no progress bars, DeepSpeed's messages only when DeepSpeed is used, transformers at warning level."""
    logging.basicConfig(
        level=logging.INFO if rank() == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank()}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from train.backends import launched

    deepspeed_level = logging.WARNING if launched() == "deepspeed" and rank() == 0 else logging.ERROR
    logging.getLogger("DeepSpeed").addFilter(_Quiet(deepspeed_level))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # tokenize/save bars; read at import


def quiet_transformers() -> None:
    """No "Loading weights"/"Writing model shards" bars; its warnings from rank 0 only (run start, not --help)."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    if rank() == 0:
        tlog.set_verbosity_warning()
    else:
        tlog.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keys_markdown:
        print(keys_markdown())
        return 0
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            from train.config import dump

            print(dump(cfg), end="")
            return 0
        quiet_transformers()
        from train.loop import run

        return run(cfg, sys.argv[1:] if argv is None else argv)
    except UserError as e:
        report_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        say(
            "interrupted (Ctrl-C) before training started or during a save; rerun the same command to start or resume"
        )
        return INTERRUPTED
    except OSError as e:  # a file or folder the environment refused (permissions, disk, a path that vanished)
        if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # no file involved: not a path or disk problem the user can fix
        report_error(EnvironmentProblem(describe_os_error(e)))
        return 2
