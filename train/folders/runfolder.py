"""The run folder: whose it is, what a start does there, and moving an old run aside instead of deleting it.

One rule per restart (the README's "Restarting a run"):

- an empty or new folder: a fresh run;
- a folder that holds a run of this program (its files: ``config.yaml`` and the rest, or the ``.glue-train``
  marker it writes when it creates a folder) with the same config:
  - finished (``eval_results.json``): nothing is trained, the existing results are printed;
  - unfinished: resumed from its newest usable checkpoint;
- the same with another config: refused, naming the keys that differ (``overwrite=true`` to start over);
- ``overwrite=true`` or ``checkpoint.resume=never``: a fresh run, and the old one is moved aside into
  ``previous-<time>/`` inside the folder (named in the log), never deleted and never resumed;
- any other non-empty folder (not made by this program): refused, listing what is there. Nothing the program did
  not write is ever deleted or replaced.

The folder is only inspected (read) until the start has loaded the model and the data; :func:`claim` then writes
the marker and ``config.yaml``. So a start that fails early leaves nothing that blocks the corrected rerun.

One run per folder: :func:`hold` keeps the folder's lock (train/folders/lock.py) for the whole run, taken by rank 0
before anything is written there; the other ranks wait until rank 0 holds it, so every rank inspects the same
folder. A second start on the folder stops with one error naming the holder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.config import Config, dump, load_config, to_dict
from train.errors import ConfigError, rank
from train.files import write_atomic
from train.folders import lock, owned

log = logging.getLogger(__name__)

MARKER = ".glue-train"
RESULTS = "eval_results.json"  # written last: a run folder that holds it is finished
# Everything this program writes at the top of a run folder (and the temporary names its atomic writes use).
OWN_FILES = {
    MARKER,
    "config.yaml",
    "run_info.json",
    "metrics.jsonl",
    RESULTS,
    "wandb_run_id.txt",
    "slurm_info.json",
    "curves.png",
    owned.RECORD,  # what `glue-train card` wrote (best/README.md, final/README.md)
}
OWN_FOLDERS = {
    "best",
    "final",
    "predictions",
    "checkpoints",
    "wandb",
    "best.tmp",
    "final.tmp",
    "best.old",
    "final.old",
}
PREVIOUS = "previous-"
# Keys that change how a run is operated, not what it trains: a restart may change them freely.
OPERATIONAL = (
    "output_dir",
    "overwrite",
    "checkpoint",
    "tracking",
    "fast",
    "data.num_workers",
    "data.cache_dir",
    "train.log_every",
    "eval.batch_size",
    "eval.predict_test",
)


def _is_own(name: str) -> bool:
    return (
        lock.is_lock_file(name)
        or name in OWN_FILES
        or name in OWN_FOLDERS
        or name.startswith(PREVIOUS)
        or (name.startswith(".") and ".tmp" in name)  # an atomic write that was interrupted
    )


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _operational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OPERATIONAL)


def config_diff(old: dict, new: dict, precision: tuple[str, str] | None = None) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (operational keys ignored).

    ``precision`` = (old, new) resolved for this machine (``auto`` means bf16 on one GPU, no on a CPU)."""
    a, b = _leaves(old), _leaves(new)
    if precision is not None:
        a["precision"], b["precision"] = precision
    keys = sorted(k for k in a.keys() | b.keys() if not _operational(k))
    return [k for k in keys if a.get(k) != b.get(k)]


def read_config(path: Path) -> Config:
    """A run folder's (or checkpoint's) saved config, with today's defaults for keys it predates."""
    from train.config import read_yaml

    try:
        if not isinstance(read_yaml(path), dict):
            raise ConfigError("it holds no settings")
        return load_config(path)
    except ConfigError as e:
        raise ConfigError(
            f"{path} is empty or damaged, or was written by another version ({e}), so it cannot be compared with "
            "this run's config. Restore it, use another output_dir, or set overwrite=true to move that run aside "
            "and start over"
        ) from None


@dataclass(frozen=True)
class Start:
    """What a start does in its run folder."""

    out: Path
    action: str  # fresh | resume | finished | restart (fresh, with the old run moved aside)
    reason: str

    @property
    def trains(self) -> bool:
        return self.action != "finished"


def entries(folder: Path) -> list[Path]:
    """What the folder holds, its lock (held by this start, or by another) aside."""
    return [p for p in folder.iterdir() if not lock.is_lock_file(p.name)]


def _describe(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries(folder))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def is_own_folder(out: Path) -> bool:
    """Made by this program: it holds the marker, or (runs from before the marker) config.yaml and only
    names this program writes. A folder with, say, only a ``final/`` of the user's own is not."""
    if (out / MARKER).exists():
        return True
    return (out / "config.yaml").is_file() and all(_is_own(p.name) for p in entries(out))


def mark(out: Path) -> None:
    """Create ``out`` (if needed) as a run folder of this program."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        write_atomic(out / MARKER, json.dumps({"program": "glue-train", "created": time.time()}) + "\n")


def _finished(out: Path) -> bool:
    try:
        return "final" in json.loads((out / RESULTS).read_text())
    except (OSError, ValueError, TypeError):
        return False


def results_damage(out: Path) -> str | None:
    """What is wrong with a run folder's ``eval_results.json`` (written last, atomically: its presence marks
    the run finished); None when it is absent or whole."""
    path = Path(out) / RESULTS
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"it cannot be read ({type(e).__name__}: {str(e)[:160]})"
    if not isinstance(results, dict) or not isinstance(results.get("final"), dict):
        return "it has no 'final' evaluation"
    return None


def _damaged_results(out: Path, problem: str, argv: list[str] | None) -> ConfigError:
    again = f"glue-train train {shlex.join([*(argv or []), 'overwrite=true'])}" if argv is not None else ""
    return ConfigError(
        f"output_dir {out} holds a finished run whose {RESULTS} is damaged ({problem}), so its results cannot be "
        "shown, and training it again would replace its best/ and final/. Restore that file from a copy, or "
        "train again from the start with overwrite=true (the old run, best/ and final/ included, is moved aside "
        f"into previous-<time>/){': ' + again if again else ''}"
    )


def inspect(cfg: Config, resolve_precision, argv: list[str] | None = None) -> Start:
    """Decide what this start does in ``cfg``'s run folder; read-only. ``resolve_precision('auto')`` -> 'no'.
    ``argv``: this start's arguments (a message that says how to train again repeats them)."""
    from train.config import run_folder

    out = run_folder(cfg)
    refuse_foreign(out)
    if not out.exists() or not entries(out):
        return Start(out, "fresh", "a new run folder")
    if not (out / "config.yaml").exists():
        return Start(out, "fresh", "no run in the folder yet")
    fresh_start = cfg.overwrite or cfg.checkpoint.resume == "never"
    old = None if fresh_start and _damaged(out) else read_config(out / "config.yaml")
    if fresh_start:
        why = "overwrite=true" if cfg.overwrite else "checkpoint.resume=never"
        return Start(out, "restart", f"{why}: the run there is moved aside")
    assert old is not None
    precision = (resolve_precision(old.precision), resolve_precision(cfg.precision))
    diff = config_diff(to_dict(old), to_dict(cfg), precision)
    if diff:
        raise ConfigError(
            f"output_dir {out} holds a run with a different config (differs in: {', '.join(diff)}). Use another "
            "output_dir, or set overwrite=true to move that run aside (into previous-<time>/) and start over"
        )
    problem = results_damage(out)
    if problem:
        raise _damaged_results(out, problem, argv)
    if _finished(out):
        return Start(out, "finished", "the run there finished with this config")
    return Start(out, "resume", "the run there is unfinished")


def refuse_foreign(out: Path) -> None:
    """A file, or a non-empty folder this program did not make, is no run folder: refused, untouched."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    if out.exists() and entries(out) and not is_own_folder(out):
        raise ConfigError(
            f"output_dir {out} is not empty and was not made by this program (it holds {_describe(out)}); "
            "nothing there is touched. Use a new or empty folder, e.g. output_dir=runs/{task}-{model}-s{seed}"
        )


def _damaged(out: Path) -> bool:
    try:
        read_config(out / "config.yaml")
        return False
    except ConfigError:
        return True


def move_aside(out: Path) -> Path | None:
    """Move the previous run's files (only this program's) into ``previous-<time>/``; returns that folder."""
    own = [p for p in entries(out) if _is_own(p.name) and not p.name.startswith(PREVIOUS)]
    own = [p for p in own if p.name not in (MARKER, "slurm_info.json")]  # the folder's own, kept
    if not own:
        return None
    dest = out / f"{PREVIOUS}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"{PREVIOUS}{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for p in own:
        os.replace(p, dest / p.name)
    return dest


def claim(start: Start, cfg: Config) -> None:
    """Main process, once the run is set up: create the folder, mark it, move an old run aside, save the config."""
    out = start.out
    try:
        mark(out)
        if start.action == "restart":
            moved = move_aside(out)
            if moved is not None:
                log.warning(
                    "%s: the previous run in %s was moved to %s", start.reason.split(":")[0], out, moved
                )
        write_atomic(out / "config.yaml", dump(cfg))
    except OSError as e:
        raise _cannot_write(out, e) from None


def _cannot_write(out: Path, e: OSError) -> ConfigError:
    return ConfigError(
        f"output_dir {out}: cannot write there ({e.strerror or e}); check that the folder is writable and the "
        "disk has room, or choose another output_dir"
    )


@contextmanager
def hold(cfg: Config) -> Iterator[None]:
    """The run's life with its folder locked: by rank 0 of a launch (or the only process), before anything is
    written there; the other ranks wait until rank 0 holds it (if rank 0 cannot, it says why and exits, and the
    launcher ends them). Given back on any exit; a kill -9 leaves a stale lock that the next start takes over."""
    from train.config import run_folder

    out = run_folder(cfg)
    refuse_foreign(out)  # nothing, not even a lock file, is written into a folder that is not a run folder
    follower = rank() != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if follower:
        lock.wait_for_launch(out, lambda: _finished(out), rank())
        yield
        return
    try:
        held = lock.acquire(
            out,
            "train",
            what=f"output_dir {out}",
            advice="Wait for that run to end (or stop it), or use another output_dir",
        )
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and _finished(out):
            yield  # a finished run on a read-only disk: its results are only read, and shown
            return
        raise _cannot_write(out, e) from None
    try:
        yield
    finally:
        held.release()
