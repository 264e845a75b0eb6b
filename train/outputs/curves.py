"""``curves.png`` of one run: what a person looks at first after a run.

Drawn from ``metrics.jsonl`` (and ``config.yaml`` / ``eval_results.json`` for the task) at the end of every run,
and by ``glue-train report RUN_DIR`` for a single run folder (also mid-run: it reads what is there).

Panels, in this order (one figure, 2 columns up to 4 panels, else 3):

1. ``train/loss`` per logged step;
2. ``train/lr`` per logged step;
3. the dev loss per evaluation;
4. one panel per GLUE metric of the task (``accuracy``, ``f1``, ``matthews_corr``, ``pearson``, ``spearman``), per
   evaluation; and for tasks with two metrics (MRPC, QQP, STS-B) one more for ``score``, their mean.

So ``2 + 1 + len(task.metrics) + (1 if len(task.metrics) > 1 else 0)`` panels: 4 for CoLA, SST-2, MNLI, QNLI,
RTE, WNLI; 6 for MRPC, QQP, STS-B (``panel_keys`` computes it). MNLI draws both dev splits on the same panels
(matched and mismatched, labelled), so the two can be compared at a glance. The best evaluation
(``eval_results.json``'s ``best.step``) is marked on the dev panels.

matplotlib is a dependency (plots are part of the product); in an environment where it is missing all the same, the
run logs one line saying how to get it instead of failing at its end. The figure is drawn with
``matplotlib.figure.Figure`` (the Agg canvas; no pyplot, no display, no global state).
"""

from __future__ import annotations

import importlib.util
import io
import logging
from pathlib import Path

from train.errors import InputError, ReportError, UserError
from train.files import read_json, read_jsonl, read_mapping, write_atomic
from train.outputs.card import dev_metric_names
from train.tasks import Task, get_task

log = logging.getLogger(__name__)

FILE = "curves.png"
INSTALL_HINT = "pip install matplotlib: a dependency of glue-train, missing from this environment"


def panel_keys(task: Task) -> list[str]:
    """The metrics.jsonl key of each panel (without split suffix), in drawing order."""
    return ["train/loss", "train/lr", *(f"eval/{m}" for m in dev_metric_names(task))]


def is_run_folder(path: str | Path) -> bool:
    """A single run's folder: it has config.yaml or metrics.jsonl, and no run folders below it."""
    path = Path(path)
    if not path.is_dir() or not ((path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()):
        return False
    return not any(
        child.is_dir() and ((child / "metrics.jsonl").is_file() or (child / "eval_results.json").is_file())
        for child in path.iterdir()
    )


def _json(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, InputError):  # missing or damaged: the other file may name the task
        return {}


def run_identity(run_dir: Path) -> tuple[Task, str]:
    """The run's task and its name ``<task>-<model>-s<seed>`` (as W&B names it), from eval_results.json when
    finished, else config.yaml."""

    from train.config import model_short_name

    try:
        cfg = read_mapping(run_dir / "config.yaml")
    except (OSError, InputError):
        cfg = {}
    results = _json(run_dir / "eval_results.json")
    name = results.get("task") or (cfg.get("data") or {}).get("task")
    if not name:
        raise ValueError(f"{run_dir}: no eval_results.json or config.yaml that names the task")
    model = results.get("model") or (cfg.get("model") or {}).get("name_or_path") or "?"
    seed = results.get("seed", cfg.get("seed", "?"))
    return get_task(name), f"{name}-{model_short_name(str(model))}-s{seed}"


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return read_jsonl(path)


def draw(title: str, task: Task, rows: list[dict], best_step: int | None):
    """The figure (a ``matplotlib.figure.Figure``), one panel per ``panel_keys(task)``."""
    from matplotlib.figure import Figure

    keys = panel_keys(task)
    ncols = 2 if len(keys) <= 4 else 3
    nrows = -(-len(keys) // ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows), dpi=100)
    # fixed margins: a constrained layout would cost more than the rest of the drawing together
    fig.subplots_adjust(
        left=0.1, right=0.97, bottom=0.13 / nrows, top=1 - 0.2 / nrows, wspace=0.3, hspace=0.5
    )
    splits = task.split("dev")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(True, color="0.9")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        drawn = False
        for split in splits if key.startswith("eval/") else splits[:1]:
            suffix = split.suffix if key.startswith("eval/") else ""
            points = [(r["step"], r[key + suffix]) for r in rows if r.get(key + suffix) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            label = split.name.removeprefix("validation_") if len(splits) > 1 else None  # matched, mismatched
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, markersize=3, label=label)
            drawn = True
        if key.startswith("eval/") and best_step is not None and drawn:
            ax.axvline(best_step, color="0.6", linestyle=":", linewidth=1)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
        elif key.startswith("eval/") and len(splits) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def render(run_dir: Path) -> bytes:
    """``curves.png``'s bytes (matplotlib must be installed)."""
    task, name = run_identity(run_dir)
    best_step = (_json(run_dir / "eval_results.json").get("best") or {}).get("step")
    fig = draw(name, task, read_rows(run_dir), best_step)
    buf = io.BytesIO()
    keys = ", ".join(panel_keys(task))
    fig.savefig(buf, format="png", metadata={"Title": f"{name} curves", "Description": keys})
    return buf.getvalue()


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw ``run_dir/curves.png`` (or ``out``); None (and one log line) when matplotlib is not installed."""
    run_dir = Path(run_dir)
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("%s not drawn: matplotlib is not installed (%s)", FILE, INSTALL_HINT)
        return None
    path = write_atomic(Path(out) if out else run_dir / FILE, render(run_dir))
    log.info("curves: %s", path)
    return path


def report_single(run_dir: str | Path, out_dir: str | Path | None = None) -> int:
    """``glue-train report RUN_DIR`` on one run folder: draw its curves, print the path. Exit code.

    Into the run folder itself (a run's own file there, refused while a run holds the folder) or ``out_dir``;
    a ``curves.png`` there that this program did not write, or that was edited since, is never replaced
    (train/folders/owned.py)."""
    from train.folders import owned
    from train.folders.runfolder import is_own_folder

    run_dir = Path(run_dir)
    folder = Path(out_dir) if out_dir else run_dir
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError(f"drawing {FILE} needs matplotlib: {INSTALL_HINT}")
    in_run = out_dir is None and is_own_folder(run_dir)  # the run's own curves.png, drawn again
    with owned.writing(
        folder,
        "report",
        [FILE],
        hint="Move it out of the way, or draw the curves into another folder with --out DIR",
        what=f"{folder} (where {FILE} is drawn)",
        also_ours=(lambda name: name == FILE) if in_run else None,
    ) as files:
        try:
            files.write(FILE, render(run_dir))
        except ValueError as e:  # the run's identity (run_identity); a damaged file is an InputError already
            if isinstance(e, UserError):
                raise
            raise ReportError(str(e)) from None
    print(folder / FILE)
    return 0
