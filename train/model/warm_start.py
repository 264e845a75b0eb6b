"""``model.init_from``: start a run from other fine-tuned weights (e.g. RTE, MRPC and STS-B from MNLI).

What it accepts (resolved when the run starts):

- a run folder: its ``best/`` model (a run folder without one is refused: it has not evaluated yet);
- a model folder (``config.json`` + weights, e.g. a run's ``best/`` or ``final/``, or any local HF checkpoint);
- ``SWEEP_DIR@task``: the sweep folder's selected override set for ``task`` (best median dev score over seeds,
  train/folders/selection.py) and, of that set, the seed whose best model has the highest dev score. This is what
  ``train.sweeps.sweep --warm-start mnli`` writes, so a SLURM array submitted before the MNLI runs finish resolves it
  when it starts.

The encoder always comes from that folder. The classification head (everything outside the family's base model,
``base_model_prefix``; e.g. RoBERTa's dense + out_proj, not only the last layer) is kept only when it predicts this
task's labels, same names in the same order (``model.init_head=auto``); otherwise it is a new one, initialised by
the family's own init as for a pretrained checkpoint without a head, as fairseq does when the number of classes
differs. ``model.init_head=map`` instead builds the head from the saved one when every label of the task maps onto
the saved labels by name: ``X`` takes the row of ``X``, ``not_X`` the other labels combined. MNLI's three labels ->
RTE's entailment / not_entailment: not_entailment's logit is ``mean(neutral, contradiction) + log 2``, the linear
approximation of ``log(exp(neutral) + exp(contradiction))`` (exact when the two are equal). The head's other layers
are kept. ``new`` always re-initialises the head.

The tokenizer saved with those weights is used (a run folder saves it next to its model): it is the one the encoder
was trained with, so nothing can disagree with it. ``model.name_or_path`` is not loaded; it names the run (folder,
report), and for a run folder it must be the name that run was trained from (else an error). The model config
(dropout, attention) is the saved one's; ``model.dropout`` still overrides it. ``run_info.json`` records where the
weights came from (``init_from``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.config import Config
from train.errors import ConfigError
from train.tasks import TASKS, Task

log = logging.getLogger(__name__)


@dataclass
class InitSource:
    """Where a run's initial weights come from."""

    requested: str  # model.init_from as given
    model_dir: Path  # the folder loaded (config.json, weights, tokenizer)
    run_dir: Path | None = None  # the run it belongs to, if any
    selected: dict | None = None  # SWEEP_DIR@task: the selection that picked the run
    head: dict = field(default_factory=dict)  # what happened to the classification head (filled by load)

    def record(self) -> dict[str, Any]:
        """For run_info.json."""
        return {
            "requested": self.requested,
            "model_folder": str(self.model_dir),
            "run": str(self.run_dir) if self.run_dir else None,
            "selected": self.selected,
            "head": self.head,
        }


# ----------------------------------------------------------------------------------------------------------
# which folder


def selected_run(sweep_dir: str | Path, task: str):
    """(the selected override set, its best seed's run record) of ``task`` in a sweep folder."""
    from train.folders import selection
    from train.folders.runs import scan

    if task not in TASKS:
        raise ConfigError(f"model.init_from=...@{task}: unknown task; choose one of {', '.join(TASKS)}")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"model.init_from={sweep_dir}@{task}: {sweep_dir} is not a folder")
    picked = selection.select([r for r in scan(sweep_dir) if r.task == task]).get(task)
    if picked is None:
        raise ConfigError(
            f"model.init_from={sweep_dir}@{task}: no finished {task} run (eval_results.json) in {sweep_dir}; "
            f"run the {task} runs first"
        )
    return picked, picked.best_run()


def _from_folder(path: Path, requested: str) -> InitSource:
    if (path / "best" / "config.json").is_file():
        return InitSource(requested, (path / "best").resolve(), path.resolve())
    if (path / "config.json").is_file():
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        return InitSource(requested, path.resolve(), run.resolve() if run else None)
    if (path / "config.yaml").is_file():
        raise ConfigError(
            f"model.init_from={requested}: the run folder has no best/ model yet (it has not evaluated; is it "
            "still running or did it fail?). Point at a finished run, or at a model folder"
        )
    raise ConfigError(
        f"model.init_from={requested}: not a run folder (with best/), a model folder (with config.json) or "
        "SWEEP_DIR@task"
    )


def _check_name(cfg: Config, src: InitSource) -> None:
    """A run folder's weights were trained from one model.name_or_path; this run must carry the same name."""
    if src.run_dir is None:
        return
    try:
        trained = (yaml.safe_load((src.run_dir / "config.yaml").read_text()) or {}).get("model", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return
    name = trained.get("name_or_path") if isinstance(trained, dict) else None
    if name and name != cfg.model.name_or_path:
        raise ConfigError(
            f"model.init_from={src.requested}: that run was trained from model.name_or_path={name}, this run "
            f"names {cfg.model.name_or_path}; set model.name_or_path={name} (with init_from it only names the "
            "run, the weights and tokenizer come from the run)"
        )


def resolve(cfg: Config) -> InitSource | None:
    """The folder ``model.init_from`` names (None when it is unset)."""
    spec = cfg.model.init_from
    if not spec:
        return None
    path = Path(spec)
    if not path.exists() and "@" in spec:
        folder, _, task = spec.rpartition("@")
        cand, run = selected_run(folder, task)
        src = _from_folder(Path(run.folder), spec)
        src.selected = {
            "sweep": str(Path(folder).resolve()),
            "task": task,
            "set": cand.group,
            "median": cand.median,
            "seeds": cand.seeds,
            "run": run.name,
        }
    else:
        src = _from_folder(path, spec)
    _check_name(cfg, src)
    return src


# ----------------------------------------------------------------------------------------------------------
# the head


def saved_labels(mcfg) -> tuple[str, ...] | None:
    """The labels the saved head predicts: names by id, () for regression, None when it has no such head."""
    if not any(str(a).endswith("ForSequenceClassification") for a in (mcfg.architectures or [])):
        return None
    if mcfg.problem_type == "regression" or mcfg.num_labels == 1:
        return ()
    return tuple(str(mcfg.id2label[i]) for i in range(mcfg.num_labels))


def label_map(src: tuple[str, ...], dst: tuple[str, ...]) -> tuple[list[list[float]], list[float]] | None:
    """(matrix [len(dst) x len(src)], bias offsets) mapping saved logits onto the task's, or None.

    ``X`` <- ``X``; ``not_X`` <- the mean of the other labels' rows + log(their count) (log-sum-exp, linearised).
    """
    if not src or not dst:
        return None
    rows, offsets = [], []
    for label in dst:
        if label in src:
            rows.append([1.0 if s == label else 0.0 for s in src])
            offsets.append(0.0)
        elif label.startswith("not_") and label[4:] in src:
            others = [s for s in src if s != label[4:]]
            rows.append([1.0 / len(others) if s in others else 0.0 for s in src])
            offsets.append(math.log(len(others)))
        else:
            return None
    return rows, offsets


@dataclass
class HeadPlan:
    kind: str  # kept | new | mapped
    reason: str
    saved: tuple[str, ...] | None
    mapping: tuple[list[list[float]], list[float]] | None = None


def head_plan(saved_cfg, task: Task, mode: str) -> HeadPlan:
    saved, wanted = saved_labels(saved_cfg), task.labels
    if saved is None:
        return HeadPlan("new", "the folder holds no sequence-classification head", None)
    if mode == "new":
        return HeadPlan("new", "model.init_head=new", saved)
    if saved == wanted:
        return HeadPlan("kept", f"it predicts this task's labels {list(wanted) or 'regression'}", saved)
    what = (
        f"it predicts {list(saved) or 'a regression score'}, {task.name} needs {list(wanted) or 'regression'}"
    )
    if mode == "map":
        mapping = label_map(saved, wanted)
        if mapping is not None:
            return HeadPlan("mapped", f"{what}: mapped by label name (model.init_head=map)", saved, mapping)
        return HeadPlan("new", f"{what}, and the labels do not map by name", saved)
    return HeadPlan("new", what, saved)


def _state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"model.init_from: {folder} has no safetensors weights, which re-initialising or mapping the head "
            "needs; save the model with save_pretrained(safe_serialization=True)"
        )
    state: dict = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def _mapped(state: dict, prefix: str, n_saved: int, mapping: tuple[list[list[float]], list[float]]) -> dict:
    """The head's output layer (its tensors with one row per saved label) mapped onto the task's labels."""
    import torch

    matrix, offsets = mapping
    out, changed = dict(state), []
    for key, value in state.items():
        if key.startswith(prefix + ".") or value.ndim not in (1, 2) or value.shape[0] != n_saved:
            continue
        m = torch.tensor(matrix, dtype=torch.float64)
        new = m @ value.double() if value.ndim == 2 else m @ value.double() + torch.tensor(offsets).double()
        out[key] = new.to(value.dtype)
        changed.append(key)
    if not changed:
        raise ConfigError(f"model.init_head=map: no output layer with {n_saved} rows found in the saved head")
    return out


def load(cls, src: InitSource, mcfg, task: Task, mode: str, **kwargs):
    """The model ``cls`` with ``src``'s encoder and the head ``mode`` asks for; fills ``src.head``."""
    from transformers import AutoConfig

    saved_cfg = AutoConfig.from_pretrained(
        src.model_dir, trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    plan = head_plan(saved_cfg, task, mode)
    src.head = {"kind": plan.kind, "why": plan.reason, "saved_labels": list(plan.saved or ())}
    log.info(
        "model.init_from: weights from %s%s; head %s (%s)",
        src.model_dir,
        f" (the {src.selected['task']} run {src.selected['run']}, set {src.selected['set']})"
        if src.selected
        else "",
        plan.kind,
        plan.reason,
    )
    if (
        plan.kind == "kept" or plan.saved is None
    ):  # as saved, or a folder without a head (the head is missing)
        return cls.from_pretrained(src.model_dir, config=mcfg, **kwargs)
    prefix = getattr(cls, "base_model_prefix", "")
    if not prefix:
        raise ConfigError(f"model.init_from: cannot tell the head of {cls.__name__} from its encoder")
    state = _state_dict(src.model_dir)
    if plan.kind == "new":  # only the encoder: the head is missing, so it is initialised like a fresh one
        state = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    else:
        state = _mapped(state, prefix, len(plan.saved), plan.mapping)
    kwargs.pop("ignore_mismatched_sizes", None)
    return cls.from_pretrained(None, config=mcfg, state_dict=state, **kwargs)
