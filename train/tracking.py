"""Where metrics go: ``metrics.jsonl`` always (main process), and Weights & Biases when configured.

W&B is imported lazily, on the main process only, and only when a project is configured
(``tracking.wandb.project`` or ``$WANDB_PROJECT``): with tracking off, or wandb not installed, nothing imports it.

Run identity: the W&B run id lives in ``output_dir/wandb_run_id.txt`` and in every checkpoint
(``TrainState.wandb_run_id``). A run resumed from a checkpoint re-initialises W&B with that id and
``resume="allow"``; rows at or before the last step already sent before the restart are not sent again, so the
run's history never goes backwards (``metrics.jsonl`` is rewound and rewritten as before).

Throughput (``perf/*``) follows one formula, documented in ``docs/wandb.md``:
``perf/mfu = 6 * N * tokens / elapsed / (world_size * peak)`` where ``N`` counts the parameters outside
embedding tables (6 = 2 FLOPs per multiply-add x (forward + 2 x backward)), ``tokens`` the real (non-pad)
tokens of real samples, and ``peak`` the device's dense peak for the run's precision (``PEAK_TFLOPS``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import secrets
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from train.config import Config

from train.files import write_atomic

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
STEP_AXIS = "train/global_step"

# Dense (no sparsity) peak TFLOPS per GPU: (name pattern, bf16/fp16 tensor core, fp32). First match wins, so
# the more specific names come first. Sources: NVIDIA data sheets (SXM parts unless named).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    (r"H100.*(PCIe|PCIE)", 756.0, 51.2),
    (r"H100.*NVL", 835.0, 60.0),
    (r"H100|GH200", 989.4, 66.9),
    (r"H200", 989.4, 66.9),
    (r"A100", 312.0, 19.5),
    (r"A800", 312.0, 19.5),
    (r"L40S", 362.1, 91.6),
    (r"L40\b", 181.0, 90.5),
    (r"\bL4\b", 121.0, 30.3),
    (r"\bA10\b", 125.0, 31.2),
    (r"RTX A6000|A6000", 154.8, 38.7),
    (r"V100", 125.0, 15.7),  # fp16 (no bf16)
    (r"\bT4\b", 65.0, 8.1),  # fp16 (no bf16)
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for the run's precision; None when unknown (CPU, unlisted GPUs)."""
    for pattern, half, single in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return (half if precision in ("bf16", "fp16") else single) * 1e12
    return None


def count_matmul_params(model: torch.nn.Module) -> int:
    """Parameters outside embedding tables (lookups cost no FLOPs); ZeRO-3 shards report their full size."""
    import torch

    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if id(p) not in skip)


def git_info(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the source tree (empty when it is not a git checkout)."""
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode:
            return {}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# ----------------------------------------------------------------------------------------------------------
# settings


_MODE_ALIASES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


@dataclass
class WandbSettings:
    project: str
    entity: str | None
    mode: str  # online | offline
    name: str
    group: str | None
    tags: list[str]
    dir: Path


def resolve_wandb(cfg: Config, out: Path, environ: dict[str, str] | None = None) -> WandbSettings | None:
    """W&B settings from the config, then the environment; None when W&B is off.

    W&B is on when a project is known (``tracking.wandb.project`` or ``$WANDB_PROJECT``) and the mode
    (``tracking.wandb.mode``, else ``$WANDB_MODE``, else online) is not ``disabled``.
    """
    from train.config import ConfigError

    env = os.environ if environ is None else environ
    wb = cfg.tracking.wandb
    if wb.mode is not None:
        mode = wb.mode
    else:
        raw = env.get("WANDB_MODE", "").strip().lower()
        if raw and raw not in _MODE_ALIASES:
            raise ConfigError(f"WANDB_MODE={raw!r} is not a W&B mode; use online, offline or disabled")
        mode = _MODE_ALIASES.get(raw, "online")
    project = wb.project or env.get("WANDB_PROJECT") or None
    if mode == "disabled":
        return None
    if project is None:
        if wb.mode is not None:
            raise ConfigError(
                f"tracking.wandb.mode={wb.mode} but no W&B project: set tracking.wandb.project=NAME or "
                "$WANDB_PROJECT (or tracking.wandb.mode=disabled)"
            )
        return None
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"W&B tracking is on (project {project!r}) but the wandb package is not installed: "
            "pip install 'glue-train[wandb]', or turn it off with tracking.wandb.mode=disabled"
        )
    from train.config import model_short_name

    name = wb.name or f"{cfg.data.task}-{model_short_name(cfg.model.name_or_path)}-s{cfg.seed}"
    where = Path(wb.dir or env.get("WANDB_DIR") or out)
    return WandbSettings(
        project, wb.entity or env.get("WANDB_ENTITY") or None, mode, name, wb.group, list(wb.tags), where
    )


# ----------------------------------------------------------------------------------------------------------
# writers


class MetricsLog:
    """Append-only JSON lines, one object per logged step; rewound on resume so no step appears twice."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def rewind(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to work a resumed run will redo)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        write_atomic(self.path, "".join(line + "\n" for line in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")


class Tracker(MetricsLog):
    """``metrics.jsonl`` on the main process, plus a W&B run there when configured; throughput figures.

    Life cycle (called by the loop): ``rewind`` (resume) -> ``start`` -> ``throughput``/``write``/``best``
    -> ``close``. Config problems (bad mode, wandb missing) are raised as ``ConfigError`` on every rank at
    construction, before any collective, so no rank is left waiting.
    """

    def __init__(self, cfg: Config, out: Path, main: bool):
        super().__init__(Path(out) / "metrics.jsonl", main)
        self.cfg, self.out = cfg, Path(out)
        self.settings = resolve_wandb(cfg, self.out)
        self.wandb_run: Any = None
        self.sent_before = 0  # last step in metrics.jsonl before a resume rewound it
        self.floor = 0  # W&B rows at or before this step were already sent by an earlier attempt
        self.flops_per_token: float | None = None
        self.peak: float | None = None
        self.world = 1
        self.device: torch.device | None = None

    # -- resume -------------------------------------------------------------------------------------------
    def rewind(self, step: int) -> None:
        if self.enabled and self.path.exists():
            steps = [json.loads(line)["step"] for line in self.path.read_text().splitlines() if line]
            self.sent_before = max(steps, default=0)
        super().rewind(step)

    # -- start --------------------------------------------------------------------------------------------
    def start(
        self,
        run_id: str | None,
        global_step: int,
        model: torch.nn.Module,
        device: torch.device,
        device_name: str,
        precision: str,
        world: int,
    ) -> str | None:
        """Set up throughput figures (every rank) and the W&B run (main process). Returns the run id to keep
        in the training state: the checkpoint's one when resuming, a new one on a fresh start."""
        self.flops_per_token = 6.0 * count_matmul_params(model)
        self.peak = peak_flops(device_name, precision) if device.type == "cuda" else None
        self.world, self.device = world, device
        if not self.enabled or self.settings is None:
            return run_id
        id_file = self.out / RUN_ID_FILE
        if global_step == 0:
            run_id = None  # a fresh start is a new W&B run
        elif run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None  # a checkpoint from before tracking was on
        if run_id:
            self.floor = self.sent_before  # W&B holds this run's history up to here
        run_id = run_id or os.environ.get("WANDB_RUN_ID") or new_run_id()
        self.wandb_run = self._init_wandb(run_id, device_name, precision)
        write_atomic(id_file, run_id + "\n")
        return run_id

    def run_config(self, device_name: str, precision: str) -> dict[str, Any]:
        """The resolved config + derived values from ``run_info.json`` (+ git, wandb, FLOP figures).
        Never the environment and never a credential."""
        from train.config import to_dict

        config = to_dict(self.cfg)
        info_path = self.out / "run_info.json"
        info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info.setdefault("device", device_name)
        info.setdefault("precision", precision)
        if "git" not in info and "git_sha" not in info:
            info["git"] = git_info()
        import wandb

        info.setdefault("versions", {})["wandb"] = wandb.__version__
        info["flops_per_token"] = self.flops_per_token
        info["peak_tflops_per_device"] = self.peak / 1e12 if self.peak else None
        config["run"] = info
        return config

    def _init_wandb(self, run_id: str, device_name: str, precision: str) -> Any:
        import wandb

        s = self.settings
        assert s is not None
        s.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=s.project,
            entity=s.entity,
            name=s.name,
            group=s.group,
            tags=s.tags or None,
            id=run_id,
            resume="allow",
            dir=str(s.dir),
            mode=s.mode,
            job_type="train",
            config=self.run_config(device_name, precision),
            allow_val_change=True,
        )
        run.define_metric(STEP_AXIS)
        run.define_metric("*", step_metric=STEP_AXIS)
        log.info(
            "W&B run %s (%s, project %s) in %s; resuming above step %d",
            run_id,
            s.mode,
            s.project,
            s.dir / "wandb",
            self.floor,
        )
        return run

    # -- logging ------------------------------------------------------------------------------------------
    def throughput(self, tokens: float, padded: float, elapsed: float) -> dict[str, float]:
        """``perf/*`` and ``memory/*`` for a log window: ``tokens`` real tokens and ``padded`` token slots
        over all ranks in ``elapsed`` seconds. MFU only where the device peak is known, memory only on CUDA."""
        elapsed = max(elapsed, 1e-9)
        row = {"perf/tokens_per_s": tokens / elapsed, "perf/padding_efficiency": tokens / max(1.0, padded)}
        if self.peak and self.flops_per_token:
            row["perf/mfu"] = self.flops_per_token * tokens / elapsed / (self.world * self.peak)
        if self.device is not None and self.device.type == "cuda":
            import torch

            row["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row

    def write(self, row: dict) -> None:
        super().write(row)
        if self.wandb_run is None:
            return
        step = int(row["step"])
        if step <= self.floor:
            log.debug("not sending step %d to W&B: it already holds steps up to %d", step, self.floor)
            return
        data = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        data.setdefault("train/epoch", row.get("epoch"))
        data[STEP_AXIS] = step
        self.wandb_run.log(data, step=step)

    def best(self, row: dict) -> None:
        """Put the best evaluation so far (an eval row) into the run summary as ``best/<metric>``."""
        if self.wandb_run is None:
            return
        summary = {f"best/{k.removeprefix('eval/')}": v for k, v in row.items() if k.startswith("eval/")}
        summary.update({"best/step": row["step"], "best/epoch": row["epoch"]})
        self.wandb_run.summary.update(summary)

    def summary(self, values: dict) -> None:
        """Set keys of the W&B run summary (e.g. ``early_stopped/at_step``); nothing without W&B."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self, preempted: bool = False) -> None:
        """Finish the W&B run (marked as preempted when the job will be requeued)."""
        if self.wandb_run is None:
            return
        if preempted:
            self.wandb_run.mark_preempting()
        self.wandb_run.finish()
        self.wandb_run = None


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
