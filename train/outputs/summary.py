"""The summary block a person reads at the end of a run (and when a finished run is started again).

Built from the run folder's files only (``eval_results.json``, ``run_info.json``, ``metrics.jsonl``), so it is the
same at the end of training, on a rerun of a finished run, and for any run folder after the fact:
``glue-train summary RUN_DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from train.data.metrics import metrics_text
from train.errors import DataError, guarded
from train.files import read_json, read_jsonl


def _read(path: Path) -> Any:
    """A run-folder JSON mapping, or None when it is missing (damage is an error naming the file)."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def _eval_lines(label: str, entry: dict | None) -> list[str]:
    if not entry or not entry.get("splits"):
        return [f"  {label:<12}(no evaluation)"]
    where = f"step {entry.get('step')}, epoch {float(entry.get('epoch') or 0):.2f}"
    splits = entry["splits"]
    if len(splits) == 1:
        (split,) = splits.values()
        return [f"  {label:<12}{metrics_text(split)}   ({where})"]
    lines = [f"  {label:<12}({where})"]
    lines += [f"    {name:<24}{metrics_text(split)}" for name, split in splits.items()]
    return lines


def _throughput(info: dict, rows: list[dict]) -> str:
    perf = info.get("throughput") or {}
    if not perf and rows:  # a run from before run_info held them: the mean of its log windows
        for key in ("perf/samples_per_s", "perf/tokens_per_s", "perf/mfu"):
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if values:
                perf[key.split("/")[1]] = sum(values) / len(values)
    parts = []
    if info.get("train_time_s") is not None:
        parts.append(f"train {info['train_time_s']:.1f} s")
    if perf.get("samples_per_s"):
        parts.append(f"{perf['samples_per_s']:,.1f} samples/s")
    if perf.get("tokens_per_s"):
        parts.append(f"{perf['tokens_per_s']:,.0f} tokens/s")
    if perf.get("mfu"):
        parts.append(f"MFU {100 * perf['mfu']:.1f}%")
    return " · ".join(parts) or "-"


def _wandb(info: dict) -> str | None:
    w = info.get("wandb") or {}
    if w.get("url"):
        return w["url"]
    if w.get("sync_dir"):
        return f"offline; upload with: wandb sync {w['sync_dir']}"
    return None


def lines(run_dir: str | Path) -> list[str]:
    """The summary of a finished run folder, one string per line."""
    out = Path(run_dir).resolve()
    res = _read(out / "eval_results.json") or {}
    info = _read(out / "run_info.json") or {}
    rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    model = Path(str(res.get("model", "?")).replace("builtin:", "")).name
    head = f"run finished: {res.get('task', '?')} · {model} · seed {res.get('seed', '?')}"
    text = [f"==== {head} ====", f"  {'folder':<12}{out}"]
    text += _eval_lines("best dev", res.get("best"))
    text += _eval_lines("final dev", res.get("final"))
    stopped = res.get("early_stopped")
    if stopped:
        text.append(
            f"  {'stopped':<12}early at step {stopped.get('at_step')} (no better {res.get('main_metric', 'score')} "
            f"in {stopped.get('patience')} evaluations); best/ is from step {stopped.get('best_step')}"
        )
    text.append(f"  {'speed':<12}{_throughput(info, [r for r in rows if 'train/loss' in r])}")
    outputs = [n + "/" for n in ("best", "final", "predictions") if (out / n).is_dir()]
    outputs += [n for n in ("metrics.jsonl", "curves.png") if (out / n).is_file()]
    text.append(f"  {'outputs':<12}{'  '.join(outputs)}")
    if (out / "predictions").is_dir():
        files = sorted(p.name for p in (out / "predictions").iterdir() if p.suffix == ".tsv")
        text.append(f"  {'predictions':<12}{', '.join(files)} (GLUE test server format, from best/)")
    wandb = _wandb(info)
    if wandb:
        text.append(f"  {'W&B':<12}{wandb}")
    return text


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="glue-train summary", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (with eval_results.json)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.run_dir / "eval_results.json").is_file():
        raise DataError(
            f"{args.run_dir} has no eval_results.json: give a finished run folder (glue-train summary RUN_DIR)"
        )
    print("\n".join(lines(args.run_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``glue-train summary``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
