"""GLUE data: read (local TSV or Hub), tokenize once (cached), and batch so the effective batch is exact.

Both sources yield the same columns: ``idx``, the task's text columns (Hub names) and ``label`` (Hub ids;
-1 for unlabelled test rows; a float for STS-B).
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.config import ConfigError, DataConfig
from train.errors import UserError
from train.tasks import Split, Task

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"builtin:glue-sample": ASSETS / "glue_sample", "builtin:tiny-bert": ASSETS / "tiny-bert"}


class DataError(UserError, ValueError):
    """Bad or missing data; the message names the file (and line) and what to do."""


def offline_advice() -> str:
    """What to do when the Hub cannot be reached (shared by the model and the data errors)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    return (
        (
            "HF_HUB_OFFLINE=1 is set, so the Hub is not contacted and only the local HF cache is used. "
            if offline
            else "The Hub could not be reached and there is no copy in the local HF cache. "
        )
        + "Without network, give local copies: model.name_or_path=/path/to/model (a folder with config.json, "
        "the weights and the tokenizer; builtin:tiny-bert is bundled) and data.glue_dir=/path/to/glue (the "
        "official GLUE download; builtin:glue-sample is bundled); or fill the caches on a machine with "
        "network (`python -m train.prepare` with the same config) and run with HF_HUB_OFFLINE=1 "
        "HF_DATASETS_OFFLINE=1"
    )


def resolve_builtin(path: str) -> str:
    """``builtin:<name>`` names a bundled asset; anything else is returned unchanged."""
    if path.startswith("builtin:"):
        if path not in BUILTIN:
            raise DataError(f"unknown bundled asset '{path}'; choose one of {', '.join(BUILTIN)}")
        return str(BUILTIN[path])
    return path


# ----------------------------------------------------------------------------------------------------------
# reading


def read_tsv(path: Path, task: Task, split: Split) -> dict[str, list]:
    """Read one official GLUE TSV file.

    Quoting is off on purpose: GLUE text contains unbalanced quotes, and csv's default quoting silently
    merges rows. Every row must have as many fields as the header.
    """
    if not path.is_file():
        raise DataError(
            f"missing GLUE file {path} (task {task.name}, split {split.name}). Put the official GLUE download "
            "under data.glue_dir, or unset data.glue_dir to use the Hub dataset"
            + ("; or set eval.predict_test=false to skip test predictions" if split.kind == "test" else "")
        )
    rows = list(csv.reader(_read_text(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    headerless = task.tsv_label is None and split.kind != "test"  # CoLA train/dev
    if headerless:
        header, body, first_line = ["source", "label", "original_label", "sentence"], rows, 1
    else:
        header, body, first_line = rows[0], rows[1:], 2
    columns = [*task.tsv_columns, *([] if split.kind == "test" else [task.tsv_label or "label"])]
    id_column = "id" if split.kind == "test" and "id" in header else "index"  # QQP's test file says "id"
    if split.kind == "test":
        columns.append(id_column)
    for name in columns:
        if name not in header:
            raise DataError(f"{path}:1: expected a column '{name}' in the header, found {header}")
    pos = {name: header.index(name) for name in header}
    seen: dict[int, int] = {}  # test index -> line
    out: dict[str, list] = {"idx": [], **{c: [] for c in task.text_columns}, "label": []}
    for n, row in enumerate(body):
        line = first_line + n
        if not row:
            continue  # trailing blank line
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line}: row has {len(row)} tab-separated fields, the header has {len(header)}; "
                "fix or remove the row (GLUE files are read with quoting off)"
            )
        out["idx"].append(
            _index(row[pos[id_column]], path, line, seen) if split.kind == "test" else len(out["idx"])
        )
        for hub_col, tsv_col in zip(task.text_columns, task.tsv_columns, strict=True):
            out[hub_col].append(row[pos[tsv_col]])
        out["label"].append(-1 if split.kind == "test" else _label(row[pos[columns[-1]]], task, path, line))
    return out


def _read_text(path: Path) -> str:
    """The file's text (utf-8-sig: MRPC starts with a BOM); bytes that are not UTF-8 are an error naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); the official GLUE files are UTF-8, "
            "re-download the file or convert it (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _index(raw: str, path: Path, line: int, seen: dict[int, int]) -> int:
    """A test row's ``index``: an integer the server can match, once per file."""
    try:
        value = int(raw)
    except ValueError:
        raise DataError(
            f"{path}:{line}: test index '{raw}' is not an integer; fix or remove the row"
        ) from None
    if value in seen:
        raise DataError(
            f"{path}:{line}: test index {value} appears twice (first at line {seen[value]}); the GLUE server "
            "matches predictions by index, so each must be unique"
        )
    seen[value] = line
    return value


def _label(raw: str, task: Task, path: Path, line: int) -> int | float:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: score '{raw}' is not a number") from None
    names = task.tsv_labels or task.labels
    if raw not in names:
        raise DataError(f"{path}:{line}: label '{raw}' is not one of {list(names)} for task {task.name}")
    return names.index(raw)


def read_hub(task: Task, split: Split, dataset: str = "nyu-mll/glue") -> dict[str, list]:
    """The same columns from the Hub dataset ``nyu-mll/glue`` (or a local copy of its repository)."""
    import datasets

    config = split.hub_config or task.name
    hub_split = "test" if split.hub_config else split.name
    try:
        ds = datasets.load_dataset(dataset, config, split=hub_split)
    except Exception as e:  # network, auth, offline mode: all end here
        raise DataError(
            f"data.glue_dir is unset, so GLUE is read from the Hub dataset {dataset}, but {config} split "
            f"{hub_split} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). "
            + offline_advice()
        ) from None
    return {c: list(ds[c]) for c in ("idx", *task.text_columns, "label")}


def read_split(cfg: DataConfig, task: Task, split: Split) -> dict[str, list]:
    if cfg.glue_dir is None:
        return read_hub(task, split, cfg.hub_dataset)
    return read_tsv(Path(resolve_builtin(cfg.glue_dir)) / split.tsv, task, split)


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


# ----------------------------------------------------------------------------------------------------------
# batching


@dataclass(frozen=True)
class Layout:
    """How the effective batch is split: ``effective = per_device * accum * world``."""

    effective: int
    per_device: int
    accum: int
    world: int

    @classmethod
    def derive(cls, effective: int, per_device: int | None, world: int) -> Layout:
        if per_device is None:
            if effective % world:
                raise ConfigError(
                    f"train.effective_batch_size={effective} is not divisible by the world size {world}; "
                    f"use a world size that divides it, or set train.per_device_batch_size to a divisor of "
                    f"{effective}/{world} that makes it exact"
                )
            per_device = effective // world
        if per_device > effective:
            raise ConfigError(
                f"train.per_device_batch_size={per_device} is larger than train.effective_batch_size={effective}"
            )
        if effective % (per_device * world):
            raise ConfigError(
                f"train.effective_batch_size={effective} is not divisible by "
                f"train.per_device_batch_size={per_device} x world size {world} = {per_device * world}; "
                "gradient accumulation must be a whole number of steps. Choose per_device_batch_size so that "
                f"per_device_batch_size x {world} divides {effective}"
            )
        return cls(effective, per_device, effective // (per_device * world), world)

    def describe(self) -> str:
        return (
            f"effective batch {self.effective} = {self.per_device} per device x {self.accum} accumulation "
            f"x {self.world} processes"
        )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of one epoch: a function of seed and epoch only, never of the world size."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def grouped_order(lengths: np.ndarray, effective: int, seed: int, epoch: int, window: int = 50) -> np.ndarray:
    """A length-grouped epoch order (``data.group_by_length``): rows of similar length share a global batch.

    The epoch's shuffled order is cut into windows of ``window`` global batches, each window is sorted by
    length (longest first), cut into global batches of ``effective`` rows, and the full batches are shuffled
    (the short last batch, if any, stays last). A function of lengths, seed and epoch only, never of the world
    size; every row appears exactly once.
    """
    n = len(lengths)
    order = epoch_order(n, seed, epoch)
    chunk = effective * window
    parts = [
        o[np.argsort(-lengths[o], kind="stable")] for o in (order[s : s + chunk] for s in range(0, n, chunk))
    ]
    if parts:
        order = np.concatenate(parts)
    full = n // effective
    head = order[: full * effective].reshape(full, effective)
    head = head[np.random.default_rng([seed, epoch, 1]).permutation(full)]
    return np.concatenate([head.reshape(-1), order[full * effective :]])


class PlanSampler:
    """Yields this rank's micro-batches, ``accum`` per optimizer step, as lists of ``(index, weight)``.

    Each global batch of ``effective`` samples (the last one may be short) is cut into ``world * accum``
    slots of ``per_device`` samples; slots past the end are filled with weight-0 copies of a real sample so
    every rank runs the same number of forwards with the same shape, and a short batch still gets the exact
    mean over its real samples.
    """

    def __init__(self, n: int, layout: Layout, rank: int, seed: int, lengths: np.ndarray | None = None):
        self.n, self.layout, self.rank, self.seed = n, layout, rank, seed
        self.epoch, self.start = 0, 0
        self.lengths = None if lengths is None else np.asarray(lengths)  # set: length-grouped batches
        if self.lengths is not None and len(self.lengths) != n:
            raise ValueError(f"{len(self.lengths)} row lengths for {n} rows")
        self._order: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def steps_per_epoch(self) -> int:
        return -(-self.n // self.layout.effective)

    def order(self) -> np.ndarray:
        """This epoch's row order, computed once per epoch (a permutation of MNLI costs ~4 ms: not per step)."""
        if self._order is None or self._order[0] != self.epoch:
            if self.lengths is None:
                order = epoch_order(self.n, self.seed, self.epoch)
            else:
                order = grouped_order(self.lengths, self.layout.effective, self.seed, self.epoch)
            self._order = (self.epoch, order)
        return self._order[1]

    def global_batch(self, step: int) -> np.ndarray:
        return self.order()[step * self.layout.effective : (step + 1) * self.layout.effective]

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start) * self.layout.accum

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        lay = self.layout
        order = self.order()
        for step in range(self.start, self.steps_per_epoch()):
            batch = order[step * lay.effective : (step + 1) * lay.effective]
            padded = np.full(lay.effective, -1)
            padded[: len(batch)] = batch
            for a in range(lay.accum):
                lo = (a * lay.world + self.rank) * lay.per_device
                yield [
                    (int(i), 1.0) if i >= 0 else (int(batch[0]), 0.0)
                    for i in padded[lo : lo + lay.per_device]
                ]


class Packed:
    """A tokenized split as flat numpy arrays + offsets, read once from its Arrow table.

    A ``datasets.Dataset`` row lookup costs ~45 us (measured: 0.7 ms for a batch of 16, plus 0.9 ms to
    collate Python lists); here a row is one array slice per tokenized field (``input_ids``, and whatever else
    the tokenizer made).
    """

    def __init__(self, ds):
        table = ds.with_format("arrow")[:]  # honours select()/indices mappings
        self.fields = {
            name: self._flat(table.column(name))
            for name in table.column_names
            if name not in ("label", "idx")
        }
        self.labels = table.column("label").to_numpy()
        self.idx = table.column("idx").to_numpy()

    @staticmethod
    def _flat(column) -> tuple[np.ndarray, np.ndarray]:
        arr = column.combine_chunks()
        return arr.values.to_numpy(), np.asarray(arr.offsets)  # offsets index into values (slices included)

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.fields["input_ids"][1])

    def row(self, i: int, weight: float = 1.0) -> dict:
        out = {name: values[offsets[i] : offsets[i + 1]] for name, (values, offsets) in self.fields.items()}
        out.update(label=self.labels[i], idx=self.idx[i], weight=weight)
        return out


def row_lengths(ds) -> np.ndarray:
    """Tokens per row of a tokenized split (for ``data.group_by_length``)."""
    return Packed(ds).lengths()


class Weighted(torch.utils.data.Dataset):
    """Wraps a tokenized dataset so ``ds[(i, w)]`` returns row ``i`` with a loss weight ``w`` (``ds[i]``: 1)."""

    def __init__(self, ds):
        self.rows = ds if isinstance(ds, Packed) else Packed(ds)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> dict:
        i, w = key if isinstance(key, tuple) else (key, 1.0)
        return self.rows.row(int(i), w)

    def __getitems__(self, keys: list) -> list[dict]:  # the DataLoader fetches a whole batch in one call
        return [self[k] for k in keys]


@dataclass(frozen=True)
class Inputs:
    """The tokenized fields a batch feeds the model (decided by ``train.model.model_inputs``).

    ``fields``: tokenized columns passed to the model, ``input_ids`` first (``token_type_ids`` only where the
    tokenizer makes them and the model has more than one token type); ``mask``: whether the model takes
    ``attention_mask``; ``pad``: the padding value of each field (the tokenizer's pad id and pad token type).
    """

    fields: tuple[str, ...] = ("input_ids", "token_type_ids")
    mask: bool = True
    pad: dict[str, int] = field(default_factory=lambda: {"input_ids": 0, "token_type_ids": 0})

    @property
    def model_keys(self) -> tuple[str, ...]:
        return self.fields + (("attention_mask",) if self.mask else ())


def make_collator(
    inputs: Inputs,
    regression: bool,
    pad_to_multiple_of: int | None = None,
    buckets: Sequence[int] | None = None,
) -> Callable:
    """Dynamic padding: each batch is padded to its longest row (rounded up to a multiple if asked), or, with
    ``buckets`` (the fast path's few fixed lengths), to the smallest bucket that holds it. Every field of
    ``inputs`` is padded with its own value; ``attention_mask`` marks the real tokens (also used to count them)."""
    sizes = sorted(buckets) if buckets else None

    def padded_length(longest: int) -> int:
        if sizes:
            i = bisect.bisect_left(sizes, longest)
            return sizes[i] if i < len(sizes) else longest
        if pad_to_multiple_of:
            return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        return longest

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        lens = [len(r["input_ids"]) for r in rows]
        length = padded_length(max(lens))
        arrays = {
            name: np.full((len(rows), length), inputs.pad[name], dtype=np.int64) for name in inputs.fields
        }
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for j, (r, n) in enumerate(zip(rows, lens, strict=True)):
            for name, array in arrays.items():
                array[j, :n] = r[name]
            mask[j, :n] = 1
        return {
            **{name: torch.from_numpy(array) for name, array in arrays.items()},
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.tensor(
                np.asarray([r["label"] for r in rows]), dtype=torch.float if regression else torch.long
            ),
            "weight": torch.tensor([float(r.get("weight", 1.0)) for r in rows], dtype=torch.float),
            "idx": torch.tensor(np.asarray([r["idx"] for r in rows]), dtype=torch.long),
        }

    return collate


def _own_generator() -> torch.Generator:
    """Each loader draws its workers' base seed from its own generator, not torch's global one: a resumed run
    creates its iterator at another point than the uninterrupted run did, and the global draws would shift
    every dropout mask after the resume (the order itself comes from the PlanSampler, never from torch)."""
    return torch.Generator().manual_seed(0)


def train_loader(ds, sampler: PlanSampler, collate: Callable, num_workers: int, pin: bool):
    return torch.utils.data.DataLoader(
        Weighted(ds),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin,
        generator=_own_generator(),
    )


def eval_loader(ds, batch_size: int, collate: Callable, num_workers: int, pin: bool):
    return torch.utils.data.DataLoader(
        Weighted(ds),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin,
        generator=_own_generator(),
    )
