"""Which override set (grid point) of a search to keep, per task: the best **median** dev score over seeds.

A set is one report group (model · override tag) of a task's finished runs. Its dev score per run is the task's
``score`` (the mean of its GLUE metrics) on the primary dev split (MNLI: matched), the number that picks each run's
best model. Sets are ranked by median over seeds, ties by the higher mean, then the smaller sample std (unknown
for one seed, so it loses), then more seeds, then the group name. The median, not the mean or the maximum: one
lucky (or one diverged) seed moves the mean of a small task a lot and the maximum picks noise, while the median
of 3-5 seeds is what the papers report (RoBERTa, ELECTRA: median of 5) and is robust to one outlier.

Numbers here are fractions, as in ``eval_results.json`` (the report's tables show percent).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from train.errors import InputError
from train.files import read_mapping
from train.tasks import TASKS

SELECTION_FILE = "selection.json"
# Config keys that differ between runs for reasons other than the override set (never reported as its keys).
NOT_SET_KEYS = ("seed", "output_dir", "overwrite", "precision", "checkpoint", "tracking")


class Record(Protocol):  # train.folders.runs.RunRecord
    folder: Path
    name: str
    task: str | None
    seed: int | None
    model: str
    tag: str
    results: dict | None
    set_overrides: tuple[str, ...]

    @property
    def group(self) -> str: ...


def primary_split(task: str) -> str:
    """The dev split whose score picks a run's best model (the first one, as in the training loop)."""
    return TASKS[task].split("dev")[0].name


def run_score(results: dict, task: str, which: str = "best") -> float | None:
    """The task score of one run's ``which`` evaluation (best or final) on the primary dev split."""
    split = ((results.get(which) or {}).get("splits") or {}).get(primary_split(task)) or {}
    score = split.get("score")
    return None if score is None else float(score)


@dataclass
class Candidate:
    """One override set of one task: its finished runs and their dev scores."""

    task: str
    group: str
    model: str
    tag: str
    runs: list[Any] = field(default_factory=list)  # Records, in seed order
    scores: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.scores)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); NaN for one seed."""
        return statistics.stdev(self.scores) if self.n >= 2 else math.nan

    def rank_key(self) -> tuple:
        """Sorts best first: median, mean (rounded: the same seeds summed in another order tie), std, n, name."""
        std = math.inf if math.isnan(self.std) else round(self.std, 12)
        return (-round(self.median, 12), -round(self.mean, 12), std, -self.n, self.group)

    def best_run(self) -> Any:
        """The seed whose best model has the highest dev score: its predictions go into the submission."""
        best, top = self.runs[0], -math.inf
        for run in self.runs:  # the first of equal seeds wins
            score = run_score(run.results, self.task, "best")
            if score is not None and score > top:
                best, top = run, score
        return best


def candidates(records: Iterable[Record], which: str = "best") -> dict[str, list[Candidate]]:
    """Per task (in GLUE order), every override set with at least one finished run, best first."""
    found: dict[tuple[str, str], Candidate] = {}
    for rec in sorted(records, key=lambda r: (r.seed is None, r.seed or 0, r.name)):
        if rec.results is None or rec.task not in TASKS:
            continue
        score = run_score(rec.results, rec.task, which)
        if score is None:
            continue
        cand = found.setdefault((rec.task, rec.group), Candidate(rec.task, rec.group, rec.model, rec.tag))
        cand.runs.append(rec)
        cand.scores.append(score)
    out: dict[str, list[Candidate]] = {}
    for task in TASKS:
        sets = sorted((c for (t, _), c in found.items() if t == task), key=Candidate.rank_key)
        if sets:
            out[task] = sets
    return out


def select(records: Iterable[Record], which: str = "best") -> dict[str, Candidate]:
    """Per task, the override set with the best median dev score over its seeds."""
    return {task: sets[0] for task, sets in candidates(records, which).items()}


# ----------------------------------------------------------------------------------------------------------
# the override set's keys and values, typed as in the config


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_config(folder: Path) -> dict[str, Any]:
    """A run's resolved config.yaml as dotted keys ({} when it cannot be read)."""
    try:
        return _flatten(read_mapping(Path(folder) / "config.yaml"))
    except (OSError, InputError, AttributeError):
        return {}


def _own_key(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_SET_KEYS)


def set_keys(cand: Candidate, rivals: list[Candidate]) -> list[str]:
    """The config keys that make this override set: those the sweep's manifest names for it, else the keys in
    which the configs of the task's sets differ (for folders not made by train.sweeps.sweep)."""
    named = [o.split("=", 1)[0].strip() for o in cand.runs[0].set_overrides]
    if named:
        return list(dict.fromkeys(named))
    configs = [run_config(c.runs[0].folder) for c in rivals]
    keys = sorted({k for c in configs for k in c} if len(configs) > 1 else set())
    return [k for k in keys if _own_key(k) and len({repr(c.get(k)) for c in configs}) > 1]


def set_overrides(cand: Candidate, rivals: list[Candidate]) -> dict[str, Any]:
    """The set's override values as the run's resolved config holds them (typed: 1e-4 is a float)."""
    config = run_config(cand.runs[0].folder)
    raw = dict(o.split("=", 1) for o in cand.runs[0].set_overrides if "=" in o)
    out = {}
    for key in set_keys(cand, rivals):
        out[key] = config[key] if key in config else yaml.safe_load(raw.get(key, "null"))
    return out


def selection_record(cand: Candidate, rivals: list[Candidate], root: Path) -> dict[str, Any]:
    """One task's entry of ``selection.json``."""
    best = cand.best_run()

    def rel(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            return str(path)

    return {
        "tag": cand.tag,
        "group": cand.group,
        "model": cand.model,
        "overrides": set_overrides(cand, rivals),
        "split": primary_split(cand.task),
        "median": cand.median,
        "mean": cand.mean,
        "std": None if math.isnan(cand.std) else cand.std,
        "n": cand.n,
        "seeds": cand.seeds,
        "runs": [rel(r.folder) for r in cand.runs],
        "best_run": rel(best.folder),
        "best_seed": best.seed,
        "sets_compared": len(rivals),
    }
