"""Markdown table of bench/compare_trainer.py results: ``python bench/summarize.py bench/results/*.jsonl``."""

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


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if key == "versions" and isinstance(value, dict):
        return f"torch {value.get('torch')}, transformers {value.get('transformers')}"
    if key == "mfu" and value is not None:
        return f"{100 * value:.1f}%"
    if key == "ratio_to_trainer" and value is not None:
        return f"**{value:.2f}x**" if row.get("path") == "loop_fast" else f"{value:.2f}x"
    return "–" if value is None else str(value)


def table(files: list[str]) -> str:
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
