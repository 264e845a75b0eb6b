"""One compile cache per machine or sweep: where torch.compile keeps its work, and what it cost.

Compiling the fast path's shapes takes minutes on a cold cache and seconds on a warm one (CPU, tiny model:
333 s -> 23 s). torch keeps its caches in each machine's ``/tmp`` by default, so on a cluster every node
starts cold. Here the compiled path points them at one known folder, ``fast.cache_dir``, by default
``$GLUE_TRAIN_CACHE/compile`` (beside the tokenized cache; ``data.cache_dir`` moves both):

- inductor's FX graph cache, AOTAutograd's cache, the C++/Triton kernels and autotuning results all live
  under ``TORCHINDUCTOR_CACHE_DIR`` (Triton's too, unless ``TRITON_CACHE_DIR`` is set), which is set here
  before the first compile of the process, to the same folder on every rank and every run of a sweep;
- filling it from several processes at once is safe: torch writes every entry to a temporary name and
  renames it into place (``torch._inductor.codecache.write_atomic``), so a reader sees a whole entry or
  none, and two writers of one key write the same bytes; our own files go through ``train.files.write_atomic``;
- ``glue-train/<key>.json`` beside them records, per *compile key* (what decides the compiled graphs: model
  config and code, forward signature, attention, dtypes, shapes, precision, backend, device, launcher, versions,
  compile environment variables), the seconds the last cold and warm compile took and
  the cache entries they produced; ``fast.enabled=auto`` reads it to estimate what compiling will cost
  (train/engine/fastpath.py: ``auto_pays_off``);
- ``glue-train/<key>.bin`` is torch's portable mega-cache (``torch.compiler.save_cache_artifacts``) of those
  entries, saved after a compile that missed. When the record is there but its entries are not (a cache
  folder copied without torch's subfolders, or cleaned by hand), it is hot-loaded
  (``load_cache_artifacts``) before compiling, which makes the cache warm again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.errors import ConfigError
from train.files import write_atomic

log = logging.getLogger(__name__)

# torch's hit/miss counters (torch._dynamo.utils.counters[group][name]), as named in torch 2.11-2.13
COUNTERS = {
    "fxgraph": ("inductor", "fxgraph_cache_hit", "fxgraph_cache_miss"),
    "aot_autograd": ("aot_autograd", "autograd_cache_hit", "autograd_cache_miss"),
}


def cache_dir(fast_cache_dir: str | None, data_cache_dir: str | None) -> Path:
    """``fast.cache_dir``, else ``compile/`` beside the tokenized cache (``data.cache_dir`` or $GLUE_TRAIN_CACHE)."""
    if fast_cache_dir:
        return Path(fast_cache_dir).expanduser().resolve()
    root = data_cache_dir or os.environ.get("GLUE_TRAIN_CACHE") or Path.home() / ".cache" / "glue-train"
    return (Path(root).expanduser() / "compile").resolve()


OWN = ".glue-train-compile-cache"  # made by this program (written when it creates or adopts the folder)


def check_own(folder: Path) -> None:
    """torch loads its compile caches by unpickling (code runs), so only a folder this program made, that only
    this user can write to, is used: else a ConfigError naming it. A new or empty folder is made ours (marked);
    one that holds this program's records (``glue-train/``, from before the marker) too."""
    folder = Path(folder)
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process of a sweep made it first
            folder.mkdir(mode=0o700)  # only this user writes there, whatever the umask
    names = sorted(p.name for p in folder.iterdir() if p.name != OWN)
    ours = (folder / OWN).is_file() or not names or (folder / "glue-train").is_dir()
    st = folder.stat()
    if not ours or st.st_uid != os.getuid() or st.st_mode & 0o022:
        why = (
            f"it was not made by glue-train (no {OWN} in it; it holds {', '.join(names[:6])})"
            if not ours
            else f"other users can write to it (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
        )
        raise ConfigError(
            f"compile cache {folder} (fast.cache_dir; by default compile/ beside the tokenized cache): {why}. "
            "torch loads compiled code from that folder by unpickling it, which runs whatever its files say, so "
            "only a folder of this program's that only you can write to is used. Point fast.cache_dir at a new "
            "folder (or make it yours: chmod go-w), or set fast.enabled=false"
        )
    with contextlib.suppress(FileExistsError):  # another process of a sweep marked it first
        os.close(os.open(folder / OWN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def activate(folder: Path) -> None:
    """Point torch's compile caches at ``folder`` (before this process compiles; read lazily by torch), once
    :func:`check_own` has found it this program's."""
    check_own(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # the defaults; set in case an environment variable turned them off
    functorch_config.enable_autograd_cache = True


def counters() -> dict[str, dict[str, int]]:
    """This process's cache lookups so far: ``{"fxgraph": {"hits", "misses"}, "aot_autograd": {...}}``."""
    from torch._dynamo.utils import counters as torch_counters

    return {
        name: {"hits": int(torch_counters[group][hit]), "misses": int(torch_counters[group][miss])}
        for name, (group, hit, miss) in COUNTERS.items()
    }


def lookups_since(before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    now = counters()
    return {name: {k: now[name][k] - before[name][k] for k in ("hits", "misses")} for name in now}


def compile_key(parts: dict[str, Any]) -> str:
    """A short stable hash of what decides the compiled graphs (JSON of ``parts``, keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# environment variables that change what torch.compile makes (not where it keeps it: *_CACHE_DIR)
COMPILE_ENV = ("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE_", "TRITON_")


def model_parts(model: Any) -> dict[str, Any]:
    """What of a model decides its compiled graphs besides its config: the source of every module class in it
    (and their bases: library or remote code alike), ``forward``'s signature, the attention implementation
    and the parameters' dtypes."""
    import inspect

    classes = {c for m in model.modules() for c in type(m).__mro__ if c.__module__.split(".")[0] != "torch"}
    digests = set()
    for cls in classes:
        files = _source_files(cls)
        for (
            path
        ) in files:  # the files' content, not their paths: a moved environment compiles the same graphs
            try:
                digests.add(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            except OSError:
                files = set()
        if not files:  # builtins, classes made at run time: their name
            digests.add(hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}".encode()).hexdigest())
    h = hashlib.sha256("".join(sorted(digests)).encode())
    forward = getattr(model, "forward", None)
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_code": h.hexdigest(),
        "forward": str(inspect.signature(forward)) if forward is not None else None,
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "buffer_dtypes": sorted({str(b.dtype) for b in model.buffers()}),
    }


def _source_files(cls: type) -> set[str]:
    """Where ``cls`` is written: its module's file, else the files its own functions were compiled from."""
    import inspect

    try:
        path = inspect.getsourcefile(cls)
        if path:
            return {path}
    except (TypeError, OSError):  # a module no longer in sys.modules, or a builtin
        pass
    return {f.__code__.co_filename for f in vars(cls).values() if hasattr(f, "__code__")}


def environment_parts() -> dict[str, Any]:
    """Versions, the launcher's backend and the environment variables that change what torch.compile makes."""
    import platform
    from importlib import metadata

    import torch

    from train.engine.backends import launched

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(COMPILE_ENV) and not k.endswith("CACHE_DIR")
    }
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "triton": version("triton") or version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "launcher": launched(),  # each backend wraps the model differently
        "compile_env": env,
    }


@dataclass(frozen=True)
class CacheState:
    """What the cache holds for one compile key, as ``fast.enabled=auto`` needs it (see ``fastpath.auto_pays_off``).

    ``warm``: the entries of an earlier compile of the same key are in the folder (or were just hot-loaded from
    its mega-cache); ``cold_s`` / ``warm_s``: the seconds the last compile of this key took with a cold / a warm
    cache (None: never measured).
    """

    warm: bool = False
    cold_s: float | None = None
    warm_s: float | None = None
    mega_loaded: bool = False


class CompileCache:
    """The cache folder and this run's compile key: state before compiling, record after."""

    def __init__(self, folder: Path, key: str, parts: dict[str, Any] | None = None):
        self.folder, self.key, self.parts = Path(folder), key, parts or {}

    @property
    def record_path(self) -> Path:
        return self.folder / "glue-train" / f"{self.key}.json"

    @property
    def mega_path(self) -> Path:
        return self.folder / "glue-train" / f"{self.key}.bin"

    def read_record(self) -> dict:
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def prepare(self) -> CacheState:
        """Activate the folder and tell whether this key's entries are there (hot-loading the mega-cache if not)."""
        activate(self.folder)
        record = self.read_record()
        if not record:
            return CacheState()
        cold_s, warm_s = record.get("cold_s"), record.get("warm_s")
        if entries_present(record.get("artifacts", {})):
            return CacheState(True, cold_s, warm_s)
        loaded = self.load_mega()
        if loaded and entries_present(record.get("artifacts", {})):
            return CacheState(True, cold_s, warm_s, mega_loaded=True)
        return CacheState(False, cold_s, warm_s)

    def load_mega(self) -> bool:
        import torch

        if not self.mega_path.exists() or not hasattr(torch.compiler, "load_cache_artifacts"):
            return False
        try:
            t0 = time.perf_counter()
            info = torch.compiler.load_cache_artifacts(self.mega_path.read_bytes())
        except Exception as e:  # noqa: BLE001 - a damaged or foreign blob only costs a cold compile
            log.warning("compile cache: could not load %s (%s); compiling from scratch", self.mega_path, e)
            return False
        log.info("compile cache: hot-loaded %s in %.1f s", self.mega_path, time.perf_counter() - t0)
        return info is not None

    def save(self, compile_s: float, lookups: dict[str, dict[str, int]], shapes: int) -> None:
        """Record what this compile cost (main process); a compile that missed also saves the mega-cache."""
        hits = sum(v["hits"] for v in lookups.values())
        misses = sum(v["misses"] for v in lookups.values())
        record = self.read_record()
        artifacts = record.get("artifacts", {})
        if misses:
            artifacts = self.save_mega() or artifacts
            record["cold_s"] = round(compile_s, 3)
        elif hits:
            record["warm_s"] = round(compile_s, 3)
        else:  # a backend without caches (aot_eager, eager): every compile costs the same
            record["cold_s"] = record["warm_s"] = round(compile_s, 3)
        record.update(
            key=self.key,
            shapes=shapes,
            artifacts=artifacts,
            last={"compile_s": round(compile_s, 3), "hits": hits, "misses": misses},
            updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            parts=self.parts,
        )
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.record_path, json.dumps(record, indent=1, default=str))

    def save_mega(self) -> dict[str, list[str]] | None:
        """torch's portable mega-cache of everything this process compiled or loaded; its artifact keys."""
        import torch

        if not hasattr(torch.compiler, "save_cache_artifacts"):
            return None
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as e:  # noqa: BLE001 - the folder's own entries are still there
            log.warning("compile cache: mega-cache not saved (%s)", e)
            return None
        if saved is None:
            return None
        blob, info = saved
        self.mega_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.mega_path, blob)
        return {kind: list(keys) for kind, keys in getattr(info, "artifacts", {}).items()}


def entries_present(artifacts: dict[str, list[str]]) -> bool:
    """Whether torch's cache folder holds every inductor and AOTAutograd entry named in ``artifacts``."""
    try:
        from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCache
        from torch._inductor.codecache import FxGraphCache
    except ImportError:  # another torch layout: trust the record
        return True
    where = {
        "inductor": FxGraphCache._get_tmp_dir_for_key,
        "aot_autograd": AOTAutogradCache._get_tmp_dir_for_key,
    }
    return all(
        os.path.isdir(where[kind](key)) for kind, keys in artifacts.items() if kind in where for key in keys
    )
