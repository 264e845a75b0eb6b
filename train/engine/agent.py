"""The launcher's agent (torchrun, or ``accelerate launch``) run in-process, its ending told in one line.

When a training process fails, each process has already said why (one ``error:`` paragraph for the user's input or
environment, a traceback for a bug of this program); when a stop signal ends the run, the processes have written
their checkpoint. Either way the agents end with their own traceback (torchrun: ``SignalException`` or
``ChildFailedError`` and its failure table; ``accelerate launch`` with one process: ``CalledProcessError`` holding
the child's stderr again), which buries what the processes said. Here they end with one ``[launcher]`` line and
the training processes' exit code. Launched by launch/torchrun.sh and launch/accelerate.sh:

    python -m train.engine.agent torchrun [TORCHRUN ARGS]
    python -m train.engine.agent accelerate launch [ACCELERATE ARGS]

A failure of the agent itself (a bad option, a rendezvous that cannot form) keeps its own words.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

AGENTS = ("torchrun", "accelerate")


def _say(text: str) -> None:
    sys.stderr.write(f"[launcher] {text}\n")
    sys.stderr.flush()


def _entry(which: str, args: list[str]) -> Callable[[], object]:
    if which == "torchrun":
        from torch.distributed.run import main

        sys.argv = ["torchrun", *args]
        return lambda: main(args)
    from accelerate.commands.accelerate_cli import main

    sys.argv = ["accelerate", *args]
    return main


def _code(exitcode: int) -> int:
    """A process's exit status as a shell reports it: a process killed by signal N (-N here) is 128+N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _ended(exitcode: int) -> str:
    import signal

    if exitcode >= 0:
        return f"exited {exitcode} (what it said is above)"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    why = " (by the system: out of memory?)" if -exitcode == signal.SIGKILL else ""
    return f"was killed by {name}{why}"


def run(which: str, args: list[str]) -> int:
    """The agent ``which`` with ``args``; its exit code: 0, the first failed training process's, or 128+N
    after stop signal N (the processes were handed it and stopped at a checkpoint)."""
    import subprocess

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        _entry(which, args)()
    except SignalException as e:
        _say(f"stopped by {e.sigval.name}: the training processes were handed it")
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        _say(f"training process of rank {rank} {_ended(failure.exitcode)}; the others were stopped")
        return _code(failure.exitcode) or 1
    except subprocess.CalledProcessError as e:
        _say(f"the training process {_ended(e.returncode)}")
        return _code(e.returncode)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in AGENTS:
        sys.stderr.write(f"usage: python -m train.engine.agent {{{','.join(AGENTS)}}} ARGS...\n")
        return 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
