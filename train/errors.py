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
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class UserError(Exception):
    """Bad input or environment; the message names the key/file/line and what to do."""

    everywhere = True
    exit_code = 2
    # What the error is about, when ranks word it differently (each names its own shard of one checkpoint):
    # the launch then shows it once, from whichever rank reports first. None: the message itself.
    topic: str | None = None


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


class InputError(UserError, ValueError):
    """Something the user supplied (a file, folder, setting or environment variable) that a library could not
    read; the message names it and what to do (raised by :func:`reading`)."""


class LaunchError(UserError):
    """The launcher's environment (RANK, WORLD_SIZE, ...) does not describe a launch; every process says so."""

    everywhere = False


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


def _env_int(name: str, default: int) -> int | None:
    """An integer environment variable (``default`` when unset); None when it is set to something else."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    return int(raw) if raw.isdigit() else None


def rank() -> int:
    """This process's rank as the launcher set it (0 without one, or when RANK is not a number: see
    :func:`launch_problem`)."""
    return _env_int("RANK", 0) or 0


# Set by every launcher this program runs under (torchrun and its wrappers, which the sbatch scripts use too): a
# rank without them was not started by a launcher.
LAUNCHER_KEYS = ("MASTER_ADDR", "MASTER_PORT")
RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launch_problem() -> str | None:
    """Why the environment's RANK/WORLD_SIZE/LOCAL_RANK cannot be a launch (a stale ``export RANK=1`` in the
    shell, a typo), in one sentence; None when they are unset or consistent."""
    given = {k: os.environ[k] for k in RANK_KEYS if os.environ.get(k, "").strip()}
    if not given:
        return None
    shown = " ".join(f"{k}={v}" for k, v in given.items())
    fix = "unset them (`unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE`) to run one process, or start the run through a launcher (torchrun, accelerate launch, launch/*.sh)"
    values = {k: _env_int(k, -1) for k in given}
    bad = [k for k, v in values.items() if v is None]
    if bad:
        return f"the environment sets {bad[0]}={given[bad[0]]!r}, not a whole number ({shown}); {fix}"
    world, rank_ = values.get("WORLD_SIZE", 1), values.get("RANK", 0)
    local, local_world = values.get("LOCAL_RANK", 0), values.get("LOCAL_WORLD_SIZE", world)
    if world < 1 or rank_ >= world or local >= max(local_world, 1) or local_world > world:
        return f"the environment's launch variables do not fit together ({shown}: a rank must be below its world size); {fix}"
    if (world > 1 or rank_ > 0 or local > 0) and not all(os.environ.get(k) for k in LAUNCHER_KEYS):
        missing = [k for k in LAUNCHER_KEYS if not os.environ.get(k)]
        return (
            f"the environment sets {shown} but no launcher started this process ({' and '.join(missing)} "
            f"unset), so it would wait for processes that do not exist; {fix}"
        )
    return None


def _first_to_say(text: str) -> bool:
    """Whether this process is the first of its launch (on this machine) to report ``text``: a marker file per
    launch and message, created once. An error every rank meets is shown once, yet one that a rank meets alone
    (rank 0 fine, or failing with another message) is never swallowed."""
    keys = (
        *LAUNCHER_KEYS,
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "SLURM_JOB_ID",
        "SLURM_STEP_ID",
    )
    launch = "|".join(os.environ.get(k, "") for k in keys) + f"|{os.getppid()}"
    digest = hashlib.sha256(f"{launch}\n{text}".encode()).hexdigest()[:32]
    folder = Path(tempfile.gettempdir()) / f"glue-train-said-{os.getuid()}"
    marker = folder / digest
    try:
        folder.mkdir(exist_ok=True)
        if marker.exists() and time.time() - marker.stat().st_mtime > 3600:
            marker.unlink(missing_ok=True)  # a launch an hour ago with the same parent pid: not this one
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no temporary folder to agree through: better twice than never
    return True


def report_error(e: BaseException) -> None:
    """One write per message (several ranks share stderr). An error every rank has, or one about the same
    ``topic``, is printed once per launch and machine (by whichever rank reports it first); any other is printed
    by its rank, tagged with it."""
    everywhere = getattr(e, "everywhere", False)
    topic = getattr(e, "topic", None)
    launched = _env_int("WORLD_SIZE", 1) not in (0, 1) and launch_problem() is None
    if (everywhere or topic) and launched and not _first_to_say(topic or str(e)):
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
    if e.errno == errno.EEXIST and e.filename and not Path(e.filename).is_dir():
        return f"{where} is a file where a folder is needed (it is left as it is); choose another path"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder; choose another path"
    return f"{where}: {e.strerror or e}; check the path"


_OURS = str(Path(__file__).resolve().parent)  # the train package: an exception raised in it is our own bug
_NOT_INPUT = (MemoryError, RecursionError, AssertionError, NotImplementedError)


def _library_error(e: BaseException) -> bool:
    """``e`` was raised by a library while it read an input (not by this program's code, not out of memory)."""
    if not isinstance(e, Exception) or isinstance(e, (UserError, *_NOT_INPUT)):
        return False
    if type(e).__name__ == "OutOfMemoryError":  # torch's: the device, not the input
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS)


def error_text(e: BaseException) -> str:
    """A library's exception in one line: its type and first line (the rest is its traceback's business)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    with_errors = getattr(e, "errors", None)  # pydantic's ValidationError: its first line only counts them
    if callable(with_errors):
        try:
            first = with_errors()[0]
            text = f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', '')}"[:300]
        except Exception:  # noqa: BLE001, S110 - another library's errors(): keep its first line
            pass
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def reading(what: str, name: object, hint: str, error: type[UserError] = InputError) -> Iterator[None]:
    """The boundary of one input: whatever a library raises while the block reads ``name`` (the user's config
    file, TSV, model folder, tokenizer, checkpoint, cache, W&B settings, ...) becomes one ``error`` naming
    ``what`` and ``name`` and saying what to do (``hint``). A UserError passes unchanged, and so does an
    exception raised by this program's own code (a bug keeps its traceback), Ctrl-C, or running out of memory.
    A full disk stays the disk's problem (:func:`describe_os_error`)."""
    try:
        yield
    except Exception as e:
        if not _library_error(e):
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EnvironmentProblem(describe_os_error(e)) from None
        raise error(f"{what} {name}: cannot be read ({error_text(e)}); {hint}") from None


def guarded(
    command: Callable[[], int],
    interrupted: str = "interrupted (Ctrl-C); rerun the same command to go on",
) -> int:
    """Run one command of the CLI and return its exit code: the program's one error boundary. A launch
    environment that cannot be one is refused first, by every process (no rank would otherwise say it)."""
    problem = launch_problem()
    if problem:
        sys.stderr.write(f"error: {problem}\n")
        sys.stderr.flush()
        return LaunchError.exit_code
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
    except RuntimeError as e:
        if not peer_lost(e):
            raise
        sys.stderr.write(f"[rank {rank()}] stopped: {PEER_LOST}\n")
        sys.stderr.flush()
        return 1


# what torch.distributed raises in a rank whose peer has ended (gloo; NCCL): a consequence, not this rank's failure
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote process exited or there was a network error",
)
PEER_LOST = "another process of this launch ended first (what it said is above)"


def peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process of the launch has ended: then that
    process has said why (its error, or its traceback for a bug), and this one says only that it stopped."""
    launched = _env_int("WORLD_SIZE", 1) not in (0, 1, None)
    return launched and isinstance(e, RuntimeError) and any(p in str(e) for p in _PEER_GONE)
