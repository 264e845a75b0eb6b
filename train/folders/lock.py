"""One writer per folder: a lock file that names its holder, made for shared file systems and clusters.

``.glue-train.lock`` in the folder is created atomically and exclusively: a fully written temporary file is
hard-linked to that name, which fails if it exists, on a local disk and on NFS alike (``fcntl``/``flock`` locks
are not reliable between NFS clients); where a file system has no hard links, ``O_CREAT | O_EXCL`` is used. The
file says who holds it (host, pid, the process's start time, since when, the command, the SLURM job and restart
count) and is removed when the holder ends: normally, by an error, by Ctrl-C or by a handled SIGTERM. A lock whose
holder is gone is stale and taken over with a warning:

- on the same machine (hostname, boot id and pid namespace equal), the holder's pid is not running, is a zombie,
  or belongs to a process started at another time (the pid was reused);
- the holder was an earlier start of the same SLURM job (a requeue: SLURM ends every process of a job before it
  starts it again) or of the same torchrun rendezvous (torchrun restarts all workers together);
- on another machine this process cannot see the holder's pid, so the holder refreshes the lock's mtime every
  ``HEARTBEAT_S``; one not refreshed for ``GLUE_TRAIN_LOCK_STALE_S`` seconds (default 600) counts as abandoned.
  Ages are measured against the file system's own clock (a fresh file's mtime), so clock skew between hosts does
  not matter.

Taking over happens under a second, short-lived ``.glue-train.lock.break`` file, so two starts that both find the
same stale lock never both take it. A process may take a lock it already holds (a nested write, e.g. the model
cards written at the end of a run): that is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from train.errors import FolderInUse

log = logging.getLogger(__name__)

LOCK = ".glue-train.lock"
HEARTBEAT_S = 30.0
# how long a holder on another host may go without refreshing its lock (GLUE_TRAIN_LOCK_STALE_S overrides)
STALE_S = 600.0
BREAK_STALE_S = 30.0  # a break file this old belongs to a process that died while taking over
DAMAGED_GRACE_S = 10.0  # an unreadable lock younger than this may still be being written (O_EXCL fallback)
POLL_S = 0.2
# commands that hold a folder for a moment: another writer waits for them instead of failing
SHORT = ("report", "card", "sweep", "slurm-info")


def is_lock_file(name: str) -> bool:
    """The lock and its temporary/break files (a folder holding only these counts as empty)."""
    return name == LOCK or name.startswith(LOCK + ".")


def stale_after() -> float:
    try:
        return float(os.environ.get("GLUE_TRAIN_LOCK_STALE_S", STALE_S))
    except ValueError:
        return STALE_S


# ----------------------------------------------------------------------------------------------------------
# who is who


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def machine() -> dict:
    """What makes a pid meaningful: the host, this boot of it, and the pid namespace (containers)."""
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pidns(),
    }


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where unreadable."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"  # a zombie has ended; only its parent has not collected it yet


def launch_token() -> str:
    """The same on every rank of one launch, different for another launch (the launcher's rendezvous)."""
    keys = (
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "SLURM_JOB_ID",
        "SLURM_RESTART_COUNT",
    )
    return "|".join(os.environ.get(k, "") for k in keys)


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def my_record(command: str) -> dict:
    stat = _proc_stat(os.getpid())
    now = time.time()
    return {
        "program": "glue-train",
        "command": command,
        **machine(),
        "pid": os.getpid(),
        "started": stat[1] if stat else None,
        "since": now,
        "since_text": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "launch": launch_token(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": _int_env("SLURM_RESTART_COUNT"),
        "elastic_run": os.environ.get("TORCHELASTIC_RUN_ID"),
        "elastic_restart": _int_env("TORCHELASTIC_RESTART_COUNT"),
    }


@dataclass
class Holder:
    """The lock file as found: its record (None if unreadable), inode and mtime."""

    record: dict | None
    inode: int
    mtime: float
    text: bytes

    def describe(self, now: float) -> str:
        r = self.record
        if r is None:
            return "an unreadable lock file"
        ago = _duration(now - float(r.get("since", now)))
        job = f"; SLURM job {r['slurm_job']}" if r.get("slurm_job") else ""
        return (
            f"glue-train {r.get('command', '?')} (pid {r.get('pid')} on host {r.get('host')}, since "
            f"{r.get('since_text', '?')}, {ago} ago{job})"
        )


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _look(path: Path) -> Holder | None:
    """The current lock file, None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        text = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        record = json.loads(text)
        record = record if isinstance(record, dict) and record.get("program") == "glue-train" else None
    except ValueError:
        record = None
    return Holder(record, st.st_ino, st.st_mtime, text)


@dataclass
class Verdict:
    stale: bool
    why: str  # stale: why it counts as abandoned; live: what is known about it
    checkable: bool = True  # False: on another machine, whether it runs cannot be seen from here


def judge(holder: Holder, now: float) -> Verdict:
    """Is the holder gone? ``now``: the file system's current time."""
    r = holder.record
    if r is None:
        if now - holder.mtime > DAMAGED_GRACE_S:
            return Verdict(True, "the lock file is unreadable (damaged)")
        return Verdict(False, "the lock file is being written")
    here, pid = machine(), int(r.get("pid", -1))
    if all(r.get(k) == here[k] for k in here):
        if not _alive(pid):
            return Verdict(True, f"process {pid} is no longer running")
        stat = _proc_stat(pid)
        if r.get("started") and stat and stat[1] != r["started"]:
            return Verdict(True, f"pid {pid} now belongs to another process (the holder ended)")
        return Verdict(False, "it is still running")
    job = os.environ.get("SLURM_JOB_ID")
    if (
        job
        and r.get("slurm_job") == job
        and int(r.get("slurm_restart") or 0) < _int_env("SLURM_RESTART_COUNT")
    ):
        return Verdict(
            True, f"it was an earlier start of this SLURM job {job}, which has been requeued since"
        )
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if (
        run not in (None, "", "none")
        and r.get("elastic_run") == run
        and int(r.get("elastic_restart") or 0) < _int_env("TORCHELASTIC_RESTART_COUNT")
    ):
        return Verdict(True, "torchrun has restarted the workers of this launch since")
    age, limit = now - holder.mtime, stale_after()
    if age > limit:
        return Verdict(
            True, f"it runs on another machine and has not refreshed its lock for {_duration(age)}"
        )
    return Verdict(
        False,
        f"it runs on another machine ({r.get('host')}), where this process cannot check whether pid {pid} is "
        f"alive; its lock was refreshed {_duration(age)} ago and counts as abandoned {_duration(limit)} after "
        "its last refresh",
        checkable=False,
    )


# ----------------------------------------------------------------------------------------------------------
# taking and giving back


@dataclass
class Held:
    """A lock this process holds; :meth:`release` gives it back (and removes the folders it created)."""

    folder: Path
    path: Path
    inode: int
    made: list[Path] = field(default_factory=list)
    depth: int = 1
    _stop: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.depth -= 1
        if self.depth > 0:
            return
        self._stop.set()
        _HELD.pop(str(self.folder), None)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:  # never someone else's, after a takeover
                os.unlink(self.path)
        for folder in reversed(self.made):  # only the empty folders this invocation created
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if os.stat(self.path).st_ino != self.inode:
                    log.warning("%s: the lock of this run was taken over by another process", self.folder)
                    return
                os.utime(self.path)
            except OSError:
                return


_HELD: dict[str, Held] = {}


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; the ones created, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    made = []
    for p in reversed(missing):
        try:
            p.mkdir()
            made.append(p)
        except FileExistsError:
            pass
    return made


def _fs_now(probe: Path) -> float:
    """The file system's clock: the mtime of a file touched just now."""
    os.utime(probe)
    return os.stat(probe).st_mtime


def _link(tmp: Path, path: Path) -> int | None:
    """Publish ``tmp`` as ``path`` if there is no lock; its inode on success."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):  # no hard links here
            return _create_exclusive(path, tmp.read_bytes())
        if os.stat(tmp).st_nlink != 2:  # NFS may report a link that was made (a retried request) as failed
            raise
    return os.stat(tmp).st_ino


def _create_exclusive(path: Path, data: bytes) -> int | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    try:
        os.write(fd, data)
        os.fsync(fd)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _break(path: Path, judged: Holder, now: float) -> bool:
    """Remove the stale lock ``judged``; False if it changed meanwhile or another process is breaking it (the
    caller then looks again)."""
    breaker = path.with_name(LOCK + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if now - os.stat(breaker).st_mtime > BREAK_STALE_S:
                os.unlink(breaker)
        return False
    os.close(fd)
    try:
        current = _look(path)
        if current is None or (current.inode, current.text) != (judged.inode, judged.text):
            return False  # taken over or given back meanwhile
        aside = path.with_name(f"{LOCK}.stale.{os.getpid()}.{secrets.token_hex(4)}")
        os.rename(path, aside)
        if os.stat(aside).st_ino != judged.inode:  # replaced between the look and the rename: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        os.unlink(aside)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(breaker)


def acquire(
    folder: str | Path,
    command: str,
    *,
    what: str,
    advice: str,
    wait_s: float = 0.0,
    create: bool = True,
) -> Held:
    """Hold ``folder`` for this process, or raise :class:`FolderInUse` naming the holder.

    ``what`` names the folder in messages ("output_dir runs/x"), ``advice`` says what to do instead.
    A holder doing a short job (``SHORT``) is waited for up to ``wait_s`` seconds; a training run never.
    ``create``: make the folder (and parents) if missing; they are removed again on release if still empty.
    """
    folder = Path(folder)
    made = _make_dirs(folder) if create else []
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key].depth += 1
        return _HELD[key]
    path = folder / LOCK
    tmp = folder / f"{LOCK}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    deadline = time.monotonic() + wait_s
    try:
        _write_tmp(tmp, my_record(command))
        while True:
            inode = _link(tmp, path)
            if inode is not None:
                break
            holder = _look(path)
            if holder is None:
                continue  # given back between the two calls
            now = _fs_now(tmp)
            verdict = judge(holder, now)
            if verdict.stale:
                if _break(path, holder, now):
                    log.warning("%s: took over the lock of %s: %s", what, holder.describe(now), verdict.why)
                else:
                    time.sleep(0.05)
                continue
            short = (holder.record or {}).get("command") in SHORT
            if short and time.monotonic() < deadline:
                time.sleep(POLL_S)
                continue
            raise FolderInUse(_in_use(what, path, holder, verdict, now, advice))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    tmp.unlink()
    held = Held(folder, path, inode, made)
    _HELD[key] = held
    threading.Thread(target=held._beat, name="glue-train-lock", daemon=True).start()
    return held


def _write_tmp(tmp: Path, record: dict) -> None:
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, (json.dumps(record, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_use(what: str, path: Path, holder: Holder, verdict: Verdict, now: float, advice: str) -> str:
    head = f"{what} is in use by {holder.describe(now)}: {verdict.why}"
    if not verdict.checkable:
        tail = f"{advice}; if that run is gone, delete {path} and rerun"
    elif holder.record is None:
        tail = f"{advice}; or delete {path} if no other run uses the folder"
    else:
        tail = advice
    return f"{head}. Two writers in one folder would mix or overwrite each other's files. {tail}"


@contextlib.contextmanager
def holding(folder: str | Path, command: str, **kw) -> Iterator[Held]:
    """:func:`acquire` for the life of a ``with`` block (given back on any exit, Ctrl-C included)."""
    held = acquire(folder, command, **kw)
    try:
        yield held
    finally:
        held.release()


def wait_for_launch(folder: str | Path, done: Callable[[], bool], rank: int, timeout: float = 600.0) -> None:
    """Ranks > 0 of a launch: wait until rank 0 holds the folder (its lock names this launch), or until the
    folder needs no lock (``done``: the run there has finished). If rank 0 cannot take it, rank 0 says why and
    exits; the launcher then ends this process."""
    path, mine = Path(folder) / LOCK, launch_token()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        holder = _look(path)
        if holder is not None and (holder.record or {}).get("launch") == mine:
            return
        if holder is None and done():
            return
        time.sleep(POLL_S)
    raise FolderInUse(
        f"rank {rank}: rank 0 did not take the lock of {folder} within {timeout:.0f} s (see rank 0's error); "
        "rerun when the folder is free"
    )
