"""Tokenize a split once: the tokenized cache, keyed by the source and the tokenizer, written under a file lock."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from train.config import DataConfig
from train.data.glue import read_split, resolve_builtin
from train.errors import DataError
from train.tasks import Split, Task

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# tokenizing (cached)


def _source_id(cfg: DataConfig, task: Task, split: Split) -> str:
    if cfg.glue_dir is None:
        return f"hub:{cfg.hub_dataset}:{split.hub_config or task.name}:{split.name}"
    path = Path(resolve_builtin(cfg.glue_dir)) / split.tsv
    st = path.stat() if path.exists() else None
    return f"tsv:{path.resolve()}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}"


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("GLUE_TRAIN_CACHE") or Path.home() / ".cache" / "glue-train"
    return Path(root) / "tokenized"


def _tokenizer_id(tokenizer) -> str:
    """The tokenizer's full definition, minus the truncation/padding state that calling it changes."""
    if not getattr(tokenizer, "is_fast", False):
        return repr(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True)


def cache_key(cfg: DataConfig, task: Task, split: Split, tokenizer) -> str:
    """Changes whenever the tokenizer, the task, the max length or the source file does."""
    tok = _tokenizer_id(tokenizer)
    h = hashlib.sha256()
    for part in (tok, task.name, split.name, str(cfg.max_length), _source_id(cfg, task, split), "v2"):
        h.update(part.encode())
        h.update(b"\0")
    return f"{task.name}-{split.name}-{h.hexdigest()[:16]}"


def _cached(path: Path):
    """The tokenized split at ``path``, or None when absent or damaged (a damaged one is reported)."""
    import datasets

    if not (path / "dataset_info.json").exists():
        return None
    try:
        ds = datasets.load_from_disk(str(path))
        ds.with_format("arrow")[:]  # reads every Arrow file once: a truncated one fails here, not mid-run
        return ds
    except Exception as e:  # noqa: BLE001 - any failure to read it means: tokenize again
        log.warning("tokenized cache %s is damaged (%s: %s); tokenizing again", path, type(e).__name__, e)
        return None


def tokenize_split(cfg: DataConfig, task: Task, split: Split, tokenizer, main_first=None):
    """Tokenized ``datasets.Dataset`` for one split, from the cache when present.

    The main process tokenizes and writes the cache; the other ranks wait (``main_first``) and read it. Several
    runs sharing a cache (a SLURM array, local sweeps) are safe: one writer per entry at a time (a file lock),
    each writes its own temporary folder and renames it into place, and a published entry is never deleted, so
    a reader never sees a partial or vanishing one.
    """
    path = cache_root(cfg) / cache_key(cfg, task, split, tokenizer)
    with main_first() if main_first else contextlib.nullcontext():
        ds = _cached(path)
        if ds is not None:
            log.info("tokenized cache hit: %s", path)
            return ds
        try:
            return _tokenize_into(path, cfg, task, split, tokenizer)
        except OSError as e:
            raise DataError(
                f"cannot write the tokenized-data cache {path.parent} ({e.strerror or e}); free disk space or point "
                "data.cache_dir (or $GLUE_TRAIN_CACHE) at a writable folder"
            ) from None


def _tokenize_into(path: Path, cfg: DataConfig, task: Task, split: Split, tokenizer):
    import datasets
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        ds = _cached(path)  # another process may have written it while this one waited
        if ds is not None:
            return ds
        raw = datasets.Dataset.from_dict(read_split(cfg, task, split))

        def encode(batch: dict) -> dict:
            texts = [batch[c] for c in task.text_columns]
            enc = tokenizer(*texts, truncation=True, max_length=cfg.max_length)
            # every field the tokenizer makes (input_ids, and token_type_ids where it has them); the mask is
            # rebuilt by the collator, which pads
            return {k: v for k, v in enc.items() if k != "attention_mask"}

        ds = raw.map(
            encode, batched=True, remove_columns=list(task.text_columns), desc=f"tokenize {split.name}"
        )
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        ds.save_to_disk(str(tmp))
        if (
            path.exists()
        ):  # damaged: moved aside (a reader holding it open keeps its files), never deleted here
            os.replace(path, path.with_name(f".{path.name}.damaged{os.getpid()}"))
        os.replace(tmp, path)
        log.info("tokenized %s/%s (%d rows) -> %s", task.name, split.name, len(ds), path)
    return datasets.load_from_disk(str(path))
