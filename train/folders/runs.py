"""The runs under a sweep folder: finished, unfinished and planned-but-not-started (read by train.sweeps.report,
train.folders.selection and train.model.warm_start; the sweep writes the two files named here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.config import model_short_name
from train.errors import InputError
from train.files import read_json, read_mapping

MANIFEST = "sweep.json"  # the planned runs (read by train.sweeps.report to list runs that never started)
STATUS = "sweep_status.json"  # exit code of each run this sweep started (read by train.sweeps.report)


@dataclass
class RunRecord:
    """One run folder (or a planned run without one)."""

    folder: Path
    name: str
    task: str | None = None
    seed: int | None = None
    model: str = ""
    tag: str = ""
    results: dict | None = None  # eval_results.json
    status: str = "finished"  # finished | unfinished | damaged | failed | not started
    note: str = ""
    set_overrides: tuple[str, ...] = ()  # the override set (grid point) of the sweep that made it, if any

    @property
    def group(self) -> str:
        return " · ".join(p for p in (self.model, self.tag) if p) or "runs"


def _read_json(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, InputError):  # missing or damaged: the run is listed without it
        return None


def _manifest_runs(root: Path) -> dict[Path, dict]:
    data = _read_json(root / MANIFEST) or {}
    return {(root / r["folder"]).resolve(): r for r in data.get("runs", [])}


def _tag_from_name(name: str, task: str | None, seed: int | None) -> str:
    prefix = f"{task}-s{seed}-"
    return name[len(prefix) :] if task and seed is not None and name.startswith(prefix) else ""


def _finished(folder: Path, root: Path, results: dict) -> RunRecord:
    task, seed = results.get("task"), results.get("seed")
    return RunRecord(
        folder,
        str(folder.relative_to(root)),
        task,
        seed,
        _model_name(results.get("model", "")),
        _tag_from_name(folder.name, task, seed),
        results,
    )


def _model_name(name_or_path: str) -> str:
    return model_short_name(name_or_path)


def _results_damage(path: Path) -> str | None:
    """Why a finished run's ``eval_results.json`` cannot be used (None when it can)."""
    try:
        results = read_json(path)
    except (OSError, InputError) as e:
        return f"{path.name} cannot be read ({type(e).__name__})"
    if "task" not in results or not isinstance(results.get("final"), dict):
        return f"{path.name} lacks the run's task or its final evaluation"
    return None


def _damaged(folder: Path, root: Path, problem: str) -> RunRecord:
    rec = _unfinished(folder, root)
    rec.status = "damaged"
    rec.note = (
        f"{problem}: the run finished but its results are lost; restore the file, or train again with "
        "overwrite=true (the old run is moved aside)"
    )
    return rec


def _unfinished(folder: Path, root: Path) -> RunRecord:
    try:
        cfg = read_mapping(folder / "config.yaml")
    except (OSError, InputError):
        cfg = {}
    task, seed = cfg.get("data", {}).get("task"), cfg.get("seed")
    model = _model_name(cfg.get("model", {}).get("name_or_path", ""))
    return RunRecord(
        folder,
        str(folder.relative_to(root)),
        task,
        seed,
        model,
        _tag_from_name(folder.name, task, seed),
        None,
        "unfinished",
        "config.yaml but no eval_results.json (still running, killed or failed)",
    )


def _apply_sweep_info(rec: RunRecord, planned: dict | None, status: dict) -> None:
    if planned:
        rec.tag = planned.get("tag", rec.tag)
        rec.name = planned.get("name", rec.name)
        rec.set_overrides = tuple(planned.get("set", ()))
    st = status.get(rec.name)
    if rec.results is None and st and st.get("rc", 0) != 0:
        rec.status = "failed"
        rec.note = f"exit code {st['rc']} in the sweep; see {st.get('log', 'its log')}"


def _set_aside(path: Path, root: Path) -> bool:
    """Inside a run moved aside by overwrite=true (``previous-<time>/``): history, not a run of the sweep."""
    return any(part.startswith("previous-") for part in path.relative_to(root).parts[:-1])


def scan(root: str | Path) -> list[RunRecord]:
    """Every run under ``root``: finished, damaged (an ``eval_results.json`` that cannot be read), unfinished
    (config.yaml only) and planned-but-not-started."""
    root = Path(root).resolve()
    planned = _manifest_runs(root)
    status = _read_json(root / STATUS) or {}
    records: dict[Path, RunRecord] = {}
    for path in sorted(root.rglob("eval_results.json")):
        if _set_aside(path, root):
            continue
        problem = _results_damage(path)
        if problem is None:
            records[path.parent.resolve()] = _finished(path.parent, root, _read_json(path) or {})
        elif (path.parent / "config.yaml").is_file():  # a run folder (not some other file of that name)
            records[path.parent.resolve()] = _damaged(path.parent, root, problem)
    for path in sorted(root.rglob("config.yaml")):
        folder = path.parent.resolve()
        if (
            folder not in records
            and "checkpoints" not in folder.relative_to(root).parts
            and not _set_aside(path, root)
        ):
            records[folder] = _unfinished(path.parent, root)
    for folder, run in planned.items():
        if folder not in records:
            records[folder] = RunRecord(
                folder,
                run["name"],
                run["task"],
                run["seed"],
                "",
                run.get("tag", ""),
                None,
                "not started",
                "planned by the sweep, no run folder yet",
            )
    for folder, rec in records.items():
        _apply_sweep_info(rec, planned.get(folder), status)
    _fill_models(list(records.values()))
    return sorted(records.values(), key=lambda r: (r.group, r.task or "", r.seed or 0, r.name))


def _fill_models(records: list[RunRecord]) -> None:
    """Planned runs have no model yet: give them the model of finished runs with the same tag (if one)."""
    by_tag: dict[str, set[str]] = {}
    for r in records:
        if r.model:
            by_tag.setdefault(r.tag, set()).add(r.model)
    for r in records:
        if not r.model and len(by_tag.get(r.tag, ())) == 1:
            r.model = next(iter(by_tag[r.tag]))
