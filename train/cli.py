"""``python -m train --config FILE key.sub=value ...``"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from train.checkpoint import CheckpointError
from train.config import ConfigError, describe, load_config
from train.data import DataError
from train.nonfinite import NonFiniteError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _help_epilog() -> str:
    rows = describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in the YAML file or as key.sub=value; later wins):"]
    lines += [f"  {k:<{width}}  {doc} [default: {default!r}]" for k, doc, default in rows]
    return "\n".join(lines)


def report_error(e: BaseException) -> None:
    """One write per message: several ranks share stderr, and print() writes text and newline separately."""
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()


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


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
        from train.loop import setup, train

        train(setup(cfg))
    except USER_ERRORS as e:
        report_error(e)
        return 2
    except NonFiniteError as e:  # every rank raises it at the same step (train/nonfinite.py)
        report_error(e)
        return 3
    except ValueError as e:  # batch arithmetic and other value problems found at setup
        if "train." in str(e) or "data." in str(e):
            report_error(e)
            return 2
        raise
    return 0
