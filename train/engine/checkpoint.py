"""Full training checkpoints (resume exactly) and exported Hugging Face model folders (use anywhere).

A checkpoint is written into ``checkpoints/.tmp-step-N``, marked ``COMPLETE`` and renamed to
``checkpoints/step-N``: a folder without the marker is never resumed from.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import shutil
from pathlib import Path

from train.engine import dist, safe_state
from train.engine.backends.base import Backend
from train.errors import CheckpointError
from train.files import fsync_dir as _fsync_dir

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
STATE = "trainer_state.json"
MANIFEST = "files.json"


def root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE).is_file()


def complete_checkpoints(output_dir: Path, report: bool = True) -> list[Path]:
    """Complete checkpoints, oldest first; partial ones (interrupted saves) are reported and skipped.

    ``.old-step-N`` is the previous copy of ``step-N`` while it is being replaced; it counts only when the
    save that replaces it was interrupted before ``step-N`` came back.
    """
    base = root(output_dir)
    found, names = [], set()
    for p in sorted(base.glob("step-*")):
        if _is_complete(p):
            found.append(p)
            names.add(p.name)
        elif report:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
    for p in sorted(base.glob(".old-step-*")):
        if p.name.removeprefix(".old-") not in names and _is_complete(p):
            found.append(p)
    if report:
        for p in sorted(base.glob(".tmp-step-*")):
            log.warning("ignoring partial checkpoint %s (a save that was interrupted)", p)
    return sorted(found, key=_step)


def newest(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir, report=False)
    return done[-1] if done else None


def find_resume(resume: str, output_dir: Path) -> Path | None:
    """Which checkpoint to start from: ``auto`` (newest complete), ``never``, or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.resume={resume}: no such checkpoint folder. Give a checkpoints/step-N folder, "
            "checkpoint.resume=auto (newest complete one in output_dir) or checkpoint.resume=never"
        )
    if not _is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume={resume}: not a complete checkpoint (missing {MARKER} or {STATE}); it may be "
            "partial or corrupt. Use checkpoint.resume=auto to take the newest complete one"
        )
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """``files.json``: size and SHA-256 of every file of the checkpoint (written before ``COMPLETE``)."""
    files = {
        str(p.relative_to(folder)): [p.stat().st_size, _digest(p)]
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MARKER)
    }
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with a complete-looking checkpoint (names the file), or None when every file is intact."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
        if not isinstance(state, dict) or "train_state" not in state:
            return f"{STATE} has no train_state"
    except (OSError, ValueError) as e:
        return f"{STATE} cannot be read ({e})"
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return _legacy_damage(folder)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} cannot be read ({e})"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _digest(path) != digest:
            return f"{name} is damaged (its SHA-256 differs from the one written with it)"
    return None


def _legacy_damage(folder: Path) -> str | None:
    """Checkpoints from before files.json: no hashes to compare, so only what can be known without loading
    anything (nothing is unpickled here: a pickle runs code when it is loaded): no file is empty, and every
    safetensors header (JSON) parses. The files themselves are loaded weights-only (train/engine/safe_state.py)."""
    from safetensors import safe_open

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder)
        try:
            if path.stat().st_size == 0:
                return f"{name} is empty"
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as fh:
                    fh.keys()
        except Exception as e:  # noqa: BLE001 - any failure to read the header is damage
            return f"{name} cannot be read ({type(e).__name__})"
    return None


# What a checkpoint of another run may not differ in (the folder's own config is checked by train/folders/runfolder.py);
# the per-device batch and precision may: the effective batch and the math stay the same on other hardware.
HARDWARE_KEYS = ("train.per_device_batch_size", "precision")


def mismatch(path: Path, cfg: dict) -> list[str]:
    """Keys in which the checkpoint's saved config differs from this run's (task, model, data, batch, ...)."""
    from train.folders.runfolder import config_diff

    saved = json.loads((Path(path) / STATE).read_text()).get("config")
    if not isinstance(saved, dict):
        return []  # checkpoints from before the config was saved in them
    return [k for k in config_diff(saved, cfg) if k not in HARDWARE_KEYS]


def data_changes(path: Path, data: dict | None) -> list[str]:
    """How the training and dev data (``data``: split -> file, SHA-256, rows) differ from the checkpoint's, one
    entry per split naming its file; empty when they are the same or the checkpoint predates the record."""
    saved = json.loads((Path(path) / STATE).read_text()).get("data")
    if not isinstance(saved, dict) or data is None:
        return []
    out = []
    for name, then in sorted(saved.items()):
        now = data.get(name)
        if now is None:
            out.append(f"split {name} ({then.get('file')}) is not read any more")
            continue
        what = []
        if then.get("sha256") and now.get("sha256") and then["sha256"] != now["sha256"]:
            what.append(
                f"its content changed (SHA-256 {then['sha256'][:12]}... then, {now['sha256'][:12]}... now)"
            )
        if then.get("rows") != now.get("rows"):
            what.append(f"{then.get('rows')} rows then, {now.get('rows')} now")
        if what:
            out.append(f"{now.get('file')} ({name} split): {', '.join(what)}")
    return out


def _data_error(path: Path, changes: list[str], resume: str) -> str:
    fresh = (
        "overwrite=true (the old run is moved aside into previous-<time>/)"
        if resume == "auto"
        else "checkpoint.resume=never"
    )
    return (
        f"checkpoint {path} was trained on other data than this run reads: {'; '.join(changes)}. Resuming would "
        "go on with other rows than the run started with (its epochs, schedule and evaluations no longer fit "
        f"them). Put the data back as it was to resume, or train on the new data from the start with {fresh}"
    )


def _choose_here(
    resume: str, output_dir: Path, cfg: dict, data: dict | None
) -> tuple[str | None, str | None]:
    """(checkpoint, None) or (None, error) on the main process; see :func:`choose`."""
    if resume != "auto":
        path = find_resume(resume, output_dir)
        if path is None:
            return None, None
        problem = damage(path)
        if problem:
            return None, (
                f"checkpoint.resume={resume}: checkpoint {path} is damaged or corrupt ({problem}). Point "
                "checkpoint.resume at another checkpoint, checkpoint.resume=auto (the newest usable one in "
                "output_dir) or checkpoint.resume=never"
            )
        diff = mismatch(path, cfg)
        if diff:
            return None, (
                f"checkpoint.resume={resume} was saved by a run with another config (differs in: "
                f"{', '.join(diff)}); it is not this run's training state. Resume a checkpoint of this config, "
                "or start fresh with checkpoint.resume=never"
            )
        changes = data_changes(path, data)
        if changes:
            return None, _data_error(path, changes, resume)
        return str(path), None
    tried = []
    for path in reversed(complete_checkpoints(output_dir)):
        problem = damage(path) or (
            f"saved with another config ({', '.join(mismatch(path, cfg))})" if mismatch(path, cfg) else None
        )
        if problem is None:
            changes = data_changes(path, data)  # the same for every checkpoint of the run: no fallback
            return (None, _data_error(path, changes, resume)) if changes else (str(path), None)
        log.warning("not resuming from %s: %s; trying the previous checkpoint", path, problem)
        tried.append(f"{path.name}: {problem}")
    if tried:
        return None, (
            f"no usable checkpoint in {root(output_dir)} ({'; '.join(tried)}). Restore the files, or set "
            "overwrite=true to move this run aside and start over"
        )
    return None, None


def choose(acc, resume: str, output_dir: Path, cfg: dict, data: dict | None = None) -> Path | None:
    """Collective. The checkpoint to resume from: ``auto`` = the newest complete one whose files are intact and
    whose config matches (damaged ones are skipped with a warning naming the file), or the one asked for; None
    for a fresh start. Its training and dev data (``data``, as saved by :class:`Checkpointer`) must be this
    run's. The main process checks the files once; every rank gets its answer (or error)."""
    found, error = _choose_here(resume, output_dir, cfg, data) if acc.is_main_process else (None, None)
    found, error = dist.from_main((found, error))
    if error:
        raise CheckpointError(error)
    return Path(found) if found else None


def _size(path: Path | None) -> int:
    if path is None:
        return 0
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _explain(error: BaseException | None, where: Path, need: int = 0) -> str:
    """Why a write failed, in words. torch.save reports a full disk as an obscure RuntimeError ("unexpected
    pos ..."), so the free space (against ``need``, the size of the previous checkpoint) and the file-size
    limit are looked at, not only the exception."""
    if error is None:
        return "another rank failed to write its part"
    chain, e = [], error
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in chain).lower()
    codes = {getattr(x, "errno", None) for x in chain}
    raw = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    space = f"{free / 2**20:.1f} MiB free there" if free >= 0 else "free space unknown"
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if (
        codes & {errno.ENOSPC, errno.EDQUOT}
        or "no space left" in text
        or "quota" in text
        or (0 <= free < max(need, 16 * 2**20))
    ):
        return f"the disk is full ({space}; a checkpoint needs about {need / 2**20:.1f} MiB; {raw})"
    if errno.EFBIG in codes or "file too large" in text or fsize != resource.RLIM_INFINITY:
        return f"a file size limit was hit (ulimit -f: {fsize} bytes; {space}; {raw})"
    return raw


def save(
    acc, output_dir: Path, step: int, state: dict, keep_last: int, backend: Backend | None = None
) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder. ``backend``: the run's (its
    ``save_state``; default: the base one, which every backend shares today).

    Written into ``.tmp-step-N``, fsynced, marked ``COMPLETE``, renamed to ``step-N`` and the folder entry
    fsynced; a failure on any rank (disk full) removes the partial folder on every rank and raises
    ``CheckpointError`` everywhere, leaving the previous checkpoints as they were.
    """
    base = root(output_dir)
    final = base / f"step-{step:08d}"
    tmp = base / f".tmp-step-{step:08d}"
    aside = base / f".old-step-{step:08d}"
    error: BaseException | None = None
    if acc.is_main_process:
        try:
            base.mkdir(parents=True, exist_ok=True)
            for stale in base.glob(".tmp-step-*"):  # interrupted saves (reported at resume)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    if not dist.any_rank(error is not None):
        try:
            (backend or Backend()).save_state(acc, str(tmp))
            safe_state.save_rng(acc, tmp)  # JSON, in place of Accelerate's pickle
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            error = e
    if not dist.any_rank(error is not None) and acc.is_main_process:
        try:
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            write_manifest(tmp)  # sizes and hashes of every file: damage is found before a resume uses it
            _fsync_tree(tmp)
            (tmp / MARKER).write_text("ok\n")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. a stop signal right after a periodic save)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(tmp, final)
            _fsync_dir(base)
            shutil.rmtree(aside, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            error = e
    if dist.any_rank(error is not None):
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        prev = newest(output_dir)
        raise CheckpointError(
            f"could not write checkpoint {final}: {_explain(error, base, _size(prev))}. The partial folder was "
            "removed; "
            + (
                f"the previous checkpoint {prev} is intact and checkpoint.resume=auto resumes from it. "
                if prev
                else "there is no earlier checkpoint. "
            )
            + "Free disk space (or lower checkpoint.keep_last, or move output_dir to a larger disk) and rerun"
        )
    if acc.is_main_process:
        _prune(output_dir, keep_last)
        log.info("checkpoint saved: %s", final)
    acc.wait_for_everyone()
    return final


def load(acc, path: Path, backend: Backend | None = None) -> dict:
    """Restore model, optimizer, scaler and RNG states (``backend``: as in :func:`save`); returns
    ``trainer_state.json``. Nothing is unpickled: every torch.load is weights-only (train/engine/safe_state.py)."""
    backend = backend or Backend()
    try:
        state = json.loads((Path(path) / STATE).read_text())
        with safe_state.weights_only(backend.checkpoint_classes()):
            backend.load_state(acc, str(path))
        safe_state.restore_rng(acc, Path(path))
    except CheckpointError as e:
        e.topic = f"damaged files in checkpoint {path}"  # each rank names its own shard: said once
        raise  # names the file already
    except Exception as e:  # noqa: BLE001 - a corrupt checkpoint fails deep inside torch/safetensors
        raise CheckpointError(
            f"checkpoint {path} is corrupt or does not belong to this run/model and cannot be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Delete that folder to "
            "resume from the previous checkpoint, point checkpoint.resume at another one, or set "
            "checkpoint.resume=never to start over"
        ) from None
    return state


def _prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; only ``checkpoints/`` is touched (never best/)."""
    for old in complete_checkpoints(output_dir, report=False)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder entry under ``path`` to the disk."""
    for p in sorted(path.rglob("*"), key=lambda q: -len(q.parts)):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(path)


def export_model(acc, model, tokenizer, dest: Path, backend: Backend | None = None) -> None:
    """Collective. A plain HF folder (safetensors, full weights even from sharded ones) for ``from_pretrained``;
    ``backend`` gathers them (as in :func:`save`).

    Written to ``<dest>.tmp`` and renamed over ``dest``; if that fails (disk full) every rank raises
    ``CheckpointError`` and the previous ``dest`` is left as it was.
    """
    state_dict = (backend or Backend()).full_state_dict(acc, model)
    error: BaseException | None = None
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if acc.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _fsync_tree(tmp)
            aside = dest.with_name(dest.name + ".old")
            shutil.rmtree(aside, ignore_errors=True)
            if dest.exists():
                os.replace(dest, aside)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
            shutil.rmtree(aside, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.any_rank(error is not None):
        raise CheckpointError(
            f"could not write the model folder {dest}: {_explain(error, dest.parent, _size(dest))}. "
            "Free disk space (or move output_dir to a larger disk) and rerun; checkpoint.resume=auto resumes "
            "from the newest checkpoint"
        )
    acc.wait_for_everyone()
