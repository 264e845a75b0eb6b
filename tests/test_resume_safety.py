"""A resume trusts nothing it reads: no code runs from a checkpoint's files, and changed data or a damaged
result is refused, naming the file.

Real runs of the program (``python -m train``) on the bundled tiny model and sample. The checkpoints are the
program's own, then changed as a user (or an attacker handing over a run folder) could: every pickle-capable
file replaced by a pickle whose loading would create a marker file; the training file cut short between
interrupt and resume; ``eval_results.json`` truncated. docs/reliability.md lists the classes and these tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE, load_weights, run_train

from train.engine import checkpoint

SAMPLE = REPO / "train" / "assets" / "glue_sample"
QUICK = ["train.max_steps=6", "train.log_every=2", "eval.every_epoch=false", "data.max_eval_samples=32"]
EXACT = ["checkpoint.every_steps=2", "checkpoint.keep_last=3"]
PICKLE_CAPABLE = (".pkl", ".bin", ".pt", ".pth")


class Payload:
    """Unpickled without restriction, this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def train(out: Path, *extra: str, glue: Path | None = None) -> subprocess.CompletedProcess:
    data = [f"data.glue_dir={glue}"] if glue else []
    return run_train(
        ["--config", str(SMOKE), f"output_dir={out}", *QUICK, *EXACT, *data, *extra], check=False
    )


def one_error(proc: subprocess.CompletedProcess, *texts: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in texts:
        assert text in errors[0], f"{text!r} not in: {errors[0]}"
    return errors[0]


def snapshot(folder: Path, but: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and str(p.relative_to(folder)) not in but
    }


# A refused resume leaves every file as it was, config.yaml included (the start writes it only once the checkpoint
# is restored).
REWRITTEN: tuple[str, ...] = ()


def unfinish(run: Path) -> Path:
    """The run as a kill before its end leaves it: no results, no exported models, the last checkpoint gone."""
    for name in ("eval_results.json", "final", "best", "predictions", "checkpoints/step-00000006"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run on a copy of the bundled sample with checkpoints at steps 2, 4 and 6; tests use copies."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(SAMPLE, root / "glue")
    out = root / "run"
    proc = train(out, glue=root / "glue")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(finished: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the run folder and of its data (the data path is the config's: the same for every copy)."""
    shutil.copytree(finished, dest / "run")
    return dest / "run", finished.parent / "glue"


# ----------------------------------------------------------------------------------------------------------
# no code from files


def _poison(path: Path, marker: Path, zipped: bool) -> None:
    if zipped:  # torch's own format (a zip holding data.pkl)
        torch.save({"state": Payload(marker)}, path)
    else:  # a plain pickle, as Accelerate's random states and custom objects were
        path.write_bytes(pickle.dumps({"state": Payload(marker)}))


def forge_manifest(folder: Path) -> None:
    """``files.json`` that vouches for the files as they are now (whoever wrote the folder can write it)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (checkpoint.MANIFEST, checkpoint.MARKER):
            files[str(p.relative_to(folder))] = [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
    (folder / checkpoint.MANIFEST).write_text(json.dumps(files))


def poison_checkpoint(folder: Path, marker: Path, manifest: str) -> list[str]:
    """Every pickle-capable file of a checkpoint, and those of the older layout (Accelerate's random states and
    custom-object pickles, a pickled model), replaced by payloads. ``manifest``: forged, kept or removed."""
    state = json.loads((folder / checkpoint.STATE).read_text())
    state.pop("scheduler")  # as written before the schedule was JSON: the pickle is what would be read
    (folder / checkpoint.STATE).write_text(json.dumps(state))
    (folder / "rng_state_0.json").unlink()
    (folder / "model.safetensors").unlink()  # Accelerate then reads pytorch_model.bin
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "pytorch_model.bin", "scheduler.bin"):
        (folder / name).touch()
    names = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_CAPABLE)
    for i, name in enumerate(names):
        _poison(folder / name, marker, zipped=i % 2 == 0)
    if manifest == "forged":
        forge_manifest(folder)
    elif manifest == "removed":
        (folder / checkpoint.MANIFEST).unlink()
    return names


@pytest.mark.parametrize("manifest", ["forged", "removed"])
def test_resume_path_runs_no_code_from_the_checkpoint(finished, tmp_path, manifest):
    run, glue = copy_run(finished, tmp_path)
    ckpt = run / "checkpoints" / "step-00000004"
    marker = tmp_path / "code-ran"
    names = poison_checkpoint(ckpt, marker, manifest)
    assert {"optimizer.bin", "pytorch_model.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= set(
        names
    )
    before = snapshot(run)
    error = one_error(
        train(tmp_path / "new", f"checkpoint.resume={ckpt}", glue=glue), "is not loaded", "could run code"
    )
    assert any(f"{ckpt / name} " in error for name in names), error  # names the file
    assert not marker.exists()
    assert snapshot(run) == before


def test_resume_auto_in_a_handed_over_folder_runs_no_code(finished, tmp_path):
    """Someone else's run folder, every checkpoint poisoned, each with a manifest that vouches for it."""
    run, glue = copy_run(finished, tmp_path)
    unfinish(run)
    marker = tmp_path / "code-ran"
    for ckpt in (run / "checkpoints").glob("step-*"):
        poison_checkpoint(ckpt, marker, "forged")
    one_error(train(run, glue=glue), "step-00000004", "is not loaded", "could run code")
    assert not marker.exists()
    # with the manifest the program wrote, the damage check alone finds every replaced file (nothing loaded)
    run2, _ = copy_run(finished, tmp_path / "kept")
    unfinish(run2)
    for ckpt in (run2 / "checkpoints").glob("step-*"):
        poison_checkpoint(ckpt, marker, "kept")
    one_error(train(run2, glue=glue), "no usable checkpoint", "step-00000004: ", "step-00000002: ")
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "pytorch_model.bin"]
)
def test_each_pickle_capable_file_is_named_when_it_holds_more_than_tensors(finished, tmp_path, name):
    """One file at a time, in the layout where it is read (Accelerate ignores a random-state file it cannot
    load: the error still names it)."""
    run, glue = copy_run(finished, tmp_path)
    ckpt = run / "checkpoints" / "step-00000004"
    marker = tmp_path / "code-ran"
    if name == "random_states_0.pkl":
        (ckpt / "rng_state_0.json").unlink()
    if name == "custom_checkpoint_0.pkl":
        state = json.loads((ckpt / checkpoint.STATE).read_text())
        del state["scheduler"]
        (ckpt / checkpoint.STATE).write_text(json.dumps(state))
    if name == "pytorch_model.bin":
        (ckpt / "model.safetensors").unlink()
    _poison(ckpt / name, marker, zipped=name.endswith(".bin"))
    (ckpt / checkpoint.MANIFEST).unlink()
    one_error(train(tmp_path / "new", f"checkpoint.resume={ckpt}", glue=glue), f"{ckpt / name} is not loaded")
    assert not marker.exists()


def test_a_checkpoint_holds_no_pickle_of_the_programs_own_state_and_resumes_exactly(finished, tmp_path):
    """The schedule and the random generators are JSON; a resume from step 2 ends as the uninterrupted run."""
    ckpt = finished / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_CAPABLE) == ["optimizer.bin"]
    saved = json.loads((ckpt / checkpoint.STATE).read_text())
    assert saved["scheduler"]["last_epoch"] == 4
    assert set(json.loads((ckpt / "rng_state_0.json").read_text())) >= {"python", "numpy", "torch"}
    run, glue = copy_run(finished, tmp_path)
    unfinish(run)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    proc = train(run, glue=glue)
    assert proc.returncode == 0 and "step-00000002 at step 2" in proc.stderr, proc.stderr[-3000:]
    ref, got = load_weights(finished), load_weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def to_old_layout(ckpt: Path) -> None:
    """The checkpoint as written before its states were JSON: Accelerate's pickles of the random generators
    and of the schedule (registered as a custom object), and no manifest."""
    import numpy as np

    state = json.loads((ckpt / checkpoint.STATE).read_text())
    torch.save(state.pop("scheduler"), ckpt / "custom_checkpoint_0.pkl")
    (ckpt / checkpoint.STATE).write_text(json.dumps(state))
    rng = json.loads((ckpt / "rng_state_0.json").read_text())
    version, internal, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    old = {
        "step": rng["accelerator_step"],
        "random_state": (version, tuple(internal), gauss),
        "numpy_random_seed": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch_manual_seed": torch.tensor(rng["torch"], dtype=torch.uint8),
    }
    torch.save(old, ckpt / "random_states_0.pkl")
    (ckpt / "rng_state_0.json").unlink()
    (ckpt / checkpoint.MANIFEST).unlink()


def test_a_checkpoint_of_the_older_layout_resumes_exactly_weights_only(finished, tmp_path):
    run, glue = copy_run(finished, tmp_path)
    unfinish(run)
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    to_old_layout(run / "checkpoints" / "step-00000002")
    proc = train(run, glue=glue)
    assert proc.returncode == 0 and "step-00000002 at step 2" in proc.stderr, proc.stderr[-3000:]
    ref, got = load_weights(finished), load_weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_compile_cache_folder_of_someone_else_is_not_used(tmp_path):
    from train.engine.compile_cache import check_own
    from train.errors import ConfigError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "fxgraph").mkdir()
    with pytest.raises(ConfigError, match="not made by glue-train"):
        check_own(foreign)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match="other users can write to it"):
        check_own(shared)
    fresh = tmp_path / "fresh" / "compile"
    check_own(fresh)  # made here: marked, only this user may write
    assert (fresh / ".glue-train-compile-cache").is_file() and fresh.stat().st_mode & 0o077 == 0
    (fresh / "fxgraph").mkdir()
    check_own(fresh)  # and used again


# ----------------------------------------------------------------------------------------------------------
# a resume sees what changed


@contextmanager
def edited(path: Path, text: str):
    """``path`` holds ``text`` inside the block (the run's data: its path is in the config, so it is edited in
    place and put back)."""
    old = path.read_bytes()
    path.write_text(text)
    try:
        yield path
    finally:
        path.write_bytes(old)


def test_a_training_file_cut_between_interrupt_and_resume_is_refused(finished, tmp_path):
    """The named case: the training file cut from 512 rows to 40 used to 'finish' past its last epoch after
    0 steps. Both ways to resume: the same folder (auto) and a checkpoint path."""
    run, glue = copy_run(finished, tmp_path)
    unfinish(run)
    train_tsv = glue / "SST-2" / "train.tsv"
    before = snapshot(run, REWRITTEN)
    with edited(train_tsv, "".join(train_tsv.read_text().splitlines(keepends=True)[:41])):
        one_error(
            train(run, glue=glue),
            f"{train_tsv.resolve()} (train split)",
            "512 rows then, 40 now",
            "overwrite=true",
        )
        ckpt = run / "checkpoints" / "step-00000004"
        one_error(
            train(tmp_path / "new", f"checkpoint.resume={ckpt}", glue=glue),
            f"checkpoint {ckpt} was trained on other data",
            "512 rows then, 40 now",
            "checkpoint.resume=never",
        )
    assert snapshot(run, REWRITTEN) == before


def test_a_changed_dev_file_is_refused_and_the_data_as_it_was_resumes(finished, tmp_path):
    """One word of the dev file changed, its rows kept: refused by content; put back, the run resumes."""
    run, glue = copy_run(finished, tmp_path)
    unfinish(run)
    dev = glue / "SST-2" / "dev.tsv"
    before = snapshot(run, REWRITTEN)
    text = dev.read_text()
    assert " the " in text
    with edited(dev, text.replace(" the ", " a ", 1)):
        one_error(
            train(run, glue=glue),
            f"{dev.resolve()} (validation split): its content changed",
            "Put the data back as it was",
        )
    assert snapshot(run, REWRITTEN) == before
    proc = train(run, glue=glue)
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    ref, got = load_weights(finished), load_weights(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("damage", ['{"task": "sst2", "final": {"st', "[]", ""])
def test_a_finished_run_with_damaged_results_is_refused_not_retrained(finished, tmp_path, damage):
    run, glue = copy_run(finished, tmp_path)
    (run / "eval_results.json").write_text(damage)
    before = snapshot(run)
    one_error(
        train(run, glue=glue), f"{run}", "eval_results.json is damaged", "overwrite=true", "glue-train train"
    )
    assert snapshot(run) == before  # best/ and final/ untouched
    if damage != "[]":
        return
    error = one_error(train(run, glue=glue))  # the command it names trains again, the old run kept aside
    again = error.split(": glue-train train ", 1)[1]
    assert again.endswith("overwrite=true")
    proc = run_train(shlex.split(again), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (moved,) = run.glob("previous-*")
    assert (moved / "final" / "model.safetensors").read_bytes() == before["final/model.safetensors"]
    assert json.loads((run / "eval_results.json").read_text())["final"]


def test_the_report_calls_a_run_with_damaged_results_damaged(finished, tmp_path):
    from train.folders.runs import scan
    from train.sweeps.report import main as report

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copytree(finished, sweep / "sst2-s1")
    shutil.copytree(finished, sweep / "sst2-s2")
    (sweep / "sst2-s2" / "eval_results.json").write_text('{"task": "sst2", "fin')
    records = {r.name: r for r in scan(sweep)}
    assert records["sst2-s1"].status == "finished"
    assert records["sst2-s2"].status == "damaged" and "eval_results.json" in records["sst2-s2"].note
    assert report([str(sweep), "--out", str(tmp_path / "out"), "--no-submission"]) == 0
    seed = records["sst2-s2"].seed
    assert (
        f"`sst2-s2` (sst2, seed {seed}): **damaged**: eval_results.json cannot be read"
        in (tmp_path / "out" / "results.md").read_text()
    )


@pytest.mark.slow
def test_deepspeeds_own_checkpoint_files_run_no_code(tmp_path):
    """DeepSpeed's engine loads its files with ``weights_only=False``; while a checkpoint is restored every load
    is weights-only (its data classes allowed), so a payload in one of them is named, not run. (That intact ZeRO
    checkpoints load so: test_deepspeed.py::test_zero3_resume_after_sigterm.)"""
    from conftest import accelerate_cmd

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = ["--config", str(SMOKE), f"output_dir={out}", "precision=no", "train.per_device_batch_size=4"]
        args += ["data.max_train_samples=64", "data.max_eval_samples=16", "eval.predict_test=false"]
        args += ["train.max_steps=2", "checkpoint.every_steps=2", *extra]
        cmd = accelerate_cmd(["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml")], 2, args)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    first = launch(tmp_path / "run")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    marker = tmp_path / "code-ran"
    shards = sorted(ckpt.rglob("*optim_states.pt"))
    assert shards
    for shard in shards:
        _poison(shard, marker, zipped=True)
    forge_manifest(ckpt)
    proc = launch(tmp_path / "new", f"checkpoint.resume={ckpt}")
    text = proc.stdout + proc.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "optim_states.pt is not loaded" in errors[0], text[-3000:]
    # the first worker to stop exits 2 without a traceback of its own (the launcher then ends the other and
    # prints its ChildFailedError)
    assert proc.returncode != 0 and "failed (exitcode: 2)" in text, text[-3000:]
    assert text.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in text, text[-3000:]
    assert not marker.exists()


DCP_SCRIPT = """
import os, pickle, sys
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from train.engine import safe_state
from train.errors import CheckpointError

folder, marker, control = sys.argv[1:4]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (1,))

def sharded():  # as FSDP2 holds them: DTensors, and the optimizer's state
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    return {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in msd.items()}, osd

msd, osd = sharded()
dcp.save({"model": msd, "optimizer": osd}, storage_writer=dcp.FileSystemWriter(folder))
into, into_opt = sharded()
for v in into.values():
    v.to_local().zero_()
with safe_state.weights_only():
    dcp.load({"model": into, "optimizer": into_opt}, storage_reader=dcp.FileSystemReader(folder))
assert all(torch.equal(into[k].full_tensor(), msd[k].full_tensor()) for k in msd)
print("intact: loaded")

class Payload:
    def __init__(self, path):
        self.path = path
    def __reduce__(self):
        return (open, (self.path, "w"))

with open(os.path.join(folder, ".metadata"), "wb") as fh:
    pickle.dump(Payload(marker), fh)
try:
    with safe_state.weights_only():
        dcp.load({"model": into}, storage_reader=dcp.FileSystemReader(folder))
except CheckpointError as e:
    print("refused:", e)
with open(control, "wb") as fh:  # the control: torch's reader without the guard runs the payload
    pickle.dump(Payload(control + ".ran"), fh)
with open(control, "rb") as fh:
    filesystem.pickle.load(fh)
"""


def test_fsdps_sharded_checkpoint_metadata_runs_no_code(tmp_path):
    """FSDP's sharded state goes through torch's distributed checkpoint, which reads ``.metadata`` with plain
    pickle: under the guard only its data classes load (a real DTensor checkpoint, one gloo process)."""
    import sys

    from conftest import free_port

    marker, control = tmp_path / "code-ran", tmp_path / "control.pkl"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0"}
    env.update(WORLD_SIZE="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-c", DCP_SCRIPT, str(tmp_path / "ckpt"), str(marker), str(control)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "intact: loaded" in proc.stdout
    assert f"refused: checkpoint file {tmp_path / 'ckpt' / '.metadata'} is not loaded" in proc.stdout
    assert not marker.exists()
    assert Path(str(control) + ".ran").exists()  # the same payload unguarded: the test can fail
