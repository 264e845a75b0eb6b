"""Only its own files: a record of what glue-train wrote into a folder, so that nothing else is ever overwritten.

``.glue-train-files.json`` in a folder lists each file that ``glue-train report``, ``card`` or ``sweep`` wrote
there (path relative to the folder, SHA-256, size, the command, when). A command may replace a file only if it
does not exist, or is recorded with the content it has now. A file the user put there (their own
``results.csv``) or one of ours that they edited since (a model card touched up before a push) is never
overwritten: the command stops, before writing anything, with one error naming each such file and what to do.
Files a command appends to (the sweep's child logs) are recorded as ours without a hash.

:class:`Outputs` is one command's set of writes into one folder, under the folder's lock
(train/folders/lock.py): each file goes to a temporary name beside its target first, and only when the command
has produced all of them are they renamed into place and recorded. A command that fails half-way leaves nothing
behind: its temporary files and the folders it created are removed, and the files it would have replaced are
untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from train.errors import EnvironmentProblem, NotOurFile
from train.files import fsync_dir, write_atomic
from train.folders import lock

RECORD = ".glue-train-files.json"
WAIT_S = 120.0  # another short writer (a report, a sweep's status update) is waited for this long


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_record(folder: Path) -> dict[str, dict]:
    """The folder's record (empty if none, or unreadable: then nothing there counts as ours)."""
    try:
        files = json.loads((folder / RECORD).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _write_record(folder: Path, files: dict[str, dict]) -> None:
    write_atomic(folder / RECORD, json.dumps({"program": "glue-train", "files": files}, indent=1) + "\n")


def problem(folder: Path, name: str, files: dict[str, dict], also_ours: Callable[[str], bool] | None = None):
    """Why ``folder/name`` may not be written (None: it may)."""
    path = folder / name
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir():
        return f"{name} (a folder, not a file this program wrote)"
    entry = files.get(name)
    if entry is None:
        if also_ours is not None and also_ours(name):
            return None
        return f"{name} (not written by glue-train: {RECORD} has no record of it)"
    if entry.get("append"):
        return None
    if sha256(path) not in (entry.get("sha256"), entry.get("before")):
        return f"{name} (edited since glue-train {entry.get('by', '')} wrote it)".replace("  ", " ")
    return None


def refuse(folder: Path, bad: list[str], command: str, hint: str) -> NotOurFile:
    return NotOurFile(
        f"glue-train {command} would overwrite files it does not own in {folder}: {', '.join(bad)}. Nothing was "
        f"written. {hint}"
    )


def preflight(folder: str | Path, names: Iterable[str], command: str, hint: str) -> None:
    """Refuse at once if any of ``names`` is not this program's (a command that writes its files one by one,
    over a long time, checks them all before the first; each write checks again)."""
    folder = Path(folder)
    files = read_record(folder)
    bad = [p for p in (problem(folder, n, files) for n in names) if p]
    if bad:
        raise refuse(folder, bad, command, hint)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Outputs:
    """One command's writes into ``folder`` (see the module docstring); use through :func:`writing`."""

    def __init__(self, folder: Path, command: str, names: Iterable[str], hint: str, also_ours=None) -> None:
        self.folder, self.command, self.hint, self.also_ours = folder, command, hint, also_ours
        self.names = list(names)
        self.staged: dict[str, Path] = {}
        self.made: list[Path] = []
        self.check(self.names)

    def check(self, names: Iterable[str]) -> None:
        files = read_record(self.folder)
        bad = [p for p in (problem(self.folder, n, files, self.also_ours) for n in names) if p]
        if bad:
            raise refuse(self.folder, bad, self.command, self.hint)

    def path(self, name: str) -> Path:
        """A temporary file to write ``name``'s content to (for writers that want a path: zip, savefig)."""
        if name not in self.names:
            raise ValueError(f"{name} is not one of this command's outputs {self.names}")  # a bug
        target = self.folder / name
        for parent in reversed(target.parents):
            if parent == self.folder or self.folder in parent.parents:
                if not parent.exists():
                    parent.mkdir()
                    self.made.append(parent)
        # the suffix kept: writers such as savefig take the format from it
        tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}{target.suffix}")
        self.staged[name] = tmp
        return tmp

    def write(self, name: str, data: str | bytes) -> Path:
        with open(self.path(name), "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        return self.folder / name

    def commit(self) -> dict[str, Path]:
        """Put every staged file in place and record it; the final paths."""
        if not self.staged:
            return {}
        self.check(self.staged)  # a file may have appeared since the start
        files = read_record(self.folder)
        new = {}
        for name, tmp in self.staged.items():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            old = self.folder / name
            before = sha256(old) if old.is_file() else None
            new[name] = {
                "sha256": sha256(tmp),
                "size": tmp.stat().st_size,
                "by": self.command,
                "time": _now(),
            }
            # until every rename is done, the old content is ours too (a crash half-way stays recognised)
            files[name] = {**new[name], **({"before": before} if before else {})}
        _write_record(self.folder, files)
        for name, tmp in self.staged.items():
            os.replace(tmp, self.folder / name)
        for folder in {(self.folder / n).parent for n in self.staged}:
            fsync_dir(folder)
        files.update(new)
        _write_record(self.folder, files)
        done = {n: self.folder / n for n in self.staged}
        self.staged = {}
        return done

    def discard(self) -> None:
        for tmp in self.staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.staged = {}
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def writing(
    folder: str | Path,
    command: str,
    names: Iterable[str],
    *,
    hint: str,
    what: str | None = None,
    also_ours: Callable[[str], bool] | None = None,
) -> Iterator[Outputs]:
    """Hold ``folder``, check that every name in ``names`` may be written, stage the writes of the ``with``
    block, and commit them at its end (an exception discards them; the folder is then as before)."""
    folder = Path(folder)
    what = what or str(folder)
    with lock.holding(folder, command, what=what, advice=_advice(command), wait_s=WAIT_S):
        outs = Outputs(folder, command, names, hint, also_ours)
        try:
            yield outs
            outs.commit()
        except OSError as e:
            outs.discard()
            raise _write_failed(e, folder, command) from None
        except BaseException:
            outs.discard()
            raise


def _write_failed(e: OSError, folder: Path, command: str) -> OSError | EnvironmentProblem:
    """A failed write of one of the outputs (a full disk, a file size limit; the writer, e.g. savefig, often
    names no file) in words; an error reading an input elsewhere keeps its own file name."""
    if e.filename is not None and Path(folder).resolve() not in Path(e.filename).resolve().parents:
        return e
    return EnvironmentProblem(
        f"glue-train {command} could not write its files into {folder} ({e.strerror or e}); nothing was written there, "
        "the folder is as it was. Free space or raise the limit, or write elsewhere, and rerun"
    )


def _advice(command: str) -> str:
    return {
        "report": "Rerun when it has finished, or write the report elsewhere with --out DIR",
        "card": "The model cards are written at the end of the run; rerun when it has finished",
        "sweep": "Rerun when it has finished, or use another --out",
    }.get(command, "Rerun when it has finished")


def write_file(folder: Path, name: str, data: str | bytes, command: str, hint: str) -> Path:
    """One file, checked, written atomically and recorded."""
    with writing(folder, command, [name], hint=hint) as outs:
        outs.write(name, data)
    return folder / name


def claim_append(folder: Path, name: str, command: str, hint: str) -> Path:
    """Record ``name`` as a file this command appends to (refused if it exists and is not ours)."""
    folder = Path(folder)
    with lock.holding(folder, command, what=str(folder), advice=_advice(command), wait_s=WAIT_S):
        files = read_record(folder)
        why = problem(folder, name, files)
        if why:
            raise refuse(folder, [why], command, hint)
        if not files.get(name, {}).get("append"):
            files[name] = {"append": True, "by": command, "time": _now()}
            _write_record(folder, files)
    return folder / name
