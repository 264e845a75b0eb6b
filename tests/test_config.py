"""The config tree: precedence, strictness, and every YAML in configs/ against the schema."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from train.cli import main
from train.config import Config, describe, load_config
from train.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_reference_recipe():
    c = Config()
    assert (c.model.name_or_path, c.data.task, c.data.max_length) == ("bert-base-uncased", "mnli", 128)
    t = c.train
    assert (t.lr, t.effective_batch_size, t.epochs, t.warmup_ratio, t.weight_decay) == (2e-5, 16, 5, 0.0, 0.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.lr_scheduler) == (0.9, 0.999, 1e-8, "linear")
    assert c.eval.batch_size == 16 and c.precision == "auto"


def test_precedence_defaults_yaml_cli(tmp_path):
    p = write(tmp_path, "seed: 7\ntrain:\n  lr: 3.0e-5\n  epochs: 2\n")
    c = load_config(p, ["train.epochs=4"])
    assert (c.seed, c.train.lr, c.train.epochs, c.train.effective_batch_size) == (7, 3e-5, 4, 16)


def test_cli_values_are_typed(tmp_path):
    c = load_config(None, ["train.lr=2e-5", "precision=no", "data.glue_dir=none", "eval.every_epoch=false"])
    assert c.train.lr == 2e-5 and isinstance(c.train.lr, float)
    assert c.precision == "no" and c.data.glue_dir is None and c.eval.every_epoch is False


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: unknown config key 'train\.lrr'.*did you mean 'train\.lr'"
    ):
        load_config(p)


def test_unknown_key_on_cli():
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'data\.taks'"):
        load_config(None, ["data.taks=rte"])


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 'train\.epochs' must be int, got 'three'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"'precision' must be one of"):
        load_config(None, ["precision=fp8"])


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown GLUE task 'mnli2'"):
        load_config(None, ["data.task=mnli2"])


def test_help_lists_every_key_with_doc_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key, doc, _default in describe():
        assert key in text and doc[:30] in text, key
    assert "[default: 2e-05]" in text


def test_cli_error_is_one_line_without_traceback(capsys):
    assert main(["--config", "/nonexistent.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file not found: /nonexistent.yaml") and "Traceback" not in err
    assert main(["--config", str(REPO / "configs")]) == 2  # a folder: which files it holds
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {REPO / 'configs'} is a folder, not a YAML file"), err
    assert "first-run.yaml" in err and err.count("error:") == 1, err


CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))
TRAIN_CONFIGS = [p for p in CONFIG_FILES if "accelerate" not in p.parts]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_train_yaml_loads(path):
    cfg = load_config(path)
    if path.parent.name == "tasks":
        assert cfg.data.task == path.stem
    text = path.read_text()
    assert "effective" in text.lower() and "#" in text, "configs carry their batch arithmetic as comments"


def test_resolved_config_round_trips(tmp_path):
    from train.config import dump

    c = load_config(REPO / "configs" / "smoke.yaml", ["seed=3"])
    p = write(tmp_path, dump(c))
    assert load_config(p) == c
    assert yaml.safe_load(dump(c))["seed"] == 3


def test_bundled_sweep_list_is_27_valid_runs():
    """sweeps/glue.txt (for `sbatch --array=0-26 slurm/sweep.sbatch sweeps/glue.txt`) loads line by line."""
    from train.config import run_folder as output_dir

    runs = [
        ln.split()
        for ln in (REPO / "sweeps" / "glue.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert len(runs) == 27
    dirs = set()
    for task, seed, *overrides in runs:
        cfg = load_config(REPO / "configs" / "tasks" / f"{task}.yaml", [f"seed={seed}", *overrides])
        assert cfg.data.task == task
        dirs.add(output_dir(cfg))
    assert len(dirs) == 27  # every run has its own folder


def test_several_config_files_merge_in_order(tmp_path):
    """--config task.yaml --config model.yaml: later files win key by key, the CLI wins over both."""
    task = write(tmp_path, "data:\n  task: rte\ntrain:\n  lr: 1.0e-5\n  epochs: 3\n")
    model = tmp_path / "m.yaml"
    model.write_text("model:\n  name_or_path: FacebookAI/roberta-base\ntrain:\n  lr: 3.0e-5\n")
    c = load_config([task, model], ["train.epochs=4"])
    assert (c.data.task, c.model.name_or_path, c.train.lr, c.train.epochs) == (
        "rte",
        "FacebookAI/roberta-base",
        3e-5,
        4,
    )
    assert load_config([model, task]).train.lr == 1e-5
    assert main(["--config", str(task), "--config", str(model), "--print-config"]) == 0


def test_sweep_takes_a_model_config(tmp_path):
    from train.sweeps import sweep

    preset = REPO / "configs" / "models" / "roberta-base.yaml"
    (run,) = sweep.plan(["rte"], [1], tmp_path / "out", model_configs=[preset])
    cmd = sweep.train_command(run)
    assert cmd[3:7] == ["--config", str(REPO / "configs/tasks/rte.yaml"), "--config", str(preset)]
    assert f"config={REPO / 'configs/tasks/rte.yaml'} config={preset} output_dir=" in sweep.slurm_line(run)
    assert sweep.check_plan([run]) == []


# ---- declared rules: each key's bounds and choices sit with the key, one generic check applies them ------


def test_a_declared_bound_names_file_key_value_and_range(tmp_path):
    p = write(tmp_path, "train:\n  warmup_ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.warmup_ratio must be in \[0, 1\), got 1\.5$"):
        load_config(p)
    with pytest.raises(
        ConfigError, match=r"^command line: data\.max_train_samples must be at least 1 \(or null\), got 0$"
    ):
        load_config(p, ["train.warmup_ratio=0.1", "data.max_train_samples=0"])
    with pytest.raises(ConfigError, match=r"fast\.buckets must be a non-empty list, each at least 1"):
        load_config(None, ["fast.buckets=64,0"])
    # the final value is the one checked: a later file or the command line may correct an earlier one
    assert load_config(p, ["train.warmup_ratio=0.1"]).train.warmup_ratio == 0.1


def test_a_declared_choice_names_the_nearest(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^command line: unknown GLUE task 'mrcp' for data\.task; did you mean 'mrpc'\? choose one of "
        r"cola, sst2, mrpc,",
    ):
        load_config(None, ["data.task=mrcp"])
    p = write(tmp_path, "precision: bf61\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: 'precision' must be one of \[.*\], got 'bf61'; did you mean 'bf16'"
    ):
        load_config(p)


@pytest.mark.parametrize(
    ("per_device", "expect"),
    [
        (32, r"^train\.per_device_batch_size=32 is larger than train\.effective_batch_size=16$"),
        (
            6,
            r"^train\.per_device_batch_size=6 does not divide train\.effective_batch_size=16.*: 1, 2, 4, 8, 16$",
        ),
    ],
)
def test_a_cross_field_rule_lives_with_its_section(per_device, expect):
    from train.config import TrainConfig

    with pytest.raises(ConfigError, match=expect):
        load_config(None, [f"train.per_device_batch_size={per_device}"])
    with pytest.raises(ConfigError, match=expect):
        TrainConfig(per_device_batch_size=per_device).check()
    assert load_config(None, ["train.effective_batch_size=48", "train.per_device_batch_size=6"])


def _scalar_types(tp) -> set:
    """int and float inside ``int | None``, ``list[int]`` and the like."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list):
        return set().union(*map(_scalar_types, typing.get_args(tp)))
    return {tp}


def _undeclared_numbers(section) -> list[str]:
    from train.config import leaves

    return [
        leaf.key
        for leaf in leaves(section)
        if {int, float} & _scalar_types(leaf.type) and not (leaf.rule.bounded() or leaf.rule.unbounded)
    ]


def test_every_numeric_key_declares_its_bounds():
    """A new int or float key cannot skip validation: it declares bounds (ge=, gt=, le=, lt=) or says why it
    has none (unbounded="..."); and every default passes its own declaration."""
    from dataclasses import dataclass

    from train.config import f, leaves, validate

    assert _undeclared_numbers(Config()) == []
    assert sum(bool({int, float} & _scalar_types(leaf.type)) for leaf in leaves(Config())) >= 25

    @dataclass
    class New:
        bounded: int = f(1, "a count", ge=1)
        free: float = f(0.0, "any offset", unbounded="a shift in either direction is meaningful")
        forgotten: int | None = f(None, "a new key without bounds")

    assert _undeclared_numbers(New()) == ["forgotten"]
    validate(Config())


def test_help_shows_what_each_key_allows():
    from train.tasks import TASKS

    docs = {key: doc for key, doc, _ in describe()}
    assert docs["train.lr"] == "peak learning rate; allowed: > 0"
    assert docs["seed"].endswith("; allowed: in [0, 2^32)")
    assert docs["data.task"] == "GLUE task; allowed: one of " + ", ".join(TASKS)
    assert docs["train.max_steps"].endswith("; allowed: at least 1 or null")
    assert docs["fast.enabled"].endswith("; allowed: one of true, false, auto")
    assert "allowed" not in docs["tracking.wandb.tags"] + docs["overwrite"]
