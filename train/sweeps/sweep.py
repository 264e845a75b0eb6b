"""``glue-train sweep``: every (task, seed, override set) of a GLUE sweep, each in its own run folder.

    glue-train sweep --tasks all --seeds 1,2,3 --out runs/glue-bert-base            # local
    glue-train sweep --tasks rte,mrpc --seeds 1-5 --out runs/small train.lr=3e-5     # overrides for every run
    glue-train sweep --tasks rte --seeds 1,2 --out runs/lr --grid train.lr=2e-5,3e-5  # 2 override sets
    glue-train sweep --tasks all --seeds 1,2,3 --out runs/glue --slurm [--dry-run]   # SLURM job array
    glue-train sweep --search sweeps/search/bert.yaml --tasks rte,mrpc --seeds 1-5 --out runs/s  # a named grid
    glue-train sweep --tasks mnli,rte,mrpc,stsb --seeds 1-5 --out runs/w --warm-start mnli     # MNLI first

Each run is ``python -m train --config <config-dir>/<task>.yaml seed=<seed> output_dir=<DIR>/<task>-s<seed>[-<tag>]
<overrides>``. A run whose folder holds ``eval_results.json`` is finished and skipped; any other is started, and
the training program resumes it from its newest complete checkpoint. Locally the runs go one per visible GPU
(``CUDA_VISIBLE_DEVICES`` set per child), or one after another on CPU; child output goes to ``DIR/logs/``. A
failed run is reported and the sweep goes on; the exit code is 1 if any run did not finish. Ctrl-C (or SIGTERM)
asks the running children to checkpoint and stop; rerun the same command to carry on.

``--slurm`` writes ``DIR/sweep_runs.txt``, one line per unfinished run, ``<task> <seed> config=FILE output_dir=RUN
[key=value ...]``, for ``slurm/sweep.sbatch``, and submits ``sbatch --array=0-<n-1> --output=DIR/logs/%x-%A_%a.out
slurm/sweep.sbatch DIR/sweep_runs.txt`` (``--dry-run`` prints that command instead).

``--search FILE`` adds the grid axes and fixed overrides of a search space (train/sweeps/spaces.py, sweeps/search/).
``--warm-start mnli``: RTE, MRPC and STS-B runs get ``model.init_from=DIR@mnli`` (the best seed of MNLI's selected
override set, resolved when the run starts; train/model/warm_start.py). Locally they start once every MNLI run of the
sweep has finished (none start if one failed); with ``--slurm`` they go into ``DIR/sweep_runs_warm.txt``, a second
array submitted with ``--dependency=afterok:<first array>`` (only its MNLI tasks when it holds other runs too).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from train.errors import SearchError, SweepError, guarded
from train.folders import owned
from train.folders.runfolder import RESULTS, results_damage
from train.folders.runs import MANIFEST, STATUS
from train.sweeps.spaces import load_search
from train.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_DIR = Path("configs/tasks")
SBATCH_SCRIPT = Path("slurm/sweep.sbatch")
LIST_FILE = "sweep_runs.txt"
WARM_LIST_FILE = "sweep_runs_warm.txt"  # --warm-start with --slurm: the second array, after the first
WARM_TASKS = (
    "rte",
    "mrpc",
    "stsb",
)  # started from MNLI, as the RoBERTa paper does (Liu et al. 2019, Sec. 5.1)
LOG_DIR = "logs"
STOP_GRACE_S = 300  # how long Ctrl-C waits for children to checkpoint


# ----------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class SweepRun:
    task: str
    seed: int
    tag: str  # "" unless there are several override sets
    overrides: tuple[str, ...]  # common overrides + this run's override set
    folder: Path  # absolute
    config: Path  # the task's config
    extra_configs: tuple[Path, ...] = ()  # merged after it, in order (--model-config)
    set_overrides: tuple[str, ...] = ()  # this run's override set (grid point) alone
    after: str | None = None  # the task whose selected run it starts from (--warm-start), run before it

    @property
    def name(self) -> str:
        return run_name(self.task, self.seed, self.tag)

    @property
    def configs(self) -> tuple[Path, ...]:
        return (self.config, *self.extra_configs)


def run_name(task: str, seed: int, tag: str = "") -> str:
    """Run folder name: ``<task>-s<seed>`` plus ``-<tag>`` when the sweep has several override sets."""
    return f"{task}-s{seed}" + (f"-{tag}" if tag else "")


def parse_tasks(spec: str) -> list[str]:
    """``all`` or a comma list of task names (validated against the task table)."""
    if spec.strip().lower() == "all":
        return list(TASKS)
    names = [t.strip().lower() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise SweepError(
            f"--tasks: unknown task(s) {', '.join(unknown) or '(none)'}; choose from all, " + ", ".join(TASKS)
        )
    return list(dict.fromkeys(names))


MAX_RUNS = 10_000  # more runs than any GLUE sweep needs (9 tasks x 100 seeds x 10 sets): a typo, said at once
SEED_LIMIT = 2**32  # what config.seed takes


def parse_seeds(spec: str) -> list[int]:
    """``1,2,3`` or ranges ``1-5`` (inclusive), mixed; each seed in [0, 2^32), at most ``MAX_RUNS`` of them."""
    seeds: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise SweepError(f"--seeds: '{part}' is not a seed or a range like 1-5") from None
        if last < first:
            raise SweepError(f"--seeds: the range '{part}' runs backwards; write {last}-{first}")
        if last >= SEED_LIMIT:
            raise SweepError(f"--seeds: {last} is not a seed; seeds are in [0, 2^32)")
        if len(seeds) + last - first + 1 > MAX_RUNS:
            raise SweepError(
                f"--seeds '{spec}' gives more than {MAX_RUNS:,} seeds; a sweep takes at most that"
            )
        seeds += range(first, last + 1)
    if not seeds:
        raise SweepError("--seeds: give at least one seed, e.g. --seeds 1,2,3")
    return list(dict.fromkeys(seeds))


def _tag_part(key: str, value: str) -> str:
    text = key.split(".")[-1] + value
    return "".join(c if c.isalnum() or c in ".-+" else "-" for c in text)


def override_sets(grid: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Cross product of ``key=v1,v2`` grid axes as (tag, overrides); one untagged empty set without a grid."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not key or not vals:
            raise SweepError(f"--grid '{item}' must look like key.sub=value1,value2")
        axes.append([(key.strip(), v.strip()) for v in vals])
    if math.prod(len(axis) for axis in axes) > MAX_RUNS:
        sizes = " x ".join(str(len(axis)) for axis in axes)
        raise SweepError(f"--grid gives {sizes} override sets, more than the {MAX_RUNS:,} runs a sweep takes")
    combos = list(itertools.product(*axes))
    if len(combos) <= 1:
        return [("", tuple(f"{k}={v}" for k, v in (combos[0] if combos else ())))]
    return [
        ("_".join(_tag_part(k, v) for k, v in combo), tuple(f"{k}={v}" for k, v in combo)) for combo in combos
    ]


def resolve_config_dir(config_dir: str | Path) -> Path:
    """The folder of per-task YAMLs; a relative default is also looked up in the repository."""
    path = Path(config_dir)
    if not path.is_dir() and not path.is_absolute() and (REPO / path).is_dir():
        path = REPO / path
    return path.resolve()


def plan(
    tasks: list[str],
    seeds: list[int],
    out: str | Path,
    config_dir: str | Path = DEFAULT_CONFIG_DIR,
    overrides: list[str] | tuple[str, ...] = (),
    grid: list[str] | tuple[str, ...] = (),
    model_configs: list[str | Path] | tuple[str | Path, ...] = (),
    warm_start: str | None = None,
) -> list[SweepRun]:
    """The sweep's runs: tasks × seeds × override sets, in that order (with ``warm_start``: that task's first)."""
    out, cfg_dir = Path(out).resolve(), resolve_config_dir(config_dir)
    extra = tuple(resolve_file(m) for m in model_configs)
    sets = override_sets(list(grid))
    _check_reserved([*overrides, *(o for _, extra in sets for o in extra)])
    tags = [tag for tag, _ in sets]
    if len(set(tags)) != len(tags):
        raise SweepError(f"--grid values give the same folder tag twice: {tags}")
    if warm_start and any(o.split("=", 1)[0].strip() == "model.init_from" for o in overrides):
        raise SweepError("--warm-start sets model.init_from of the runs it starts; drop model.init_from=...")
    if len(tasks) * len(seeds) * len(sets) > MAX_RUNS:
        raise SweepError(
            f"the sweep plans {len(tasks)} tasks x {len(seeds)} seeds x {len(sets)} override sets = "
            f"{len(tasks) * len(seeds) * len(sets):,} runs, more than the {MAX_RUNS:,} a sweep takes; split it"
        )
    runs = []
    for task, seed, (tag, sets_extra) in itertools.product(tasks, seeds, sets):
        folder = out / run_name(task, seed, tag)
        after = warm_start if warm_start and task in WARM_TASKS and task != warm_start else None
        init = (f"model.init_from={out}@{after}",) if after else ()
        config = cfg_dir / f"{task}.yaml"
        runs.append(
            SweepRun(
                task, seed, tag, (*overrides, *sets_extra, *init), folder, config, extra, sets_extra, after
            )
        )
    return sorted(runs, key=lambda r: r.task != warm_start) if warm_start else runs


RESERVED = ("seed", "output_dir")  # set per run by the sweep


def _check_reserved(overrides: list[str]) -> None:
    bad = [o for o in overrides if o.split("=", 1)[0].strip() in RESERVED]
    if bad:
        raise SweepError(
            f"the sweep sets seed and output_dir of each run itself (--seeds, --out); drop {bad}"
        )


DRIFT_IGNORED = ("output_dir", "overwrite", "precision", "checkpoint", "tracking")


def _leaf_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys present on both sides whose values differ (keys only one side has are ignored)."""
    out = []
    for key in old.keys() & new.keys():
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _leaf_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


def config_drift(run: SweepRun, cfg: object) -> list[str]:
    """Keys where the folder's existing config.yaml differs from what this sweep would train now."""
    import yaml

    from train.config import to_dict

    try:
        old = yaml.safe_load((run.folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    now = {k: v for k, v in to_dict(cfg).items() if k not in DRIFT_IGNORED}
    return sorted(_leaf_diff({k: v for k, v in old.items() if k not in DRIFT_IGNORED}, now))


def _data_problem(cfg) -> str | None:
    """Whether a run's GLUE folder lacks its task's training file (a bundled sample holds a few tasks): said
    before a sweep starts, not when the run's turn comes (on a cluster, after its wait in the queue)."""
    from train.data.glue import check_split_file, glue_folder
    from train.errors import UserError
    from train.tasks import get_task

    if cfg.data.glue_dir is None:
        return None  # the Hub dataset: read (or refused) by the run itself
    task = get_task(cfg.data.task)
    split = task.split("train")[0]
    try:
        check_split_file(glue_folder(cfg.data.glue_dir, task) / split.tsv, task, split)
    except UserError as e:
        return str(e)
    return None


def check_plan(runs: list[SweepRun]) -> list[str]:
    """Load every run's config (file + overrides) before anything starts; raise one error listing all problems.

    Returns warnings: run folders that already hold a run with another config.
    """
    from train.config import load_config
    from train.errors import ConfigError

    problems: list[str] = []
    warnings: list[str] = []
    missing = sorted({str(r.config) for r in runs if not r.config.is_file()})
    if missing:
        problems.append("no task config: " + ", ".join(missing) + " (use --config-dir)")
    extra_missing = sorted({str(c) for r in runs for c in r.extra_configs if not c.is_file()})
    if extra_missing:
        problems.append("--model-config file not found: " + ", ".join(extra_missing))
    for run in runs:
        if not all(c.is_file() for c in run.configs):
            continue
        try:
            cfg = load_config(run.configs, train_overrides(run))
        except ConfigError as e:
            problems.append(f"{run.name}: {e}")
            continue
        if cfg.data.task != run.task:
            problems.append(f"{run.config} trains data.task={cfg.data.task}, not {run.task}")
        missing_data = _data_problem(cfg)
        if missing_data:
            problems.append(f"{run.name}: {missing_data}")
        damage = results_damage(run.folder)
        if damage:
            warnings.append(
                f"{run.name}: {run.folder / RESULTS} is damaged ({damage}): not counted as finished; its run will "
                "refuse to start until that file is restored or overwrite=true is given"
            )
        drift = config_drift(run, cfg)
        if drift:
            warnings.append(
                f"{run.name}: its folder holds a run with another config (differs in: "
                f"{', '.join(drift)}); finished runs are kept as they are, others will refuse to "
                "start (use another --out, or overwrite=true)"
            )
    if problems:
        raise SweepError("\n".join(dict.fromkeys(problems)))
    return warnings


def sweep_override(run: SweepRun) -> str:
    """Names the sweep in each run's config: W&B groups the runs by it and types them by task (train/tracking/tracker.py),
    unless tracking.wandb.group / job_type are set. Before the user's overrides, so a later one wins."""
    import yaml

    name = run.folder.parent.name
    if not isinstance(yaml.safe_load(name), str):  # a folder called 2024, true or null stays a name
        name = json.dumps(name)
    return f"tracking.wandb.sweep_name={name}"


def train_overrides(run: SweepRun) -> list[str]:
    return [f"seed={run.seed}", f"output_dir={run.folder}", sweep_override(run), *run.overrides]


def train_command(run: SweepRun) -> list[str]:
    """The child process of one run."""
    configs = [arg for c in run.configs for arg in ("--config", str(c))]
    return [sys.executable, "-m", "train", *configs, *train_overrides(run)]


# ----------------------------------------------------------------------------------------------------------
# state on disk


def is_finished(run: SweepRun) -> bool:
    """Its ``eval_results.json`` is there and whole; a damaged one is no result (the run's start says what to do)."""
    return (run.folder / RESULTS).is_file() and results_damage(run.folder) is None


def newest_checkpoint(run: SweepRun) -> str | None:
    from train.engine.checkpoint import newest

    path = newest(run.folder)
    return path.name if path else None


def describe_start(run: SweepRun) -> str:
    ckpt = newest_checkpoint(run)
    if ckpt:
        return f"resuming from {ckpt}"
    return "restarting (no complete checkpoint)" if (run.folder / "config.yaml").exists() else "starting"


SWEEP_HINT = (
    "Move those files out of the way, or give the sweep another --out folder (a sweep writes sweep.json, "
    "sweep_status.json, sweep_runs*.txt and logs/<run>.log, recorded in .glue-train-files.json)"
)


def _update_json(out: Path, name: str, change: Callable[[dict], dict]) -> None:
    """Read, change and write one of the sweep's JSON files under the folder's lock (two sweeps into one folder
    add their runs, never overwrite each other's); only a file the sweep owns (train/folders/owned.py)."""
    with owned.writing(out, "sweep", [name], hint=SWEEP_HINT) as files:
        files.write(name, json.dumps(change(_read_json(out / name)), indent=1))


def planned_files(runs: list[SweepRun], slurm: bool) -> list[str]:
    """Every file this sweep may write into its folder (checked before it writes any)."""
    if slurm:
        return [MANIFEST, LIST_FILE, WARM_LIST_FILE]
    return [MANIFEST, STATUS, *(f"{LOG_DIR}/{r.name}.log" for r in runs if not is_finished(r))]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_manifest(out: Path, runs: list[SweepRun]) -> None:
    """Add this sweep's runs to ``DIR/sweep.json`` (runs of earlier sweeps into DIR are kept)."""

    def add(data: dict) -> dict:
        old = {r["name"]: r for r in data.get("runs", [])}
        for run in runs:
            old[run.name] = entry(run)
        return {"runs": list(old.values())}

    _update_json(out, MANIFEST, add)


def entry(run: SweepRun) -> dict:
    """A run's line in sweep.json."""
    return {
        "name": run.name,
        "task": run.task,
        "seed": run.seed,
        "tag": run.tag,
        "overrides": list(run.overrides),
        "folder": run.folder.name,
        "config": str(run.config),
        "configs": [str(c) for c in run.configs],
        "set": list(run.set_overrides),
        "after": run.after,
    }


def record_status(out: Path, run: SweepRun, rc: int, seconds: float) -> None:
    line = {
        "rc": rc,
        "seconds": round(seconds, 1),
        "finished": is_finished(run),
        "log": f"{LOG_DIR}/{run.name}.log",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _update_json(out, STATUS, lambda status: {**status, run.name: line})


# ----------------------------------------------------------------------------------------------------------
# local scheduling


def visible_gpus() -> list[str]:
    """GPU ids a child may be given: CUDA_VISIBLE_DEVICES entries if set, else torch's device count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable torch/CUDA means CPU
        return []


class Stop(BaseException):
    """SIGTERM to the sweep: stop the children cleanly (like KeyboardInterrupt, not an error to catch)."""


def _raise_stop(signum, frame) -> None:  # noqa: ARG001
    raise Stop()


@dataclass
class _Child:
    run: SweepRun
    proc: subprocess.Popen
    log: object
    start: float


def child_env(device: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def start_child(
    run: SweepRun, out: Path, device: str | None, command: Callable[[SweepRun], list[str]]
) -> _Child:
    path = owned.claim_append(out, f"{LOG_DIR}/{run.name}.log", "sweep", SWEEP_HINT)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a")  # noqa: SIM115 - closed in _finish_child
    cmd = command(run)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} device={device or 'cpu'}: {shlex.join(cmd)}\n")
    log.flush()
    # A new session: Ctrl-C reaches only the sweep, which then asks each child to checkpoint (SIGTERM).
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(device), start_new_session=True
    )
    return _Child(run, proc, log, time.monotonic())


def _log_tail(out: Path, run: SweepRun, n: int = 8) -> str:
    try:
        lines = (out / LOG_DIR / f"{run.name}.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def _finish_child(child: _Child, out: Path, rc: int) -> None:
    child.log.close()
    secs = time.monotonic() - child.start
    record_status(out, child.run, rc, secs)
    if rc == 0 and is_finished(child.run):
        say(f"{child.run.name}: finished in {secs:.0f}s")
    elif rc == 0:
        say(
            f"{child.run.name}: stopped after {secs:.0f}s with a checkpoint but no eval_results.json; rerun to resume"
        )
    else:
        say(
            f"{child.run.name}: FAILED (exit {rc}) after {secs:.0f}s; log {out / LOG_DIR / child.run.name}.log:\n"
            + _log_tail(out, child.run)
        )


def say(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stop_children(running: dict, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each child (it checkpoints and exits), then wait; SIGKILL what is left after ``grace``."""
    for child in running.values():
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in running.values():
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def run_local(
    runs: list[SweepRun],
    out: Path,
    devices: list[str] | None = None,
    command: Callable[[SweepRun], list[str]] | None = None,
    poll_s: float = 0.5,
) -> dict[str, int]:
    """Run ``runs`` with one child per device at a time (one at a time on CPU); return exit codes by run name.

    ``command`` builds a child's argv (default: ``train_command``). A run with ``after`` (--warm-start) starts once
    no run of that task is pending or running; if one of those ended unfinished it never starts.
    """
    command = command or train_command
    slots: list[str | None] = list(devices) if devices else [None]
    pending, running, codes = list(runs), {}, {}
    failed: set[str] = set()  # tasks with a run that ended without eval_results.json
    total = len(runs)

    def ready(run: SweepRun) -> bool:
        if run.after is None:
            return True
        busy = [r for r in pending if r.task == run.after] + [c.run for c in running.values()]
        return run.after not in failed and not any(r.task == run.after for r in busy)

    try:
        while pending or running:
            for slot in [s for s in slots if s not in running]:
                run = next((r for r in pending if ready(r)), None)
                if run is None:
                    break
                pending.remove(run)
                where = f"GPU {slot}" if slot is not None else "CPU"
                say(f"[{total - len(pending)}/{total}] {run.name}: {describe_start(run)} on {where}")
                running[slot] = start_child(run, out, slot, command)
            for slot, child in list(running.items()):
                rc = child.proc.poll()
                if rc is not None:
                    codes[child.run.name] = rc
                    _finish_child(child, out, rc)
                    if not is_finished(child.run):
                        failed.add(child.run.task)
                    del running[slot]
            if pending and not running and not any(ready(r) for r in pending):
                names = ", ".join(r.name for r in pending)
                say(f"not starting {names}: a {pending[0].after} run they start from did not finish")
                break
            time.sleep(poll_s if running else 0)
    except (KeyboardInterrupt, Stop):
        say(f"interrupted: asking {len(running)} running run(s) to checkpoint and stop")
        stop_children(running)
        for child in running.values():
            _finish_child(child, out, child.proc.returncode)
        raise
    return codes


# ----------------------------------------------------------------------------------------------------------
# SLURM


def slurm_line(run: SweepRun) -> str:
    """``<task> <seed> config=... output_dir=... [key=value ...]`` for ``slurm/sweep.sbatch``.

    The fields are whitespace-separated (no value may hold a space); ``config=FILE`` makes the array task use this
    sweep's config file (the script then also sets ``data.task=<task>``, which the file already says).
    """
    configs = [f"config={c}" for c in run.configs]
    fields = [
        run.task,
        str(run.seed),
        *configs,
        f"output_dir={run.folder}",
        sweep_override(run),
        *run.overrides,
    ]
    spaced = [f for f in fields if any(c.isspace() for c in f)]
    if spaced:
        raise SweepError(
            f"{run.name}: SLURM list lines are whitespace-separated; no spaces allowed in {spaced}"
        )
    return " ".join(fields)


def sbatch_command(
    list_file: Path,
    n: int,
    script: Path,
    max_parallel: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """``sbatch --array=0-<n-1>[%max] --output=<DIR>/logs/%x-%A_%a.out [extra] <script> <list_file>``."""
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    log = list_file.parent / LOG_DIR / "%x-%A_%a.out"
    return ["sbatch", f"--array={array}", f"--output={log}", *extra, str(script), str(list_file)]


def resolve_file(script: str | Path) -> Path:
    """A file given relative to the working directory, or else to the repository (configs/..., slurm/...)."""
    path = Path(script)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path
    return path.resolve()


def write_list(out: Path, name: str, runs: list[SweepRun]) -> Path:
    list_file = owned.write_file(out, name, "".join(slurm_line(r) + "\n" for r in runs), "sweep", SWEEP_HINT)
    say(f"wrote {list_file} ({len(runs)} runs)")
    return list_file


def dependency(first: list[SweepRun], source: str | None, job: str) -> str | None:
    """The second array's ``--dependency``: ``afterok:<job>`` when the first array holds only the source task's
    runs, else ``afterok:<job>_<i>:...`` on just those array tasks (the others need not finish first); None
    without a source task or when none of its runs is left to wait for."""
    idx = [i for i, r in enumerate(first) if source and r.task == source]
    if not idx:
        return None
    return f"afterok:{job}" if len(idx) == len(first) else "afterok:" + ":".join(f"{job}_{i}" for i in idx)


def with_dependency(cmd: list[str], dep: str | None) -> list[str]:
    """The sbatch argv with ``--dependency=<dep>`` before the script and list file."""
    return cmd if dep is None else [*cmd[:-2], f"--dependency={dep}", *cmd[-2:]]


def dry_run_lines(cmds: list[tuple[list[str], str | None]], first: list[SweepRun]) -> list[str]:
    """What --dry-run prints: the sbatch command(s); with a dependency, as a shell script that passes the first
    array's job id (``sbatch --parsable``) to the second's ``--dependency`` (left unquoted for the shell)."""
    deps = [dependency(first, source, "${JOB}") for _, source in cmds]
    if all(d is None for d in deps):
        return [shlex.join(cmd) for cmd, _ in cmds]
    lines = ["JOB=$(" + shlex.join([cmds[0][0][0], "--parsable", *cmds[0][0][1:]]) + ")"]
    full = with_dependency(cmds[1][0], deps[1])
    return [*lines, " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in full)]


def _sbatch(cmd: list[str]) -> tuple[int, str | None]:
    """Run one sbatch; (exit code, job id)."""
    env = {**os.environ, "GLUE_ROOT": os.environ.get("GLUE_ROOT", str(REPO))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(proc.stdout + proc.stderr, end="", flush=True)
    job = re.search(r"^(?:Submitted batch job )?(\d+)", proc.stdout.strip())
    say(
        f"submitted: {shlex.join(cmd)}" if proc.returncode == 0 else f"sbatch failed (exit {proc.returncode})"
    )
    return proc.returncode, job.group(1) if job else None


def submit_slurm(runs: list[SweepRun], out: Path, args: argparse.Namespace) -> int:
    """Write the list(s) of unfinished runs and submit (or print) the array job(s).

    With --warm-start the warm-started runs are a second array that waits for the first one's source runs.
    """
    todo = [r for r in runs if not is_finished(r)]
    say(f"{len(runs) - len(todo)} of {len(runs)} runs already finished")
    if not todo:
        return 0
    first, warm = [r for r in todo if r.after is None], [r for r in todo if r.after]
    (out / LOG_DIR).mkdir(exist_ok=True)  # SLURM does not create the --output folder
    script = resolve_file(args.sbatch_script)
    new_lists = [out / n for n in (LIST_FILE, WARM_LIST_FILE) if not (out / n).exists()]
    cmds: list[tuple[list[str], str | None]] = []  # (sbatch argv, the source task it waits for)
    for name, part in ((LIST_FILE, first), (WARM_LIST_FILE, warm)):
        if part:
            listed = write_list(out, name, part)
            cmd = sbatch_command(listed, len(part), script, args.max_parallel, args.sbatch_arg)
            cmds.append((cmd, part[0].after))
    if args.dry_run:
        print("\n".join(dry_run_lines(cmds, first)), flush=True)
        return 0
    job = None
    for i, (cmd, source) in enumerate(cmds):
        dep = dependency(first, source, job or "")
        if dep is not None and job is None:
            say("not submitting the warm-started array: the first array's job id is unknown")
            return 1
        rc, job = _sbatch(with_dependency(cmd, dep))
        if rc:
            if i == 0:  # nothing was submitted: the lists this sweep wrote for it are not left behind
                for path in new_lists:
                    path.unlink(missing_ok=True)
            return rc
    return 0


def check_submit(args: argparse.Namespace) -> None:
    """What --slurm needs, checked before the sweep writes anything."""
    if not args.slurm or args.dry_run:
        return
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch not found: run on a SLURM login node, or use --dry-run to print the command")
    script = resolve_file(args.sbatch_script)
    if not script.is_file():
        raise SweepError(f"{script} not found (pass --sbatch-script)")


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="glue-train sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tasks", required=True, help="'all' or a comma list: cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli"
    )
    p.add_argument("--seeds", required=True, help="comma list and/or ranges, e.g. 1,2,3 or 1-5")
    p.add_argument("--out", required=True, help="sweep folder; run folders DIR/<task>-s<seed>[-<tag>]")
    p.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR), help="folder of <task>.yaml run configs")
    p.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="FILE",
        help="a config merged after each task's (repeatable), e.g. configs/models/roberta-base.yaml",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an override axis (repeatable); runs cover the cross product, each set gets a folder tag",
    )
    p.add_argument(
        "--search",
        metavar="FILE",
        help="a search space (sweeps/search/<name>.yaml): its grid axes and fixed overrides, as --grid options",
    )
    p.add_argument(
        "--warm-start",
        choices=["mnli"],
        help="start RTE, MRPC and STS-B from the best seed of the selected MNLI override set "
        "(model.init_from=DIR@mnli); the MNLI runs go first (with --slurm: a second array after them)",
    )
    p.add_argument("--slurm", action="store_true", help="write the run list and submit a SLURM job array")
    p.add_argument(
        "--dry-run", action="store_true", help="with --slurm: print the sbatch command, do not submit"
    )
    p.add_argument("--sbatch-script", default=str(SBATCH_SCRIPT), help="the array job script (with --slurm)")
    p.add_argument(
        "--max-parallel", type=int, help="with --slurm: at most N array tasks at once (--array=…%%N)"
    )
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPT",
        help="with --slurm: extra sbatch option (repeatable), e.g. --sbatch-arg=--partition=gpu",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    return p.parse_args(argv)


def search_options(path: str | None, grid: list[str]) -> tuple[list[str], list[str]]:
    """(grid axes, fixed overrides) of ``--search FILE`` (none without one), with ``--grid`` axes after them."""
    if not path:
        return list(grid), []
    try:
        space = load_search(resolve_file(path))
    except SearchError as e:
        raise SweepError(str(e)) from None
    keys = [a.split("=", 1)[0].strip() for a in (*space.grid, *grid)]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SweepError(f"--grid {twice} is already an axis of the search space {space.path}")
    say(f"search space {space.name} ({space.path}): {len(space.grid)} axes; source: {space.source}")
    return [*space.grid, *grid], list(space.overrides)


def check_warm_source(runs: list[SweepRun], out: Path, source: str | None) -> None:
    """--warm-start without the source task in --tasks: its runs must already be finished in ``out``."""
    if not source or any(r.task == source for r in runs):
        return
    if not any(r.after for r in runs):
        say(f"warning: --warm-start {source}: none of {', '.join(WARM_TASKS)} is in --tasks")
        return
    from train.errors import ConfigError
    from train.model.warm_start import selected_run

    try:
        run = selected_run(out, source)
    except ConfigError as e:
        raise SweepError(f"--warm-start {source}: {e}; add {source} to --tasks") from None
    say(
        f"--warm-start {source}: the runs start from {run.folder} (selected now; resolved again at their start)"
    )


def run_sweep(args: argparse.Namespace) -> int:
    grid, fixed = search_options(args.search, args.grid)
    runs = plan(
        parse_tasks(args.tasks),
        parse_seeds(args.seeds),
        args.out,
        args.config_dir,
        [*fixed, *args.overrides],
        grid,
        args.model_config,
        args.warm_start,
    )
    check_warm_source(runs, Path(args.out).resolve(), args.warm_start)
    for warning in check_plan(runs):
        say("warning: " + warning)
    out = Path(args.out).resolve()
    check_submit(args)
    owned.preflight(out, planned_files(runs, args.slurm), "sweep", SWEEP_HINT)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, runs)
    if args.slurm:
        return submit_slurm(runs, out, args)
    todo = [r for r in runs if not is_finished(r)]
    say(f"{len(runs)} runs in {out}: {len(runs) - len(todo)} finished (skipped), {len(todo)} to run")
    devices = visible_gpus()
    codes = run_local(todo, out, devices)
    unfinished = [r.name for r in todo if not is_finished(r)]
    say(
        f"done: {len(todo) - len(unfinished)} ran to the end, {len(runs) - len(todo)} skipped"
        + (f"; NOT finished: {', '.join(unfinished)}" if unfinished else "")
    )
    failed = [n for n, rc in codes.items() if rc]
    return 1 if unfinished or failed else 0


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.dry_run and not args.slurm:
        raise SweepError("--dry-run only goes with --slurm")
    old = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return run_sweep(args)
    except (KeyboardInterrupt, Stop):
        say("stopped; run the same command again to resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """``glue-train sweep``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
