"""The run's checkpoints: when and what to save, the restore at a start, and the ``best/``/``final/`` exports.

``maybe_save(step)`` decides by ``checkpoint.every_steps``. The files and their safety rules (temporary
folder, manifest, ``COMPLETE``, damaged ones skipped) are train/engine/checkpoint.py's; this object applies
them to one run with its backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.config import Config, to_dict
from train.engine import checkpoint, safe_state
from train.engine.state import TrainState
from train.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from train.engine.backends import Backend
    from train.engine.nonfinite import Guard
    from train.folders.runfolder import Start


class Checkpointer:
    def __init__(
        self,
        cfg: Config,
        acc: Accelerator,
        backend: Backend,
        out: Path,
        guard: Guard,
        scheduler: Any,
        data: dict[str, dict],
    ):
        self.cfg, self.acc, self.backend, self.out, self.guard = cfg, acc, backend, Path(out), guard
        self.scheduler = scheduler  # saved as JSON here (registered with Accelerate it would be a pickle)
        self.data = data  # the training and dev data's fingerprint (build.Data.sources)
        self.state = TrainState()  # the state a save writes: the restored one once restore() ran

    def restore(self, start: Start) -> tuple[TrainState, str]:
        """Collective. The training state to start from: the newest usable checkpoint (or the one asked for)
        restored into the prepared objects, or a fresh one; and where the run starts, in words."""
        want = self.cfg.checkpoint.resume
        path = None
        if want not in ("auto", "never") or start.action == "resume":
            path = checkpoint.choose(self.acc, want, self.out, to_dict(self.cfg), self.data)
        if path is None:
            self.state = TrainState()
            return self.state, f"fresh ({start.reason})"
        with safe_state.old_schedule(self.acc, self.scheduler, path) as old:
            saved = checkpoint.load(self.acc, path, self.backend)
        try:
            if not old:
                self.scheduler.load_state_dict(dict(saved["scheduler"]))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"checkpoint {path}: {checkpoint.STATE} holds no usable LR schedule ({type(e).__name__}: {e}). "
                f"{safe_state.ADVICE}"
            ) from None
        self.state = TrainState.from_dict(saved["train_state"])
        st = self.state
        return (
            st,
            f"resumed from {path} at step {st.global_step} (epoch {st.epoch}, step {st.step_in_epoch} of it)",
        )

    def maybe_save(self, step: int) -> Path | None:
        """Collective. Save at every ``checkpoint.every_steps``-th optimizer step; None when this is not one."""
        every = self.cfg.checkpoint.every_steps
        return self.save() if every and step % every == 0 else None

    def save(self) -> Path:
        """Collective. A checkpoint of the current step, after checking that no step since the last check
        went non-finite (a bad state is never saved)."""
        step = self.state.global_step
        self.guard.check(f"before the checkpoint of step {step}")
        saved = {
            "train_state": self.state.to_dict(),
            "config": to_dict(self.cfg),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data,
        }
        return checkpoint.save(self.acc, self.out, step, saved, self.cfg.checkpoint.keep_last, self.backend)

    def export(self, model: torch.nn.Module, tokenizer, name: str) -> None:
        """Collective. ``<run folder>/<name>/``: the whole model as a plain Hugging Face folder."""
        checkpoint.export_model(self.acc, model, tokenizer, self.out / name, self.backend)
