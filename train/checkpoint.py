"""Full training checkpoints (resume exactly) and exported Hugging Face model folders (use anywhere).

A checkpoint is written into ``checkpoints/.tmp-step-N``, marked ``COMPLETE`` and renamed to
``checkpoints/step-N``: a folder without the marker is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
STATE = "trainer_state.json"


class CheckpointError(ValueError):
    pass


def root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; partial ones are reported and skipped."""
    found = []
    for p in sorted(root(output_dir).glob("step-*")):
        if (p / MARKER).is_file() and (p / STATE).is_file():
            found.append(p)
        else:
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", p, MARKER)
    return sorted(found, key=_step)


def find_resume(resume: str, output_dir: Path) -> Path | None:
    """Which checkpoint to start from: ``auto`` (newest complete), ``never``, or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file() or not (path / STATE).is_file():
        raise CheckpointError(
            f"checkpoint.resume={resume}: not a complete checkpoint (missing {MARKER} or {STATE}); it may be "
            "partial or corrupt. Use checkpoint.resume=auto to take the newest complete one"
        )
    return path


def save(acc, output_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder."""
    final = root(output_dir) / f"step-{step:08d}"
    tmp = root(output_dir) / f".tmp-step-{step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        (tmp / MARKER).write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(output_dir, keep_last)
        log.info("checkpoint saved: %s", final)
    acc.wait_for_everyone()
    return final


def load(acc, path: Path) -> dict:
    acc.load_state(str(path))
    return json.loads((Path(path) / STATE).read_text())


def _prune(output_dir: Path, keep_last: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def export_model(acc, model, tokenizer, dest: Path) -> None:
    """Collective. A plain HF folder (safetensors, full weights even from ZeRO-3 shards) for ``from_pretrained``."""
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        acc.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    acc.wait_for_everyone()
