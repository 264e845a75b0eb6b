"""``bench/compare_trainer.py --end-to-end --task-dir DIR``: seconds from process start to the dev results.

The throughput benchmark leaves out what a short GLUE run pays before its first step: imports, loading the
data and the model, and (fast path) compiling every bucket shape. Here each path runs a whole training run in
a fresh process, and the wall time from starting it to its exit (after the dev evaluation) is the number:

- ``trainer``: ``transformers.Trainer`` with run_glue.py's settings (as in the throughput benchmark): train
  ``--epochs`` on the task's train rows, then ``Trainer.predict`` on its dev split, scored with the GLUE metrics;
- ``loop_eager``: ``python -m train`` with ``fast.enabled=false``;
- ``loop_fast``: ``python -m train`` with ``fast.enabled=true`` (compile + CUDA graphs on one GPU).

Each path in ``--warm-paths`` (default: all) runs twice, the others once: ``cold`` with an empty compile cache
folder (``fast.cache_dir``), then ``warm`` with the folder the cold run filled, which is what the next run of a
sweep sees (the Trainer and the eager loop compile nothing: their two runs differ only by chance).
``--cache-dir DIR`` gives ``loop_fast`` a folder filled before (e.g. by another task's run of the same model
shape): it is not emptied, and a run is labelled ``warm`` when the folder held a compile record. The tokenized data
is written once before any timing (as ``glue-train prepare`` does before a sweep), so every run reads
the same cached rows. All runs train the same randomly initialised model (``--model``), at the same batch,
learning rate (2e-5), precision and max length, and evaluate once, at the end (``eval.every_epoch=false``).

One JSON line per run on stdout: ``wall_s`` (process start to exit), ``train_s`` and ``samples_per_s`` (the
training loop alone), ``compile_s`` and ``compile_cache`` (from run_info.json; 0 and null off the fast path),
``dev`` (every metric of every dev split) and ``score`` (the first dev split's GLUE score),
``speedup_vs_trainer`` (the Trainer's wall_s in the same cache state, else its cold one / this run's), and,
for ``loop_fast``,
``auto``: what ``fast.enabled=auto`` would have chosen for this run from the cache state it started with
(train/engine/fastpath.py ``auto_pays_off``) and whether the fast path in fact finished before the eager one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import (  # bench/common.py: presets, device names, versions, the Trainer's rows
    PATHS,
    REPO,
    device_name,
    make_model_dir,
    task_of_folder,
    trainer_dataset,
    versions,
)


def data_overrides(
    a: argparse.Namespace, task: str, glue_dir: Path, model_dir: Path, root: Path
) -> list[str]:
    return [
        f"data.task={task}",
        f"data.glue_dir={glue_dir}",
        f"model.name_or_path={model_dir}",
        f"data.max_length={a.max_length}",
        f"data.cache_dir={root / 'data-cache'}",
        *([f"data.max_train_samples={a.max_train_samples}"] if a.max_train_samples else []),
    ]


def child_env() -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # the run's fast.cache_dir decides both
        env.pop(name, None)
    return env


def launch(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` in a fresh process; its wall seconds (start to exit). Fails loudly with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"end-to-end: {' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return wall


def loop_result(out: Path, primary: str) -> dict:
    """What a ``python -m train`` run left: dev results, compile facts, the training loop's rate."""
    from train.tracking.tracker import read_metrics

    results = json.loads((out / "eval_results.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "perf/samples_per_s" in r]
    samples = seconds = 0.0
    prev = 0
    for r in rows:  # each train row covers the steps since the previous one
        n = (r["step"] - prev) * info["effective_batch_size"]
        samples, seconds, prev = samples + n, seconds + n / r["perf/samples_per_s"], r["step"]
    splits = results["final"]["splits"]
    return {
        "steps": info["total_steps"],
        "train_rows": info["train_rows"],
        "train_s": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2) if seconds else None,
        "compile_s": info.get("compile_s"),
        "compile_cache": info.get("compile_cache"),
        "fast_path": info.get("fast_path"),
        "dev": splits,
        "score": splits[primary]["score"],
    }


def paths_of(a: argparse.Namespace) -> tuple[list[str], set[str]]:
    paths = [p for p in a.paths.split(",") if p]
    warm_paths = {p for p in a.warm_paths.split(",") if p}
    for p in (*paths, *warm_paths):
        if p not in PATHS:
            raise SystemExit(f"--paths/--warm-paths: unknown path {p!r} (choose from {', '.join(PATHS)})")
    return paths, warm_paths


def setup(a: argparse.Namespace, root: Path) -> tuple[dict, dict]:
    """The model folder and the tokenized rows (untimed, as ``glue-train prepare`` before a sweep), and
    what every run shares: ``ctx`` (to launch it) and ``common`` (the fields of every JSON line)."""
    from train.config import load_config
    from train.data import tokenized
    from train.model.load import load_tokenizer
    from train.tasks import get_task

    if not a.task_dir:
        raise SystemExit("--end-to-end needs --task-dir (a GLUE task folder, e.g. ../shared/glue/RTE)")
    folder = Path(a.task_dir).resolve()
    task_name = task_of_folder(folder)
    task = get_task(task_name)
    model_dir = make_model_dir(a.model, root, task.num_labels or 1, a.seed)
    base = data_overrides(a, task_name, folder.parent, model_dir, root)
    cfg = load_config(None, base)
    tokenizer = load_tokenizer(cfg)
    for split in (*task.split("train"), *task.split("dev")):
        tokenized.tokenize_split(cfg.data, task, split, tokenizer)
    cuda = torch.cuda.is_available()
    precision = a.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    ctx = {
        "base": base,
        "model_dir": model_dir,
        "task": task_name,
        "precision": precision,
        "primary": task.split("dev")[0].name,
    }
    common = {
        "task": task_name,
        "task_dir": str(folder),
        "model": a.model,
        "device": device_name(torch.device("cuda" if cuda else "cpu")),
        "precision": precision,
        "batch": a.batch,
        "max_length": a.max_length,
        "epochs": a.epochs,
        "max_steps": a.max_steps,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "versions": versions(),
    }
    return ctx, common


def run(a: argparse.Namespace, stdout) -> int:
    paths, warm_paths = paths_of(a)
    root = Path(a.workdir).resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    ctx, common = setup(a, root)
    walls: dict[tuple[str, str], float] = {}
    for path in paths:
        compile_dir = root / f"compile-{path}"
        if a.cache_dir and path == "loop_fast":  # a cache given: used as it is (warm if it holds our shapes)
            compile_dir = Path(a.cache_dir).resolve()
        else:
            shutil.rmtree(compile_dir, ignore_errors=True)  # cold: an empty compile cache folder
        for run_no in range(2 if path in warm_paths else 1):
            before = _records(compile_dir)  # what the cache held before this run (for the auto verdict)
            out = root / "runs" / f"{path}-{run_no}"
            wall, res = run_path(a, path, out, compile_dir, ctx)
            # the fast path says itself whether its cache was warm; the others compile nothing: cold, then warm
            warm = (res["compile_cache"] or {}).get("warm_before") if path == "loop_fast" else run_no == 1
            state = "warm" if warm else "cold"
            walls[(path, state)] = wall
            ref, eager = (walls.get((p, state), walls.get((p, "cold"))) for p in ("trainer", "loop_eager"))
            row = {
                "path": path,
                "cache": state,
                **common,
                "wall_s": round(wall, 2),
                **res,
                "speedup_vs_trainer": round(ref / wall, 3) if ref else None,
            }
            if path == "loop_fast":
                row["auto"] = auto_verdict(row, before, state, eager)
            print(f"end-to-end: {path} {state}: {wall:.1f} s to the dev results", file=sys.stderr)
            emit(row, stdout, a.out)
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def run_path(a: argparse.Namespace, path: str, out: Path, compile_dir: Path, ctx: dict) -> tuple[float, dict]:
    """One run of ``path`` in a fresh process: its wall seconds and what it reported."""
    shutil.rmtree(out, ignore_errors=True)
    log = out.parent.parent / "logs" / f"{out.name}.log"
    if path == "trainer":
        spec = {
            "overrides": ctx["base"],
            "model_dir": str(ctx["model_dir"]),
            "task": ctx["task"],
            "out": str(out),
            "batch": a.batch,
            "epochs": a.epochs,
            "max_steps": a.max_steps,
            "precision": ctx["precision"],
            "seed": a.seed,
            "padding": a.trainer_padding,
            "max_length": a.max_length,
        }
        cmd = [
            sys.executable,
            str(REPO / "bench" / "compare_trainer.py"),
            "--child-trainer",
            json.dumps(spec),
        ]
        wall = launch(cmd, log)
        return wall, json.loads((out / "result.json").read_text())
    overrides = loop_overrides(a, path, out, compile_dir, ctx["precision"])
    wall = launch([sys.executable, "-m", "train", *ctx["base"], *overrides], log)
    return wall, loop_result(out, ctx["primary"])


def emit(row: dict, stdout, out: str | None) -> None:
    line = json.dumps(row)
    print(line, file=stdout, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(line + "\n")


def _max_steps(a: argparse.Namespace) -> list[str]:
    return [f"train.max_steps={a.max_steps}"] if a.max_steps else []


def loop_overrides(
    a: argparse.Namespace, path: str, out: Path, compile_dir: Path, precision: str
) -> list[str]:
    return [
        f"output_dir={out}",
        f"train.effective_batch_size={a.batch}",
        f"train.epochs={a.epochs}",
        *_max_steps(a),
        "train.lr=2e-5",
        "eval.every_epoch=false",
        "eval.predict_test=false",
        f"precision={precision}",
        f"seed={a.seed}",
        "checkpoint.resume=never",
        f"fast.enabled={'true' if path == 'loop_fast' else 'false'}",
        f"fast.backend={a.fast_backend}",
        f"fast.cache_dir={compile_dir}",
        *(a.fast if path == "loop_fast" else []),
    ]


def _records(compile_dir: Path) -> dict[str, dict]:
    """The compile records the folder holds, by compile key (train/engine/compile_cache.py)."""
    folder = compile_dir / "glue-train"
    return {f.stem: json.loads(f.read_text()) for f in folder.glob("*.json")} if folder.exists() else {}


def auto_verdict(row: dict, before: dict[str, dict], state: str, eager_wall: float | None) -> dict:
    """What ``fast.enabled=auto`` would have decided for this run, and whether compiling did finish first."""
    from train.engine.compile_cache import CacheState
    from train.engine.fastpath import auto_pays_off

    cc = row.get("compile_cache") or {}
    record = before.get(cc.get("key"), {})
    cache = CacheState(state == "warm", record.get("cold_s"), record.get("warm_s"))
    shapes = _records(Path(cc["dir"])).get(cc.get("key"), {}).get("shapes", 0) if cc.get("dir") else 0
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    compile_it, reason = auto_pays_off(device_type, row["steps"], shapes, cache)
    return {
        "compile": compile_it,
        "reason": reason,
        "cache_before": state,
        "fast_finished_first": None if eager_wall is None else row["wall_s"] < eager_wall,
    }


# ----------------------------------------------------------------------------------------------------------
# the Trainer's run (a child process of its own: its wall time starts at its interpreter's start)


def child_trainer(a: argparse.Namespace) -> int:
    import logging

    import transformers
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from train.config import load_config
    from train.data import tokenized
    from train.data.metrics import compute_metrics
    from train.model.load import load_tokenizer
    from train.tasks import get_task

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    spec = json.loads(a.child_trainer)
    cfg = load_config(None, spec["overrides"])
    task = get_task(spec["task"])
    tokenizer = load_tokenizer(cfg)
    train_ds = tokenized.tokenize_split(cfg.data, task, task.split("train")[0], tokenizer)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    dev_split = task.split("dev")[0]
    dev_ds = tokenized.tokenize_split(cfg.data, task, dev_split, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"])
    train_rows, collator = trainer_dataset(train_ds, tokenizer, model, spec["padding"], spec["max_length"])
    dev_rows, _ = trainer_dataset(dev_ds, tokenizer, model, spec["padding"], spec["max_length"])
    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["batch"],
        learning_rate=2e-5,
        num_train_epochs=spec["epochs"],
        max_steps=spec["max_steps"] or -1,
        bf16=spec["precision"] == "bf16",
        fp16=spec["precision"] == "fp16",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=spec["seed"],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    pred = trainer.predict(dev_rows)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    preds = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    metrics = compute_metrics(task, preds, pred.label_ids)
    result = {
        "steps": out.global_step,
        "train_rows": len(train_rows),
        "train_s": round(train_s, 3),
        "samples_per_s": round(out.metrics["train_samples_per_second"], 2),
        "compile_s": 0.0,
        "compile_cache": None,
        "fast_path": "transformers.Trainer (no torch.compile)",
        "dev": {dev_split.name: metrics},
        "score": metrics["score"],
    }
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result, indent=1))
    return 0
