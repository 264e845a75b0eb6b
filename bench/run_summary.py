"""Run one ``python -m train`` command and append one JSON line about it (bench/gpu_check.sh's short runs).

    python bench/run_summary.py NAME RUN_DIR --out runs.jsonl -- python -m train output_dir=RUN_DIR ...

The command's output passes through; this exits with its exit code. Fields: the run's name, exit code and
wall seconds; from run_info.json its precision, device, fast path,
compile_s and DeepSpeed stage/optimizer/config; from metrics.jsonl the first and last train loss, the most
``train/skipped_steps`` (fp16: optimizer steps the loss scaler skipped), peak memory, mean samples/s; from
eval_results.json the final dev metrics. Missing files give nulls (a failed run still gets its line).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def train_rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in row:
            rows.append(row)
    return rows


def summary(name: str, run_dir: Path, wall_s: float, rc: int) -> dict:
    info, results = read_json(run_dir / "run_info.json"), read_json(run_dir / "eval_results.json")
    rows = train_rows(run_dir / "metrics.jsonl")
    ds = info.get("deepspeed") or {}
    rates = [r["perf/samples_per_s"] for r in rows if r.get("perf/samples_per_s")]
    memory = [r["memory/max_allocated_gib"] for r in rows if r.get("memory/max_allocated_gib") is not None]
    return {
        "run": name,
        "rc": rc,
        "wall_s": round(wall_s, 2),
        "precision": info.get("precision"),
        "device": info.get("device"),
        "fast_path": info.get("fast_path"),
        "compile_s": info.get("compile_s"),
        "deepspeed_stage": ds.get("zero_stage"),
        "deepspeed_optimizer": ds.get("optimizer"),
        "deepspeed_config": ds.get("config"),
        "steps": rows[-1]["step"] if rows else None,
        "first_loss": rows[0]["train/loss"] if rows else None,
        "last_loss": rows[-1]["train/loss"] if rows else None,
        "skipped_steps": max((r.get("train/skipped_steps", 0) for r in rows), default=None),
        "samples_per_s": round(sum(rates) / len(rates), 2) if rates else None,
        "max_allocated_gib": max(memory) if memory else None,
        "dev": (results.get("final") or {}).get("splits"),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, help="append the JSON line to this file")
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        p.error("no command: NAME RUN_DIR --out FILE -- CMD ...")
    cut = argv.index("--")
    a, cmd = p.parse_args(argv[:cut]), argv[cut + 1 :]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    line = json.dumps(summary(a.name, a.run_dir, time.perf_counter() - t0, rc))
    with open(a.out, "a") as fh:
        fh.write(line + "\n")
    print(line)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
