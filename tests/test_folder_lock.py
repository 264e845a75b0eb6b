"""One run per folder (train/folders/lock.py): real starts of the program, real holders, real kill -9.

A holder is a real process: a training run of the program, or a small Python process that takes the lock with
the library (``holder``) and keeps it until the test lets it go or kills it. Locks of holders that cannot exist
on this machine (another host, an earlier start of a SLURM job) are written as files, the way such a holder
would have left them; everything else is the real program on the bundled tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, run_train

from train.cli import main
from train.errors import FolderInUse
from train.folders import lock
from train.tracking.tracker import read_metrics

QUICK = ["train.log_every=2", "eval.every_epoch=false", "data.max_eval_samples=32", "eval.predict_test=false"]
HOLD = textwrap.dedent(
    """\
    import sys
    from train.folders import lock
    with lock.holding(sys.argv[1], sys.argv[2], what="the folder", advice="wait"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills this process)
    """
)


def train(out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_train(["--config", str(SMOKE), f"output_dir={out}", *QUICK, *extra], check=False, **kw)


def one_error(proc: subprocess.CompletedProcess, *texts: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in texts:
        assert text in errors[0], f"{text!r} not in: {errors[0]}"
    return errors[0]


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stderr


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


@contextlib.contextmanager
def holder(folder: Path, command: str = "train"):
    """A real process holding ``folder``'s lock until the block ends (then it exits and gives it back)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == b"held"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
        proc.wait(timeout=30)


def forge(folder: Path, **fields) -> Path:
    """A lock as a holder elsewhere would have left it (this machine's record, with ``fields`` changed)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {**lock.my_record("train"), **fields}
    path = folder / lock.LOCK
    path.write_text(json.dumps(record))
    return path


def in_background(fn, *args, **kw) -> tuple[threading.Thread, list]:
    box: list = []
    thread = threading.Thread(target=lambda: box.append(fn(*args, **kw)), daemon=True)
    thread.start()
    return thread, box


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def holder_pid(out: Path) -> int | None:
    try:
        return json.loads((out / lock.LOCK).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------------------
# the program


def test_two_starts_at_once_one_trains_the_other_names_the_holder(tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=16", "checkpoint.every_steps=4")
    (t1, a), (t2, b) = in_background(train, out, *args), in_background(train, out, *args)
    t1.join(300)
    t2.join(300)
    procs = sorted(a + b, key=lambda p: p.returncode)
    assert [p.returncode for p in procs] == [0, 2], [p.stderr[-2000:] for p in procs]
    line = one_error(
        procs[1],
        f"output_dir {out} is in use by glue-train train (pid ",
        f"on host {socket.gethostname()}, since ",
        "it is still running",
        "use another output_dir",
    )
    assert "ago" in line
    assert train_steps(out) == list(range(2, 17, 2))  # every row once: the second start wrote nothing
    assert not (out / lock.LOCK).exists()  # given back at the end


def test_a_lock_left_by_kill_9_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=400", "checkpoint.every_steps=8")
    thread, box = in_background(train, out, *args)
    wait_for(lambda: holder_pid(out) is not None and (out / "metrics.jsonl").exists(), what="a running run")
    pid = holder_pid(out)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert box[0].returncode == -signal.SIGKILL
    assert holder_pid(out) == pid  # the dead run's lock is still there
    log = ok(train(out, *args))
    assert f"output_dir {out}: took over the lock of glue-train train (pid {pid} on host" in log
    assert f"process {pid} is no longer running" in log
    assert (out / "eval_results.json").exists() and not (out / lock.LOCK).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_give_the_folder_back(tmp_path, signum):
    out = tmp_path / "run"
    thread, box = in_background(train, out, "train.max_steps=400", "checkpoint.every_steps=8")
    wait_for(lambda: holder_pid(out) is not None and (out / "metrics.jsonl").exists(), what="a running run")
    os.kill(holder_pid(out), signum)
    thread.join(120)
    assert box[0].returncode == (130 if signum == signal.SIGINT else 0), box[0].stderr[-3000:]
    assert not (out / lock.LOCK).exists()


def test_a_holder_on_another_host_is_named_and_taken_over_once_abandoned(tmp_path):
    out = tmp_path / "run"
    path = forge(out, host="node-elsewhere", boot="other", pid=4242, slurm_job=None)
    before = path.read_bytes()
    one_error(
        train(out, "train.max_steps=4"),
        "glue-train train (pid 4242 on host node-elsewhere",
        "runs on another machine (node-elsewhere), where this process cannot check whether pid 4242 is alive",
        "counts as abandoned 10 min after its last refresh",
        f"delete {path} and rerun",
    )
    assert sorted(p.name for p in out.iterdir()) == [lock.LOCK] and path.read_bytes() == before
    old = time.time() - 700  # no refresh for 11+ minutes: its holder is gone
    os.utime(path, (old, old))
    log = ok(train(out, "train.max_steps=4"))
    assert "took over the lock of glue-train train (pid 4242 on host node-elsewhere" in log
    assert "has not refreshed its lock for 1" in log and not path.exists()


def test_a_failed_or_refused_start_leaves_no_lock_and_no_folder(tmp_path):
    out = tmp_path / "new" / "run"
    one_error(train(out, "data.glue_dir=/no/such/glue"), "/no/such/glue")
    assert not (tmp_path / "new").exists()  # the folders this start created are gone with its lock
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("notes")
    one_error(train(mine), "not made by this program")
    assert [p.name for p in mine.iterdir()] == ["notes.md"]  # not even a lock file was written there


# ----------------------------------------------------------------------------------------------------------
# who counts as gone


def test_a_requeued_slurm_job_takes_over_its_earlier_start(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    forge(folder, host="node-a", boot="x", slurm_job="777", slurm_restart=0)  # fresh, on another node
    with caplog.at_level("WARNING", logger="train.folders.lock"):
        lock.acquire(folder, "train", what="f", advice="a").release()
    assert "earlier start of this SLURM job 777, which has been requeued since" in caplog.text
    for other in ({"slurm_job": "777", "slurm_restart": 1}, {"slurm_job": "778", "slurm_restart": 0}):
        forge(folder, host="node-a", boot="x", **other)  # the same start of the job, or another job
        with pytest.raises(FolderInUse, match="runs on another machine"):
            lock.acquire(folder, "train", what="f", advice="a")


def test_a_reused_pid_or_a_zombie_is_no_holder(tmp_path, caplog):
    folder = tmp_path / "run"
    forge(folder, pid=os.getpid(), started="1")  # this pid is alive, but not since the lock's start time
    with caplog.at_level("WARNING", logger="train.folders.lock"):
        lock.acquire(folder, "train", what="f", advice="a").release()
    assert f"pid {os.getpid()} now belongs to another process" in caplog.text
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: lock._proc_stat(child.pid)[0] == "Z", what="a zombie")  # ended, not collected yet
    forge(folder, pid=child.pid, started=lock._proc_stat(child.pid)[1])
    lock.acquire(folder, "train", what="f", advice="a").release()
    assert f"process {child.pid} is no longer running" in caplog.text
    child.wait()


def test_a_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    """The heartbeat that tells other hosts the holder is alive; it stops once the lock is given back."""
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    held = lock.acquire(tmp_path / "run", "train", what="f", advice="a")
    old = time.time() - 3600
    os.utime(held.path, (old, old))
    wait_for(lambda: time.time() - held.path.stat().st_mtime < 60, timeout=10, what="a heartbeat")
    held.release()
    assert not held.path.exists() and not (tmp_path / "run").exists()  # the folder it made, empty, is gone


RACE = textwrap.dedent(
    """\
    import sys, time
    from train.errors import FolderInUse
    from train.folders import lock
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
    try:
        held = lock.acquire(sys.argv[1], "train", what="f", advice="a")
    except FolderInUse:
        print("lost", flush=True)
    else:
        print("won", flush=True)
        time.sleep(2)
        held.release()
    """
)


@pytest.mark.parametrize("stale", [False, True])
def test_many_processes_race_for_one_folder(tmp_path, stale):
    """Six real processes at the same moment, on a free folder or one with a stale lock: exactly one wins."""
    folder = tmp_path / "run"
    if stale:
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        forge(folder, pid=int(gone.stdout), started="1")
    at = str(time.time() + 1.5)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(folder), at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    said = sorted(o.decode().strip() for o, _ in outs)
    assert said == ["lost"] * 5 + ["won"], [e.decode()[-500:] for _, e in outs]
    takeovers = sum(e.decode().count("took over the lock") for _, e in outs)
    assert takeovers == (1 if stale else 0)
    assert not (folder / lock.LOCK).exists() and not list(folder.glob(lock.LOCK + ".*"))


# ----------------------------------------------------------------------------------------------------------
# report, card and a running run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "sst2-s1"
    ok(train(out, "train.max_steps=4", "eval.predict_test=true"))
    return out


def test_report_and_card_while_a_run_holds_its_folder(finished, tmp_path, capsys):
    readmes = {w: (finished / w / "README.md").read_bytes() for w in ("best", "final")}
    with holder(finished):  # a run training in the folder
        assert main(["card", str(finished)]) == 2
        err = capsys.readouterr().err
        assert f"run folder {finished} is in use by glue-train train" in err and "rerun when" in err
        assert main(["report", str(finished)]) == 2  # would draw curves.png into the run's folder
        assert "write the report elsewhere with --out DIR" in capsys.readouterr().err
        assert main(["report", str(finished), "--out", str(tmp_path / "plots")]) == 0  # reading is fine
        assert (tmp_path / "plots" / "curves.png").is_file()
        assert main(["report", str(finished.parent), "--no-submission"]) == 0  # writes into the sweep folder
        assert (finished.parent / "results.md").is_file()
    assert {w: (finished / w / "README.md").read_bytes() for w in ("best", "final")} == readmes
    assert not (finished / lock.LOCK).exists()


def test_a_second_writer_waits_for_a_short_one(finished, capsys):
    """A report holding the sweep folder is waited for (a report takes seconds), not refused."""
    sweep_dir = finished.parent
    with holder(sweep_dir, "report") as proc:
        threading.Timer(1.5, proc.stdin.close).start()
        t0 = time.monotonic()
        assert main(["report", str(sweep_dir), "--no-submission"]) == 0, capsys.readouterr().err
        assert time.monotonic() - t0 >= 1.4


# ----------------------------------------------------------------------------------------------------------
# several ranks of one run


def test_ranks_of_one_launch_take_the_lock_once(tmp_path):
    """Two processes under torchrun: only rank 0 takes the lock; the other rank waits for it. Refused while
    another run holds the folder (one error, nothing written); after that holder is killed, rank 0 takes the
    stale lock over (one warning) and both ranks train."""
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), f"output_dir={out}", *QUICK, "train.max_steps=4"]
    with holder(out) as proc:
        refused = run_train(args, nproc=2, check=False, timeout=300)
        proc.kill()
    assert refused.returncode != 0
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and f"output_dir {out} is in use by glue-train train" in errors[0], refused.stderr
    assert sorted(p.name for p in out.iterdir()) == [lock.LOCK]  # nothing of the refused run
    done = run_train(args, nproc=2, timeout=300)
    assert done.stderr.count("took over the lock") == 1, done.stderr[-3000:]
    assert train_steps(out) == [2, 4] and not (out / lock.LOCK).exists()
