"""Tokenize a split once: the tokenized cache, keyed by everything that decides an entry's content, written under a
file lock.

An entry is the output of one tokenizer call over one split's rows. :func:`key_parts` lists what decides it, and
the key is a hash of that list: the tokenizer's definition (every file ``save_pretrained`` writes: its
``tokenizer.json`` and its config with the special tokens), its own settings (padding and truncation sides,
``model_input_names``, special and added tokens: set after loading, they are not in those files), its class, what it returns for a probe in this call (the fields and their ids), every argument of the call
(:func:`call_arguments`), the task's text columns and split, the source's content (a SHA-256 of the TSV file, or of
a local Hub copy's files), the code that reads and encodes the rows, and the library versions. Two tokenizers that
share a vocabulary and ``tokenizer.json`` but return other fields (DistilBERT: no ``token_type_ids``) therefore
never share an entry. Each entry keeps its parts in ``glue-train.json``; an entry whose parts differ is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from train.config import DataConfig
from train.data.glue import glue_folder, read_split
from train.errors import ConfigError, DataError, StopRequested, rank
from train.tasks import Split, Task

log = logging.getLogger(__name__)

META = "glue-train.json"  # inside an entry: its key parts, its rows and the notes on odd rows
# What reads and encodes the rows: a change to any of them changes what an entry holds.
CODE = tuple(Path(__file__).parent / name for name in ("glue.py", "tokenized.py")) + (
    Path(__file__).parents[1] / "tasks.py",
)
PROBE = ("A probe sentence, with Ünïcode, digits 123 and punctuation!", "And a second one?")
# save_pretrained's config keys that say where a tokenizer was loaded from, not what it does
_LOCATION_KEYS = (
    "name_or_path",
    "is_local",
    "local_files_only",
    "_commit_hash",
    "tokenizer_file",
    "vocab_file",
)
# a tokenizer's attributes that say where it came from or what calling it left behind, not what it makes
_STATE = {
    "name_or_path",
    "vocab_file",
    "files_loaded",
    "init_kwargs",  # what it was built from: the saved files and the attributes say what it is now
    "init_inputs",
    "_tokenizer",  # the backend: its definition is the saved tokenizer.json
    "verbose",
    "deprecation_warnings",
    "_in_target_context_manager",
    "_processor_class",
}


# ----------------------------------------------------------------------------------------------------------
# what a call makes, and the smallest max_length that leaves room for text


def call_arguments(cfg: DataConfig) -> dict:
    """Every keyword of the tokenizer call (used by the call itself and by the cache key)."""
    return {"truncation": True, "max_length": cfg.max_length}


def _encode(tokenizer, texts: list[list[str]], arguments: dict) -> dict:
    """Every field the tokenizer makes (input_ids, and token_type_ids where it has them); the mask is rebuilt by
    the collator, which pads."""
    enc = tokenizer(*texts, **arguments)
    return {k: v for k, v in enc.items() if k != "attention_mask"}


def min_max_length(tokenizer, task: Task) -> int:
    """The smallest ``data.max_length`` that keeps one token of text: the special tokens the tokenizer adds to
    a sentence (or pair) of this task, plus one. Below it, truncation cannot meet the length and is skipped."""
    pair = len(task.text_columns) == 2
    return int(tokenizer.num_special_tokens_to_add(pair=pair)) + 1


def check_max_length(max_length: int, tokenizer, task: Task, limit: int | None, model: str) -> None:
    """``data.max_length`` within [what the special tokens need, the model's position ``limit``]."""
    need = min_max_length(tokenizer, task)
    if limit is not None and need > limit:
        raise ConfigError(
            f"model.name_or_path: the tokenizer of '{model}' adds {need - 1} special tokens to each input of task "
            f"{task.name}, but the model takes at most {limit} tokens, so no data.max_length leaves room for text; "
            "use the checkpoint's own tokenizer"
        )
    if max_length >= need:
        return
    pair = len(task.text_columns) == 2
    specials = tokenizer.convert_ids_to_tokens(
        _encode(tokenizer, [[""]] * (2 if pair else 1), {})["input_ids"][0]
    )
    bound = f"{need} <= data.max_length <= {limit}" if limit is not None else f"data.max_length >= {need}"
    raise ConfigError(
        f"data.max_length={max_length} leaves no room for text: the tokenizer of '{model}' adds {need - 1} "
        f"special tokens to each {'sentence pair' if pair else 'sentence'} of task {task.name} ({' '.join(specials)}), "
        f"so {need} is the least that keeps one token of text (below it, truncation is skipped and rows keep "
        f"their full length); set {bound}"
    )


def _sane_limit(tokenizer) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 10**6 else None  # unset: a huge sentinel


# ----------------------------------------------------------------------------------------------------------
# the key


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("GLUE_TRAIN_CACHE") or Path.home() / ".cache" / "glue-train"
    return Path(root) / "tokenized"


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def source_fingerprint(cfg: DataConfig, task: Task, split: Split) -> dict:
    """Where the rows come from and a hash of their content (a changed file with the same size and mtime too)."""
    if cfg.glue_dir is not None:
        path = glue_folder(cfg.glue_dir, task) / split.tsv
        try:
            digest = _sha256_file(path)
        except OSError:
            digest = None  # missing or unreadable: reading it gives the error that names it
        return {"tsv": str(path.resolve()), "sha256": digest}
    folder = Path(cfg.hub_dataset).expanduser()
    where = {"hub": cfg.hub_dataset, "config": split.hub_config or task.name, "split": split.name}
    if (
        folder.is_dir()
    ):  # a local copy of the repository: its files' content (the Hub's own copy is versioned)
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and not any(q.startswith(".") for q in p.relative_to(folder).parts)  # .git, ...
        )
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(folder)}\0{_sha256_file(p)}\0".encode())
        where.update(hub=str(folder.resolve()), sha256=h.hexdigest())
    return where


def data_fingerprint(cfg: DataConfig, task: Task, split: Split) -> dict:
    """What a split's rows are, for a resumed run to compare with its checkpoint's: where they come from (for
    the message) and a SHA-256 of the content (None for the Hub's own copy, which the Hub versions)."""
    src = source_fingerprint(cfg, task, split)
    where = src.get("tsv") or f"{src['hub']} ({src['config']}, split {src['split']})"
    return {"file": where, "sha256": src.get("sha256")}


def tokenizer_definition(tokenizer) -> str:
    """A hash of every file ``save_pretrained`` writes for the tokenizer (minus where it was loaded from, and the
    truncation/padding state that calling it changes)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="glue-train-tok-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - a tokenizer that cannot save itself: its backend's definition
            log.debug("tokenizer.save_pretrained failed (%s); keying the cache by its backend", e)
            backend = getattr(tokenizer, "backend_tokenizer", None)
            h.update(
                _canonical_json(backend.to_str(), ("truncation", "padding")) if backend is not None else b""
            )
            return h.hexdigest()
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                h.update(f"{path.relative_to(tmp)}\0".encode())
                h.update(_canonical(path))
                h.update(b"\0")
    return h.hexdigest()


def tokenizer_attributes(tokenizer) -> str:
    """A hash of the tokenizer object's own settings: what ``save_pretrained`` does not write when they were set
    after loading (``padding_side``, ``truncation_side``, ``model_input_names``, special tokens, ...)."""
    attributes = {k: _plain(v) for k, v in vars(tokenizer).items() if k not in _STATE}
    return hashlib.sha256(json.dumps(attributes, sort_keys=True).encode()).hexdigest()


def _plain(value):
    """``value`` as JSON (an object by its repr, unless that repr is only its address)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def _canonical(path: Path) -> bytes:
    if path.suffix != ".json":
        return path.read_bytes()
    drop = ("truncation", "padding") if path.name == "tokenizer.json" else _LOCATION_KEYS
    return _canonical_json(path.read_text(encoding="utf-8", errors="replace"), drop)


def _canonical_json(text: str, drop: tuple[str, ...]) -> bytes:
    try:
        spec = json.loads(text)
    except ValueError:
        return text.encode()
    if isinstance(spec, dict):
        for key in drop:
            spec.pop(key, None)
    return json.dumps(spec, sort_keys=True).encode()


def _code_digest() -> str:
    h = hashlib.sha256()
    for path in CODE:
        h.update(path.read_bytes())
    return h.hexdigest()


def key_parts(cfg: DataConfig, task: Task, split: Split, tokenizer) -> dict:
    """Everything that decides what an entry holds (see the module docstring)."""
    import datasets
    import tokenizers
    import transformers

    arguments = call_arguments(cfg)
    definition = tokenizer_definition(tokenizer)  # before the probe: calling sets the truncation state
    probe = _encode(tokenizer, [[t] for t in PROBE[: len(task.text_columns)]], arguments)
    return {
        "tokenizer": definition,
        "tokenizer_attributes": tokenizer_attributes(tokenizer),
        "tokenizer_class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "returns": {k: list(v[0]) for k, v in sorted(probe.items())},
        "call": arguments,
        "task": task.name,
        "text_columns": list(task.text_columns),
        "split": split.name,
        "source": source_fingerprint(cfg, task, split),
        "code": _code_digest(),
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__,
        },
    }


def key_of(task: Task, split: Split, parts: dict) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"{task.name}-{split.name}-{digest[:20]}"


def cache_key(cfg: DataConfig, task: Task, split: Split, tokenizer) -> str:
    """The entry's folder name: changes whenever any of :func:`key_parts` does."""
    return key_of(task, split, key_parts(cfg, task, split, tokenizer))


# ----------------------------------------------------------------------------------------------------------
# the cache


def _cached(path: Path, parts: dict):
    """``(dataset, meta)`` of the entry at ``path``, or None when absent, damaged or made from other parts."""
    import datasets

    if not (path / "dataset_info.json").exists():
        return None
    try:
        meta = json.loads((path / META).read_text())
        if meta.get("parts") != json.loads(json.dumps(parts, default=str)):
            log.warning(
                "tokenized cache %s was made from other inputs than its key says; tokenizing again", path
            )
            return None
        ds = datasets.load_from_disk(str(path))
        ds.with_format("arrow")[:]  # reads every Arrow file once: a truncated one fails here, not mid-run
        return ds, meta
    except Exception as e:  # noqa: BLE001 - any failure to read it means: tokenize again
        log.warning("tokenized cache %s is damaged (%s: %s); tokenizing again", path, type(e).__name__, e)
        return None


def tokenize_split(
    cfg: DataConfig,
    task: Task,
    split: Split,
    tokenizer,
    main_first=None,
    interrupted: Callable[[], bool] | None = None,
):
    """Tokenized ``datasets.Dataset`` for one split, from the cache when present.

    The main process tokenizes and writes the cache; the other ranks wait (``main_first``) and read it. Several
    runs sharing a cache (a SLURM array, local sweeps) are safe: one writer per entry at a time (a file lock),
    each writes its own temporary folder and renames it into place, and a published entry is never deleted, so
    a reader never sees a partial or vanishing one. Rank 0 logs the notes on odd rows (one warning per split
    file), from the entry when it is cached. ``interrupted`` is asked between tokenizer batches and while waiting
    for another writer's lock: once it says yes, :class:`~train.errors.StopRequested` abandons the entry (nothing
    is published).
    """
    check_max_length(cfg.max_length, tokenizer, task, _sane_limit(tokenizer), tokenizer.name_or_path)
    parts = key_parts(cfg, task, split, tokenizer)
    path = cache_root(cfg) / key_of(task, split, parts)
    with main_first() if main_first else contextlib.nullcontext():
        found = _cached(path, parts)
        if found is not None:
            log.info("tokenized cache hit: %s", path)
        else:
            try:
                found = _tokenize_into(path, cfg, task, split, tokenizer, parts, interrupted or _never)
            except OSError as e:
                raise DataError(
                    f"cannot write the tokenized-data cache {path.parent} ({e.strerror or e}); free disk space or "
                    "point data.cache_dir (or $GLUE_TRAIN_CACHE) at a writable folder"
                ) from None
    ds, meta = found
    if rank() == 0:
        for note in meta.get("notes", []):
            log.warning("%s", note)
    return ds


def _never() -> bool:
    return False


@contextlib.contextmanager
def _locked(path: Path, interrupted: Callable[[], bool]):
    """The entry's writer lock, waited for in 1 s slices so that a stop is seen while another process writes."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    while True:
        try:
            lock.acquire(timeout=1)
            break
        except Timeout:
            if interrupted():
                raise StopRequested(f"waiting for the tokenized cache {path.name}") from None
    try:
        yield
    finally:
        lock.release()


def _tokenize_into(
    path: Path,
    cfg: DataConfig,
    task: Task,
    split: Split,
    tokenizer,
    parts: dict,
    interrupted: Callable[[], bool],
):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    where = f"tokenizing {task.name}/{split.name}"
    with _locked(path, interrupted):
        found = _cached(path, parts)  # another process may have written it while this one waited
        if found is not None:
            return found
        rows = read_split(cfg, task, split)
        raw = datasets.Dataset.from_dict(dict(rows))
        arguments = call_arguments(cfg)

        def encode(batch: dict) -> dict:
            if interrupted():  # between batches of 1,000 rows: a stop waits at most one batch
                raise StopRequested(where)
            return _encode(tokenizer, [batch[c] for c in task.text_columns], arguments)

        ds = raw.map(
            encode, batched=True, remove_columns=list(task.text_columns), desc=f"tokenize {split.name}"
        )
        meta = {"parts": parts, "rows": len(ds), "notes": rows.notes}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        ds.save_to_disk(str(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        if (
            path.exists()
        ):  # damaged: moved aside (a reader holding it open keeps its files), never deleted here
            os.replace(path, path.with_name(f".{path.name}.damaged{os.getpid()}"))
        os.replace(tmp, path)
        log.info("tokenized %s/%s (%d rows) -> %s", task.name, split.name, len(ds), path)
    return datasets.load_from_disk(str(path)), meta
