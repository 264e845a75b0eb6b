"""Every error the user's input or environment can cause, and the one boundary that turns them into a sentence.

Each class is a :class:`UserError`: ``glue-train`` (every subcommand, through :func:`guarded`) prints it as one
``error: ...`` paragraph and exits with its ``exit_code`` (2; 3 for a non-finite loss); Ctrl-C exits 130; a
file-system error naming a file becomes an :class:`EnvironmentProblem`. Any other exception is a bug and keeps its
traceback. ``everywhere`` says the error is raised identically on every rank (a config or data check, an agreed
checkpoint failure): then only rank 0 prints it, so N processes show it once. No heavy imports: the CLI's
``--help`` uses this module.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class UserError(Exception):
    """Bad input or environment; the message names the key/file/line and what to do."""

    everywhere = True
    exit_code = 2


class EnvironmentProblem(UserError):
    """A file-system or network problem met by this rank only (every rank prints its own)."""

    everywhere = False


class ConfigError(UserError, ValueError):
    """A config problem the user must fix; the message names the key and its source."""


class DataError(UserError, ValueError):
    """Bad or missing data; the message names the file (and line) and what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be written or used; agreed on by every rank."""


class NonFiniteError(UserError, RuntimeError):
    """Training produced a non-finite loss or gradient norm; the message names the step (exit code 3)."""

    exit_code = 3


class SweepError(UserError, ValueError):
    """A problem with the sweep's arguments or configs, found before any run starts."""


class SearchError(UserError, ValueError):
    """A search-space file that cannot be used; the message names the file (and line)."""


class CardError(UserError, ValueError):
    """A run folder that lacks what a card is built from; the message names the file."""


class PushError(UserError, ValueError):
    """Why a folder cannot be pushed; the message says what to do."""


class ReportError(UserError, ValueError):
    """A folder the report cannot be made of; the message names it."""


class FolderInUse(UserError):
    """Another process holds the folder (its lock names the host, pid and since when); met by one process."""

    everywhere = False


class NotOurFile(UserError, ValueError):
    """A command would overwrite a file it did not write (or that was edited since); names the file."""


class NothingToReport(ReportError):
    """A sweep folder without one finished run (exit code 1: the command worked, there was nothing to show)."""

    exit_code = 1


class StopRequested(BaseException):  # noqa: N818 - control flow, like KeyboardInterrupt: no library catches it
    """Every rank agreed to stop (SIGTERM, SIGUSR1, Ctrl-C) where the run cannot take another step first: in
    start-up, an evaluation, a test prediction. ``where`` says what was abandoned (``"loading the model"``)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


# ----------------------------------------------------------------------------------------------------------
# the boundary


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
    """A line on stderr from rank 0."""
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


def guarded(
    command: Callable[[], int],
    interrupted: str = "interrupted (Ctrl-C); rerun the same command to go on",
) -> int:
    """Run one command of the CLI and return its exit code: the program's one error boundary."""
    try:
        return command()
    except UserError as e:
        report_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        say(interrupted)
        return INTERRUPTED
    except OSError as e:  # a file or folder the environment refused (permissions, disk, a path that vanished)
        if e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # no file involved: not a path or disk problem the user can fix
        report_error(EnvironmentProblem(describe_os_error(e)))
        return 2
