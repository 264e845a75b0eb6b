"""One way to write a file (temporary name, fsync, rename, folder synced) and one way to read a run folder's JSON.

A reader (or a restart after kill -9 or a power cut) sees the old content or the new, never half of it. A JSON or
JSON-lines file of a run folder that is damaged (cut, garbled, not UTF-8, another shape) is one error naming it
(:func:`read_json`, :func:`read_jsonl`), whoever reads it. Light on purpose (no torch): the SLURM helpers and the CLI
use it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from train.errors import InputError, reading

DAMAGED = (
    "the run folder's file is damaged; restore it from a copy, or rerun the training with overwrite=true"
)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def read_json(path: str | Path, kind: type = dict, hint: str = DAMAGED) -> Any:
    """A JSON file of ``kind`` (dict or list); damage (bad bytes, bad JSON, another shape) is an InputError naming
    it. A missing file raises FileNotFoundError for the caller to word."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    with reading("file", path, hint):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, kind):
        raise InputError(f"file {path}: holds a JSON {type(data).__name__}, not a {kind.__name__}; {hint}")
    return data


def read_mapping(path: str | Path, hint: str = DAMAGED) -> dict:
    """A YAML mapping (a run folder's config.yaml); damage is an InputError naming it, an empty file is {}. A
    missing file raises FileNotFoundError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    with reading("file", path, hint):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(
            f"file {path}: holds a YAML {type(data).__name__}, not a mapping of settings; {hint}"
        )
    return data


def read_jsonl(path: str | Path, hint: str = DAMAGED) -> list[dict]:
    """The rows of a JSON-lines file (a last line cut by a kill is skipped: the writer appends whole lines); any
    other damage is an InputError naming the file and line."""
    path = Path(path)
    with reading("file", path, hint):
        lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if n >= len(lines) - 1 and not path.read_bytes().endswith(b"\n"):
                break  # the row being written when the run was killed
            raise InputError(f"file {path}:{n}: not a JSON row ({e}); {hint}") from None
        if not isinstance(row, dict):
            raise InputError(
                f"file {path}:{n}: holds a JSON {type(row).__name__}, not a row of metrics; {hint}"
            )
        rows.append(row)
    return rows
