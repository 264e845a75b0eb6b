"""Markdown tables of bench results: ``python bench/summarize.py bench/results/*.jsonl``.

Three kinds of line, one table each: throughput (bench/compare_trainer.py), end to end
(``compare_trainer.py --end-to-end``: rows with ``wall_s`` and ``cache``) and single runs (bench/run_summary.py:
rows with ``run``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    "device",
    "date",
    "model",
    "lengths",
    "precision",
    "path",
    "samples_per_s",
    "ms_per_step",
    "real_tokens_per_s",
    "mfu",
    "warmup_s",
    "ratio_to_trainer",
    "versions",
)
E2E_COLUMNS = (
    "device",
    "date",
    "task",
    "model",
    "precision",
    "steps",
    "path",
    "cache",
    "wall_s",
    "compile_s",
    "train_s",
    "samples_per_s",
    "score",
    "speedup_vs_trainer",
    "auto",
)
RUN_COLUMNS = (
    "run",
    "rc",
    "device",
    "precision",
    "deepspeed_stage",
    "fast_path",
    "compile_s",
    "steps",
    "first_loss",
    "last_loss",
    "skipped_steps",
    "max_allocated_gib",
    "dev",
    "wall_s",
)


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "versions" and isinstance(value, dict):
        return f"torch {value.get('torch')}, transformers {value.get('transformers')}"
    if key == "mfu" and value is not None:
        return f"{100 * value:.1f}%"
    if key == "ratio_to_trainer" and value is not None:
        return f"**{value:.2f}x**" if row.get("path") == "loop_fast" else f"{value:.2f}x"
    if key == "speedup_vs_trainer" and value is not None:
        return f"**{value:.2f}x**" if row.get("path") == "loop_fast" else f"{value:.2f}x"
    if key == "auto" and isinstance(value, dict):
        return "compile" if value.get("compile") else "eager"
    if key == "fast_path" and isinstance(value, str):
        return value.split(":")[0]  # "fast path on (...)" / "fast path off"
    if key == "dev" and isinstance(value, dict):
        return ", ".join(f"{s} {m.get('score', float('nan')):.3f}" for s, m in value.items())
    if isinstance(value, float):
        return f"{value:.4g}" if key in ("first_loss", "last_loss", "score") else str(value)
    return "–" if value is None else str(value)


def kind(row: dict) -> str:
    if "run" in row:
        return "run"
    return "e2e" if "wall_s" in row and "cache" in row else "throughput"


def markdown(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def table(files: list[str]) -> str:
    lines = [line for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in dict.fromkeys(lines)]  # a line repeated (a file appended twice) once
    parts = []
    for name, columns, title in (
        ("throughput", COLUMNS, None),
        ("e2e", E2E_COLUMNS, "End to end: process start to dev results"),
        ("run", RUN_COLUMNS, "Single runs"),
    ):
        chosen = [r for r in rows if kind(r) == name]
        if chosen or name == "throughput":
            parts.append((f"{title}\n\n" if title else "") + markdown(chosen, columns))
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
