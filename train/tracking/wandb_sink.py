"""The Weights & Biases sink: one W&B run per training run, surviving requeues; never holding a run up.

W&B is imported lazily, on the main process only, and only when a project is configured
(``tracking.wandb.project`` or ``$WANDB_PROJECT``): with tracking off, or wandb not installed, nothing imports it.

Run identity: the W&B run id lives in ``output_dir/wandb_run_id.txt`` and in every checkpoint
(``TrainState.wandb_run_id``). A run resumed from a checkpoint re-initialises W&B with that id and
``resume="allow"``; rows at or before the last step already sent before the restart are not sent again, so the
run's history never goes backwards. Without an API key or an answer within ``INIT_TIMEOUT_S`` the run logs offline
(unless online was asked for explicitly: then it stops with an error). Besides the scalars: a confusion matrix per
evaluation, the best model's mistakes as a table, and the summary block's numbers (train/tracking/panels.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from train.config import Config, DataConfig
    from train.tasks import Split, Task

from train.files import write_atomic
from train.tracking import panels

log = logging.getLogger("train.tracking.tracker")

RUN_ID_FILE = "wandb_run_id.txt"
STEP_AXIS = "train/global_step"


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
    job_type: str = "train"
    required: bool = False  # online asked for explicitly: no silent fallback to offline


def resolve_wandb(cfg: Config, out: Path, environ: dict[str, str] | None = None) -> WandbSettings | None:
    """W&B settings from the config, then the environment; None when W&B is off.

    W&B is on when a project is known (``tracking.wandb.project`` or ``$WANDB_PROJECT``) and the mode
    (``tracking.wandb.mode``, else ``$WANDB_MODE``, else online) is not ``disabled``.
    """
    from train.errors import ConfigError

    env = os.environ if environ is None else environ
    wb = cfg.tracking.wandb
    raw = env.get("WANDB_MODE", "").strip().lower()
    if wb.mode is not None:
        mode = wb.mode
    else:
        if raw and raw not in _MODE_ALIASES:
            raise ConfigError(f"WANDB_MODE={raw!r} is not a W&B mode; use online, offline or disabled")
        mode = _MODE_ALIASES.get(raw, "online")
    required = mode == "online" and (wb.mode == "online" or _MODE_ALIASES.get(raw) == "online")
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
    # a sweep's runs (glue-train sweep sets sweep_name) are grouped by sweep and typed by task unless set otherwise
    group = wb.group or wb.sweep_name
    job_type = wb.job_type or (cfg.data.task if wb.sweep_name else "train")
    return WandbSettings(
        project,
        wb.entity or env.get("WANDB_ENTITY") or None,
        mode,
        name,
        group,
        list(wb.tags),
        where,
        job_type,
        required,
    )


# W&B's own init timeout; with its start and teardown a failed online init ends within ~25 s
INIT_TIMEOUT_S = 10


def has_api_key(base_url: str | None = None) -> bool:
    """An API key W&B would find: $WANDB_API_KEY, or a netrc entry for its host (what `wandb login` writes)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ----------------------------------------------------------------------------------------------------------
# writers


class WandbSink:
    """The W&B run of one training run (main process only); ``log(row, step)`` and ``close()`` like any sink."""

    def __init__(self, settings: WandbSettings, cfg: Config, out: Path):
        self.settings, self.cfg, self.out = settings, cfg, Path(out)
        self.wandb_run: Any = None
        self.floor = 0  # W&B rows at or before this step were already sent by an earlier attempt
        self.last_step = 0  # the last step sent to W&B
        self.last_preds: dict[str, dict] = {}  # dev split -> predictions of the latest evaluation
        self.best_preds: dict[str, dict] = {}  # the same for the best evaluation (best/)
        self.info: dict[str, Any] = {}  # the run's id and URL or sync folder (run_info.json, the summary)
        self.run_info: dict[str, Any] = {}

    def start(self, run_id: str | None, global_step: int, sent_before: int, run_info: dict[str, Any]) -> str:
        """Open (or continue) the W&B run; ``sent_before``: the last step metrics.jsonl held before a resume;
        ``run_info``: the derived values shown beside the config. Returns the run id."""
        self.run_info = run_info
        id_file = self.out / RUN_ID_FILE
        if global_step == 0:
            run_id = None  # a fresh start is a new W&B run
        elif run_id is None and id_file.is_file():
            run_id = id_file.read_text().strip() or None  # a checkpoint from before tracking was on
        if run_id:
            self.floor = sent_before  # W&B holds this run's history up to here
        run_id = run_id or os.environ.get("WANDB_RUN_ID") or new_run_id()
        self.wandb_run = self._init_wandb(run_id)
        self.info = self._describe_run()
        write_atomic(id_file, run_id + "\n")
        return run_id

    def run_config(self) -> dict[str, Any]:
        """The resolved config + this start's derived values (run_info, in memory; + git, wandb, FLOP figures).
        Never the environment and never a credential."""
        from train.config import to_dict
        from train.tracking.provenance import git_info

        config = to_dict(self.cfg)
        import wandb

        info = dict(self.run_info)
        info["git"] = git_info()

        info["versions"] = {**info.get("versions", {}), "wandb": wandb.__version__}
        config["run"] = info
        return config

    def _init_wandb(self, run_id: str) -> Any:
        """``wandb.init``, never hanging: online needs an API key and an answer within INIT_TIMEOUT_S; without
        them a run that did not ask for online explicitly goes on offline (with the sync command), one that did
        stops with an error."""
        import wandb

        from train.errors import ConfigError, reading

        s = self.settings
        s.dir.mkdir(parents=True, exist_ok=True)
        how = "tracking.wandb.mode=offline (sync later with `wandb sync`) or tracking.wandb.mode=disabled"
        if s.mode == "online" and not has_api_key():
            if s.required:
                raise ConfigError(
                    f"W&B online mode was asked for but no API key is set: run `wandb login` or export "
                    f"WANDB_API_KEY, or use {how}"
                )
            log.warning("W&B: no API key (run `wandb login` or set WANDB_API_KEY): logging offline instead")
            s.mode = "offline"
        # what W&B's own checks raise on a setting (a tag too long, ...) names the setting; network and key
        # problems are handled inside (offline fallback)
        with reading("W&B: the settings", "(tracking.wandb.* and $WANDB_*)", "fix the value W&B names"):
            try:
                return self._wandb_init(run_id)
            except (wandb.errors.Error, OSError, TimeoutError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if s.mode != "online" or s.required:
                    raise ConfigError(
                        f"W&B could not start ({why}); check the network and the key, or use {how}"
                    ) from None
                log.warning(
                    "W&B could not be reached within %d s (%s): logging offline instead", INIT_TIMEOUT_S, why
                )
                s.mode = "offline"
                wandb.teardown()  # the failed online attempt still holds the run id in W&B's service process
                return self._wandb_init(run_id)

    def _describe_run(self) -> dict[str, Any]:
        """Where this W&B run lives: its URL online, the folder and `wandb sync` command offline."""
        run = self.wandb_run
        if run is None:
            return {}
        if self.settings.mode == "online":
            return {"id": run.id, "mode": "online", "url": run.url}
        sync_dir = Path(run.dir).parent  # wandb/offline-run-<time>-<id>/files -> its run folder
        return {"id": run.id, "mode": "offline", "sync_dir": str(sync_dir)}

    def _wandb_init(self, run_id: str) -> Any:
        for key in [k for k, v in os.environ.items() if k.startswith("WANDB_") and not v.strip()]:
            del os.environ[key]  # an empty WANDB_MODE= means unset to us; wandb would reject it
        import wandb

        s = self.settings
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
            job_type=s.job_type,
            config=self.run_config(),
            allow_val_change=True,
            settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S),
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

    def log(self, row: dict, step: int) -> None:
        if self.wandb_run is None:
            return
        if step <= self.floor:
            log.debug("not sending step %d to W&B: it already holds steps up to %d", step, self.floor)
            return
        data = {k: v for k, v in row.items() if k not in ("step", "epoch")}
        data.setdefault("train/epoch", row.get("epoch"))
        data[STEP_AXIS] = step
        self.wandb_run.log(data, step=step)
        self.last_step = max(self.last_step, step)

    def best(self, row: dict) -> None:
        """Put the best evaluation so far (an eval row) into the run summary as ``best/<metric>``."""
        if self.wandb_run is None:
            return
        summary = {f"best/{k.removeprefix('eval/')}": v for k, v in row.items() if k.startswith("eval/")}
        summary.update({"best/step": row["step"], "best/epoch": row["epoch"]})
        self.wandb_run.summary.update(summary)
        self.best_preds = dict(self.last_preds)  # the predictions of this (best) evaluation, for the table

    def eval_details(self, step: int, split: Split, task: Task, p: dict[str, np.ndarray]) -> None:
        """One dev split of one evaluation (``p``: the loop's gathered host arrays ``pred``/``label``/``idx``/
        ``conf``): its confusion matrix in W&B (classification tasks), and the predictions kept for the table of
        the best model's mistakes. Costs nothing without W&B and nothing on the device (the arrays are host)."""
        if self.wandb_run is None or task.is_regression:
            return
        self.last_preds[split.name] = {k: p[k] for k in ("pred", "label", "idx", "conf") if k in p}
        if step <= self.floor:
            return
        import wandb

        chart = wandb.plot.confusion_matrix(
            y_true=[int(x) for x in p["label"]],
            preds=[int(x) for x in p["pred"]],
            class_names=list(task.labels),
            title=f"{task.name} {split.name}: confusion matrix",
        )
        self.wandb_run.log({f"eval/confusion_matrix{split.suffix}": chart, STEP_AXIS: step}, step=step)
        self.last_step = max(self.last_step, step)

    def wrong_predictions(self, task: Task, data_cfg: DataConfig, limit: int = panels.WRONG_LIMIT) -> None:
        """``best/wrong_predictions``: a table of up to ``limit`` rows of the first dev split that the best
        model gets wrong (idx, text, gold, prediction, confidence), most confident first. Classification only."""
        if self.wandb_run is None or task.is_regression:
            return
        split = task.split("dev")[0]
        p = self.best_preds.get(split.name)
        if p is None:  # the best evaluation happened before a restart: its predictions died with that process
            log.info("no wrong-predictions table: the best evaluation was not made by this process")
            return
        import wandb

        rows = panels.wrong_rows(task, panels.dev_texts(data_cfg, task, split), p, limit)
        table = wandb.Table(columns=panels.WRONG_COLUMNS, data=rows)
        step = max(self.last_step, self.floor + 1)  # never below what W&B already holds
        self.wandb_run.log({"best/wrong_predictions": table, STEP_AXIS: step}, step=step)

    def summary(self, numbers: dict[str, Any]) -> None:
        """Put ``numbers`` (the end-of-run summary: final/best metrics, times, throughput) into the run summary."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(numbers)

    def close(self, preempted: bool = False) -> None:
        """Finish the W&B run (marked as preempted when the job will be requeued)."""
        if self.wandb_run is None:
            return
        if preempted:
            self.wandb_run.mark_preempting()
        self.wandb_run.finish()
        self.wandb_run = None
