"""HF Trainer (run_glue.py settings) vs this project's loop (eager and fast path): same process, device, data.

    python bench/compare_trainer.py                                  # random bert-base shape, MNLI-like lengths
    python bench/compare_trainer.py --lengths fixed128 --out bench/results/x.jsonl
    python bench/compare_trainer.py --model tiny --steps 5 --warmup 2 --fast-backend aot_eager   # CPU smoke
    python bench/compare_trainer.py --end-to-end --task-dir ../shared/glue/RTE   # process start -> dev results

Prints one JSON line per path (``trainer``, ``loop_eager``, ``loop_fast``) on stdout; logs go to stderr.

What is timed: optimizer steps ``warmup+1 .. warmup+steps`` of each path, between two device synchronisations
(the rate excludes warm-up and compilation; ``warmup_s`` reports them: for the fast path that is the up-front
compilation of every bucket shape plus the first ``warmup`` steps). Every path trains the same randomly
initialised model (saved once, loaded by each) on the same tokenized rows, at the same effective batch.

Data (``--lengths``): ``fixed128`` = every row 128 tokens (sentences longer than ``max_length``, truncated);
``mnli`` = lengths drawn from a log-normal with mean ~39 tokens, clipped to [6, 128] (MNLI-like; the real MNLI
train file is not bundled); or a GLUE task folder (e.g. ``../shared/glue/RTE``): its real train rows. Synthetic
sentences are made of whole-word tokens of the tokenizer, so a sentence of k words is k+2 tokens.

The Trainer runs with ``run_glue.py``'s settings: ``TrainingArguments`` defaults (fused AdamW, linear schedule,
``max_grad_norm=1``, ``logging_steps=500``, no eval or saving during the timed steps), ``learning_rate=2e-5``,
bf16 on GPUs that have it, ``per_device_train_batch_size`` = the batch; padding: ``--trainer-padding dynamic``
(``run_glue.py --pad_to_max_length False``: ``DataCollatorWithPadding``, the default here) or ``max_length``
(run_glue's default ``--pad_to_max_length True``: every row padded to 128). For ``fixed128`` both are the same.

Metrics: ``samples_per_s``; ``ms_per_step``; ``real_tokens_per_s`` = samples/s x the mean real (unpadded)
length of the training rows; ``mfu`` = model FLOPs/s / the device's dense bf16 peak, with model FLOPs per sample
= 6 * N * len + 12 * layers * hidden * len^2 (N = non-embedding parameters; fwd+bwd = 3x fwd; attention
scores and weighted sum counted; averaged over the rows' real lengths, so padding is not counted as useful
work). Peaks (dense bf16, no sparsity): H100 SXM / H200 989.4 TFLOP/s, H100 PCIe 756, A100 312; ``null`` on
CPU and unknown devices.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import end_to_end  # bench/end_to_end.py (this script's folder is on sys.path)
import numpy as np
import torch
from common import (  # bench/common.py (importing it puts the repository on sys.path, for train.*)
    PATHS,
    PRESETS,
    TINY,
    device_name,
    make_model_dir,
    task_of_folder,
    trainer_dataset,
    versions,
)

from train.tracking.throughput import peak_flops

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="bert-base",
        help=f"a preset ({', '.join(PRESETS)}: random init, no download) or a local model folder",
    )
    p.add_argument("--lengths", default="mnli", help="fixed128 | mnli | a GLUE task folder (real train rows)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--batch", type=int, default=16, help="effective batch (one process: per-device batch)")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps per path")
    p.add_argument("--warmup", type=int, default=30, help="untimed optimizer steps before timing")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--trainer-padding", default="dynamic", choices=["dynamic", "max_length"])
    p.add_argument("--fast-backend", default="inductor", help="torch.compile backend of the fast path")
    p.add_argument(
        "--fast",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for the fast path, e.g. --fast fast.bucket_multiple=16",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after timing, profile 20 more steps of each loop path with torch.profiler: a table of the "
        "top ops on stderr and in DIR/<path>.txt, and a Chrome trace DIR/<path>.json (where the step's time goes)",
    )
    p.add_argument(
        "--cache-dir",
        help="the fast path's compile cache (fast.cache_dir; default: a fresh folder in the work dir, i.e. cold)",
    )
    e2e = p.add_argument_group(
        "end to end (bench/end_to_end.py): wall seconds from process start to the dev results of a full run"
    )
    e2e.add_argument(
        "--end-to-end",
        action="store_true",
        help="per path, a fresh process per run (cold compile cache, then warm), timed to its dev results",
    )
    e2e.add_argument("--task-dir", help="the GLUE task folder to train on (e.g. ../shared/glue/RTE)")
    e2e.add_argument("--epochs", type=int, default=5, help="training epochs (the program's default: 5)")
    e2e.add_argument("--max-train-samples", type=int, help="train on the first N rows only")
    e2e.add_argument("--max-steps", type=int, help="stop after N optimizer steps (caps --epochs)")
    e2e.add_argument(
        "--warm-paths",
        default=",".join(PATHS),
        help="the paths that also get a warm run (a second run with the same compile cache)",
    )
    e2e.add_argument("--child-trainer", help=argparse.SUPPRESS)  # internal: one Trainer run (a JSON spec)
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument(
        "--workdir", help="keep the model, data and run folders here (default: a temp dir, removed)"
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# model and data (built once, used by every path)


def whole_words() -> list[str]:
    words = [w.strip() for w in (TINY / "vocab.txt").read_text().splitlines()]
    return [w for w in words if w.isalpha() and w.islower() and len(w) > 1]


def write_synthetic(kind: str, root: Path, rows: int, max_length: int, seed: int) -> Path:
    """SST-2-format files whose rows tokenize to the wanted lengths (k words -> k + 2 tokens)."""
    rng = np.random.default_rng(seed)
    words = np.array(whole_words())
    if kind == "fixed128":
        lengths = np.full(rows, max_length + 8)  # longer than max_length: truncated to exactly max_length
    elif kind == "mnli":
        sigma = 0.45
        lengths = np.clip(np.round(rng.lognormal(math.log(39) - sigma**2 / 2, sigma, rows)), 6, max_length)
    else:
        raise SystemExit(f"--lengths: unknown kind {kind!r}")
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words, size=max(1, int(n) - 2)))

    lines = ["sentence\tlabel"] + [f"{sentence(n)}\t{int(rng.integers(2))}" for n in lengths]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    dev = ["sentence\tlabel"] + [f"{sentence(n)}\t{int(rng.integers(2))}" for n in lengths[:64]]
    (folder / "dev.tsv").write_text("\n".join(dev) + "\n")
    (folder / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{sentence(9)}\n" for i in range(8)))
    return root / "glue"


# ----------------------------------------------------------------------------------------------------------
# measurement helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_sample(model: torch.nn.Module, lengths: np.ndarray) -> float:
    """The same model-FLOPs formula as the training metrics (train/tracking/throughput.py): 6 x matmul params x tokens."""
    from train.tracking.throughput import count_matmul_params

    return 6.0 * count_matmul_params(model) * float(lengths.mean())


def reset_accelerate() -> None:
    """The Trainer and the loop each build an Accelerator; its state is a process-wide singleton."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# the paths


def run_trainer(a: argparse.Namespace, model_dir: Path, train_ds, root: Path, precision: str) -> dict:
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the files the loop loads too
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    ds, collator = trainer_dataset(train_ds, tokenizer, model, a.trainer_padding, a.max_length)
    total = a.warmup + a.steps
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ARG002
            marks[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
            if state.global_step in (a.warmup, total):
                sync(args.device)
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(root / "trainer"),
        per_device_train_batch_size=a.batch,
        learning_rate=2e-5,
        max_steps=total,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=a.seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()])
    trainer.train()
    device = args.device
    out = {
        "warmup_s": marks[a.warmup] - marks[0],
        "timed_s": marks[total] - marks[a.warmup],
        "device": device,
        "model": model,
    }
    del trainer
    return out


def run_loop(
    a: argparse.Namespace, model_dir: Path, glue_dir: Path, task: str, root: Path, fast: bool
) -> dict:
    from train.config import load_config
    from train.engine import loop

    name = "loop_fast" if fast else "loop_eager"
    overrides = [
        f"data.task={task}",
        f"data.glue_dir={glue_dir}",
        f"model.name_or_path={model_dir}",
        f"data.max_length={a.max_length}",
        f"data.cache_dir={root / 'cache'}",
        f"output_dir={root / name}",
        f"train.effective_batch_size={a.batch}",
        "train.epochs=1",
        f"train.max_steps={a.warmup + a.steps}",
        "train.lr=2e-5",
        "eval.every_epoch=false",
        "eval.predict_test=false",
        f"precision={a.precision}",
        f"seed={a.seed}",
        "checkpoint.resume=never",
        f"fast.enabled={'true' if fast else 'false'}",
        f"fast.backend={a.fast_backend}",
        *([f"fast.cache_dir={a.cache_dir}"] if a.cache_dir else []),
        *(a.fast if fast else []),
    ]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    run = loop.setup(cfg)
    compile_s = run.built.fast.warmup_s
    if (
        getattr(run, "bar", "absent") is None
    ):  # train() opens a progress bar; we call train_one_epoch directly
        from tqdm.auto import tqdm

        run.bar = tqdm(disable=True)
    device = run.acc.device
    total = run.built.total_steps
    run.built.total_steps = a.warmup
    t1 = time.perf_counter()
    loop.train_one_epoch(run)
    sync(device)
    t2 = time.perf_counter()
    run.built.total_steps = total
    loop.train_one_epoch(run)
    sync(device)
    t3 = time.perf_counter()
    if run.state.global_step != total:
        raise RuntimeError(f"{name}: ran {run.state.global_step} steps, wanted {total} (too few rows?)")
    if a.profile:
        profile(run, name, Path(a.profile))
    out = {
        "warmup_s": compile_s + (t2 - t1),
        "timed_s": t3 - t2,
        "device": device,
        "model": run.acc.unwrap_model(run.built.model),
        "setup_s": t1 - t0 - compile_s,
        **run.built.fast.run_info(),  # fast_path, compile_s, compile_cache
        **run.built.fast.metrics(),
    }
    run.acc.end_training()
    del run
    return out


def profile(run, name: str, folder: Path, steps: int = 20) -> None:
    """torch.profiler over ``steps`` more optimizer steps (the run must have rows left for them)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from train.engine import loop

    if (run.state.step_in_epoch + steps) > run.built.data.sampler.steps_per_epoch():
        log.warning("profile: not enough rows left for %d more steps of %s; skipped", steps, name)
        return
    folder.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    run.built.total_steps = run.state.global_step + steps
    with torch_profile(activities=acts) as prof:
        loop.train_one_epoch(run)
        sync(run.acc.device)
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = f"--- profile of {steps} steps: {name} ---\n" + prof.key_averages().table(
        sort_by=key, row_limit=30
    )
    print(table, file=sys.stderr)
    (folder / f"{name}.txt").write_text(table + "\n")
    prof.export_chrome_trace(str(folder / f"{name}.json"))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stdout, sys.stdout = sys.stdout, sys.stderr  # only the JSON lines go to stdout (the Trainer prints too)
    try:
        if a.child_trainer or a.end_to_end:
            return end_to_end.child_trainer(a) if a.child_trainer else end_to_end.run(a, stdout)
        return measure(a, stdout)
    finally:
        sys.stdout = stdout


def measure(a: argparse.Namespace, stdout) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("train.engine.fastpath").setLevel(logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    from train.config import load_config
    from train.data import batches, tokenized
    from train.model.load import load_tokenizer
    from train.tasks import get_task

    paths = [p for p in a.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            raise SystemExit(f"--paths: unknown path {p!r} (choose from {', '.join(PATHS)})")
    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = (a.warmup + a.steps + (20 if a.profile else 0)) * a.batch
    if a.lengths in ("fixed128", "mnli"):
        glue_dir, task_name = write_synthetic(a.lengths, root, rows, a.max_length, a.seed), "sst2"
    else:
        folder = Path(a.lengths).resolve()
        glue_dir, task_name = folder.parent, task_of_folder(folder)
    task = get_task(task_name)
    model_dir = make_model_dir(a.model, root, task.num_labels or 1, a.seed)

    # tokenize once (the project's cache); both the Trainer and the loop read these rows
    cfg = load_config(
        None,
        [
            f"data.task={task_name}",
            f"data.glue_dir={glue_dir}",
            f"model.name_or_path={model_dir}",
            f"data.max_length={a.max_length}",
            f"data.cache_dir={root / 'cache'}",
        ],
    )
    train_ds = tokenized.tokenize_split(cfg.data, task, task.split("train")[0], load_tokenizer(cfg))
    if len(train_ds) < rows:
        raise SystemExit(f"{a.lengths}: {len(train_ds)} training rows, the run needs {rows}; lower --steps")
    lengths = batches.row_lengths(train_ds)
    cuda = torch.cuda.is_available()
    precision = a.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"

    common = {
        "model": a.model,
        "lengths": a.lengths,
        "batch": a.batch,
        "steps": a.steps,
        "warmup_steps": a.warmup,
        "precision": precision,
        "mean_real_length": round(float(lengths.mean()), 2),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "versions": versions(),
    }
    trainer_rate = None
    for path in paths:
        reset_accelerate()
        free()
        if path == "trainer":
            res = run_trainer(a, model_dir, train_ds, root, precision)
        else:
            res = run_loop(a, model_dir, glue_dir, task_name, root, fast=path == "loop_fast")
        device, model = res.pop("device"), res.pop("model")
        name = device_name(torch.device(device))
        rate = a.steps * a.batch / res["timed_s"]
        flops = flops_per_sample(model, lengths)
        peak = peak_flops(name, precision) if torch.device(device).type == "cuda" else None
        row = {
            "path": path,
            **common,
            "device": name,
            "samples_per_s": round(rate, 2),
            "ms_per_step": round(1e3 * res["timed_s"] / a.steps, 3),
            "real_tokens_per_s": round(rate * float(lengths.mean()), 1),
            "mfu": round(flops * rate / peak, 4) if peak else None,
            "peak_flops": peak,
            "model_flops_per_sample": round(flops),
            "warmup_s": round(res.pop("warmup_s"), 2),
            "timed_s": round(res.pop("timed_s"), 3),
            **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()},
        }
        if path == "trainer":
            trainer_rate = rate
        row["ratio_to_trainer"] = round(rate / trainer_rate, 3) if trainer_rate else None
        line = json.dumps(row)
        print(line, file=stdout, flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as fh:
                fh.write(line + "\n")
        del model
        if path == "loop_fast":
            torch._dynamo.reset()
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
