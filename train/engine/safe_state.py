"""Reading a checkpoint without running code from it: the states it holds as JSON, every tensor file weights-only.

A pickle runs whatever its file says when it is loaded, and a checkpoint folder can come from anywhere (a
copied run folder, a handed-over one; its ``files.json`` is written by whoever wrote the folder, so it vouches for
nothing). So:

- the program's own states are JSON: the random generators of each rank (``rng_state_<rank>.json``, instead of
  Accelerate's ``random_states_<rank>.pkl``) and, in ``trainer_state.json``, the LR schedule (instead of
  Accelerate's ``custom_checkpoint_0.pkl``);
- while a checkpoint is restored (:func:`weights_only`), every ``torch.load`` (Accelerate's, a backend engine's,
  ours) runs with ``weights_only=True``, whatever the caller asked for: tensors and plain data only, plus the data
  classes a backend names (``Backend.checkpoint_classes``); torch's distributed-checkpoint reader (FSDP's sharded
  state), which reads its ``.metadata`` with plain ``pickle``, gets an unpickler that allows only that metadata's
  data classes. A file that holds anything else is not loaded and names itself in a
  :class:`~train.errors.CheckpointError`, also where a library would swallow the failure (Accelerate ignores a
  random-state file it cannot load).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from train.errors import CheckpointError

RNG_FILE = "rng_state_{}.json"
ACCELERATE_RNG_FILE = "random_states_{}.pkl"  # Accelerate's (removed at save; read from old checkpoints)
OLD_SCHEDULER_FILE = "custom_checkpoint_0.pkl"  # the schedule in checkpoints written before it was JSON
ADVICE = (
    "Delete that checkpoint folder to resume from the previous one, point checkpoint.resume at another "
    "checkpoint, or set checkpoint.resume=never to start over"
)


# ----------------------------------------------------------------------------------------------------------
# random generators


def rng_states(acc) -> dict[str, Any]:
    """This process's generators (Python, NumPy, torch CPU and CUDA) and Accelerate's step counter, as JSON."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "accelerator_step": int(acc.step),  # decides where gradient accumulation syncs
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def save_rng(acc, folder: Path) -> None:
    """Every rank: its generators into ``rng_state_<rank>.json``; Accelerate's pickle of them is removed."""
    folder = Path(folder)
    i = acc.process_index
    (folder / RNG_FILE.format(i)).write_text(json.dumps(rng_states(acc)))
    (folder / ACCELERATE_RNG_FILE.format(i)).unlink(missing_ok=True)


def restore_rng(acc, folder: Path) -> None:
    """Every rank: the inverse of :func:`save_rng`. A checkpoint written before the JSON file existed had its
    generators restored by Accelerate (weights-only, under :func:`weights_only`)."""
    import numpy as np
    import torch

    folder = Path(folder)
    path = folder / RNG_FILE.format(acc.process_index)
    if not path.is_file():
        if (folder / ACCELERATE_RNG_FILE.format(acc.process_index)).is_file():
            return
        raise CheckpointError(
            f"checkpoint file {path} is missing (the random generators of this rank). {ADVICE}"
        )
    try:
        s = json.loads(path.read_text())
        version, internal, gauss = s["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(x, dtype=torch.uint8) for x in s["cuda"]])
        acc.step = int(s["accelerator_step"])
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint file {path} cannot be read ({type(e).__name__}: {str(e)[:200]}). {ADVICE}"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# every torch.load weights-only


def _name(f: Any) -> str:
    if isinstance(f, (str, Path)):
        return str(f)
    return str(getattr(f, "name", f"a stream ({type(f).__name__})"))


def _why(e: BaseException) -> str:
    import pickle

    text = " ".join(str(e).split())
    if isinstance(e, pickle.UnpicklingError) or "Unsupported global" in text:
        found = text.find("Unsupported global")
        detail = text[found : found + 120].split(" was not")[0] if found >= 0 else text[:160]
        return f"it holds more than tensors and plain data ({detail}), and loading it could run code"
    return f"it cannot be read ({type(e).__name__}: {text[:200]})"


class _DataOnly:
    """Allows only the data classes of torch's distributed-checkpoint metadata (FSDP's sharded checkpoints)."""

    MODULES = {"torch.distributed.checkpoint.metadata"}  # dataclasses and enums only, checked below
    NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    @classmethod
    def find_class(cls, module: str, name: str) -> Any:
        import enum
        import importlib
        import pickle

        import torch

        # only modules named here are looked into (importing another could run its code)
        if "." not in name and (module in cls.MODULES or (module, name) in cls.NAMES or module == "torch"):
            value = getattr(importlib.import_module(module), name, None)
            plain = isinstance(value, type) and (
                hasattr(value, "__dataclass_fields__") or issubclass(value, enum.Enum)
            )
            if (module in cls.MODULES and plain) or (module, name) in cls.NAMES:
                return value
            if module == "torch" and isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class _RestrictedPickle:
    """``pickle`` for a module that reads checkpoint metadata with it: ``load``/``loads`` allow data only; a
    failure is named, and kept in ``failed`` (torch's reader wraps it in its own words)."""

    def __init__(self, failed: list[CheckpointError]):
        self.failed = failed

    def __getattr__(self, name: str) -> Any:
        import pickle

        return getattr(pickle, name)

    def load(self, file, **kwargs) -> Any:
        import pickle

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                return _DataOnly.find_class(module, name)

        try:
            return Unpickler(file, **kwargs).load()
        except Exception as e:  # noqa: BLE001 - named like a torch.load failure
            error = CheckpointError(f"checkpoint file {_name(file)} is not loaded: {_why(e)}. {ADVICE}")
            self.failed.append(error)
            raise error from None

    def loads(self, data: bytes, **kwargs) -> Any:
        import io

        return self.load(io.BytesIO(data), **kwargs)


@contextmanager
def weights_only(classes: Sequence[type] = ()) -> Iterator[None]:
    """While a checkpoint is restored: every ``torch.load`` weights-only (``classes`` allowed besides tensors
    and plain data), and torch's distributed-checkpoint reader (FSDP's sharded state; it reads ``.metadata``
    with plain ``pickle.load``) limited to its metadata's data classes. The first file that fails is raised as
    a CheckpointError naming it, at the failure or, when the caller swallowed it, at the end of the block."""
    import torch

    original = torch.load
    failed: list[CheckpointError] = []

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True  # whatever the caller asked for
        kwargs.pop("pickle_module", None)  # weights-only loading has its own unpickler
        try:
            with torch.serialization.safe_globals(list(classes)):
                return original(f, *args, **kwargs)
        except FileNotFoundError:
            raise  # nothing was read; where a file is required, its caller says so (Accelerate's random-state
            # file is not: this program's own is rng_state_<rank>.json, checked by restore_rng)
        except Exception as e:  # noqa: BLE001 - any failure to load is this file's, and named
            error = CheckpointError(f"checkpoint file {_name(f)} is not loaded: {_why(e)}. {ADVICE}")
            failed.append(error)
            raise error from None

    dcp = _dcp_filesystem()
    torch.load = load
    if dcp is not None:
        dcp.pickle = _RestrictedPickle(failed)
    try:
        yield
    except BaseException as e:  # torch's distributed checkpoint wraps failures in a BaseException
        if failed and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise failed[0] from None  # the file's error, not the library's words for it
        raise
    finally:
        torch.load = original
        if dcp is not None:
            import pickle

            dcp.pickle = pickle
    if failed:  # swallowed by the caller (Accelerate ignores a random-state file it cannot load)
        raise failed[0]


def _dcp_filesystem():
    """torch's distributed-checkpoint file reader module, where torch has it (None otherwise)."""
    try:
        from torch.distributed.checkpoint import filesystem
    except ImportError:
        return None
    return filesystem if hasattr(filesystem, "pickle") else None


@contextmanager
def old_schedule(acc, scheduler, folder: Path) -> Iterator[bool]:
    """A checkpoint written before the schedule was JSON holds it in ``custom_checkpoint_0.pkl``, which
    Accelerate loads (weights-only, under :func:`weights_only`) only into a registered object: registered for
    the load only, so that no save pickles it again. Yields whether the folder has that file."""
    old = (Path(folder) / OLD_SCHEDULER_FILE).is_file()
    if old:
        acc.register_for_checkpointing(scheduler)
    try:
        yield old
    finally:
        if old:
            acc._custom_objects.remove(scheduler)  # Accelerate has no public way to unregister
