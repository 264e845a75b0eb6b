"""The contract under odd and damaged input, drawn by hypothesis: every command ends in exit 0 with a sensible result
or exit 2 with one ``error:`` paragraph and no traceback, leaves the user's files byte-identical, within 60 s.

What is drawn: every config key (enumerated from the config tree, train/config.py) with values of other types
and out of range, on the command line and in a YAML file; mutated TSV bytes, rows, labels and encodings of every
task's files; truncated, garbled or replaced files of a model folder (config, weights, tokenizer); damaged files
of a finished run folder and of its checkpoints. Cheap checks run in this process where the program allows (the
config check of ``--print-config``, the TSV reader, the model and tokenizer loaders); the real program runs
for a few examples (``slow``).

CI draws a fixed, bounded set of examples (derandomized, no database): about 15 s in the fast suite, about
2 minutes in the slow one. ``FUZZ_EXAMPLES=500`` draws that many per test, at random, and keeps hypothesis's
database (.hypothesis/) so that a failure is replayed first. A shrunk failure is fixed at its mechanism and kept as
a plain regression test (tests/test_inputs.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SMOKE, run_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.config import Config, leaves, load_config
from train.errors import UserError
from train.tasks import TASKS

SAMPLE = REPO / "train" / "assets" / "glue_sample"
FIXTURES = REPO / "tests" / "fixtures"
TINY = REPO / "train" / "assets" / "tiny-bert"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
LIMIT_S = 60  # the contract: every input is answered within this


def budget(ci: int) -> settings:
    """``ci`` fixed examples (the same every run), or FUZZ_EXAMPLES random ones."""
    common = {"deadline": None, "suppress_health_check": list(HealthCheck)}
    if EXAMPLES:
        return settings(max_examples=EXAMPLES, **common)
    return settings(max_examples=ci, derandomize=True, database=None, **common)


# ----------------------------------------------------------------------------------------------------------
# the contract


def digest(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths``: the user's files, compared before and after."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def holds(rc: int, stderr: str, elapsed: float, what: str) -> None:
    """Exit 0, or exit 2 with exactly one ``error:`` paragraph; never a traceback; within the limit."""
    assert "Traceback" not in stderr, f"{what}: a traceback\n{stderr[-3000:]}"
    assert elapsed < LIMIT_S, f"{what}: took {elapsed:.0f} s"
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    if rc == 0:
        assert not errors, f"{what}: exit 0 with {errors}"
    else:
        assert rc == 2, f"{what}: exit {rc}\n{stderr[-3000:]}"
        assert len(errors) == 1, f"{what}: {len(errors)} error paragraphs\n{stderr[-3000:]}"
        assert len(errors[0]) > len("error: ") + 20, f"{what}: an error that says nothing: {errors[0]!r}"


def in_process(call, what: str):
    """``call()`` as the program's boundary sees it: a result, or a UserError (any other exception is a bug and
    fails the test with its traceback). Returns the result or the UserError."""
    try:
        return call()
    except UserError as e:
        assert str(e).strip(), f"{what}: an empty error"
        assert "\n" not in str(e).strip(), f"{what}: an error of several lines: {e}"
        return e


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``glue-train ARGV`` in this process (only for commands that stop before importing torch's world)."""
    from train.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------------------
# odd values

KEYS = [
    leaf.key for leaf in leaves(Config())
]  # every key of the tree: a new key is fuzzed without a change here
ODD_TEXT = [
    "",
    " ",
    "none",
    "null",
    "~",
    "yes",
    "no",
    "on",
    "true",
    "1e400",
    "-0",
    "0x10",
    "1_000",
    "2**32",
    "4294967296",
    "-1",
    "0",
    "0.5",
    "nan",
    "-inf",
    "{task}",
    "{",
    "}",
    "{seed:zz}",
    "{0}",
    "$NOPE_NOT_SET",
    "~/x",
    "builtin:nope",
    "builtin:tiny-bert",
    "a,b",
    ",",
    "[1",
    "[]",
    "{}",
    "\x00",
    "é",
    "💥",
    "../..",
    "/",
    "x" * 300,
    "auto",
    "never",
]
values = st.one_of(
    st.sampled_from(ODD_TEXT),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def as_cli(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@budget(150)
@given(key=st.sampled_from(KEYS), value=values)
def test_every_key_on_the_command_line(key: str, value) -> None:
    rc, _, err = cli(["train", "--config", str(SMOKE), "--print-config", f"{key}={as_cli(value)}"])
    holds(rc, err, 0, f"{key}={as_cli(value)!r}")


@budget(80)
@given(key=st.sampled_from(KEYS), value=values, garble=st.integers(0, 3))
def test_every_key_in_a_yaml_file(key: str, value, garble: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        text = yaml.safe_dump(nested(key, value), allow_unicode=True)
        if garble == 1:
            text = text[: len(text) // 2]  # cut in the middle of a line
        elif garble == 2:
            text = text.replace(":", "", 1)  # a key without its colon
        path.write_text(text, encoding="utf-8")
        before = digest(path)
        rc, _, err = cli(["train", "--config", str(path), "--print-config"])
        holds(rc, err, 0, f"{key}: {value!r} (garble {garble}) in a YAML file")
        assert digest(path) == before


@budget(40)
@given(data=st.binary(max_size=200), keep=st.integers(0, 400))
def test_a_damaged_config_file(data: bytes, keep: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        raw = SMOKE.read_bytes()
        path.write_bytes(raw[:keep] + data + raw[keep:])
        before = digest(path)
        rc, _, err = cli(["train", "--config", str(path), "--print-config"])
        holds(rc, err, 0, f"smoke.yaml with {data!r} at byte {keep}")
        assert digest(path) == before


# ----------------------------------------------------------------------------------------------------------
# TSV files: bytes, rows, labels, encodings


def _glue_files() -> list[tuple[str, Path]]:
    """(task, file) for every task with a local sample: the bundled GLUE sample and the test fixtures."""
    found = []
    for name, task in TASKS.items():
        for split in task.splits:
            for root in (SAMPLE, FIXTURES):
                if (root / split.tsv).is_file():
                    found.append((name, split.name, root))
                    break
    return found


GLUE_FILES = _glue_files()


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    """``raw`` with one drawn damage: bytes cut, replaced or inserted, a row or a field replaced, other line ends
    or another encoding."""
    kind = draw(
        st.sampled_from(["cut", "bytes", "insert", "row", "field", "label", "line-ends", "encoding", "empty"])
    )
    lines = raw.split(b"\n")
    if kind == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if kind == "bytes":
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at + 8 :]
    if kind == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if kind in ("row", "field", "label"):
        n = draw(st.integers(0, max(0, len(lines) - 2)))
        fields = lines[n].split(b"\t")
        text = draw(st.one_of(st.text(max_size=20), st.sampled_from(ODD_TEXT))).encode(
            "utf-8", "surrogatepass"
        )
        if kind == "row":
            lines[n] = text
        else:
            at = len(fields) - 1 if kind == "label" else draw(st.integers(0, len(fields) - 1))
            fields[at] = text
            lines[n] = b"\t".join(fields)
        return b"\n".join(lines)
    if kind == "line-ends":
        return raw.replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r", b"\n\n", b"\x85", b"\r\r\n"])))
    if kind == "encoding":
        text = raw.decode("utf-8-sig")
        codec = draw(st.sampled_from(["latin-1", "utf-16", "utf-8-sig", "cp1252", "utf-32"]))
        return text.encode(codec, "replace")
    return b""


def _sensible(columns, task) -> None:
    """What a read split may hold: texts, and labels of the task (or -1 for test rows)."""
    n = len(columns["idx"])
    assert all(len(columns[c]) == n for c in (*task.text_columns, "label"))
    for label in columns["label"]:
        if label == -1:
            continue
        if task.is_regression:
            lo, hi = task.score_range or (-math.inf, math.inf)
            assert isinstance(label, float) and math.isfinite(label) and lo <= label <= hi
        else:
            assert isinstance(label, int) and 0 <= label < task.num_labels


@budget(200)
@given(data=st.data(), which=st.sampled_from(GLUE_FILES))
def test_a_damaged_tsv_file(data, which) -> None:
    from train.data.glue import read_tsv

    name, split_name, root = which
    task = TASKS[name]
    split = next(s for s in task.splits if s.name == split_name)
    raw = (root / split.tsv).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / split.tsv
        path.parent.mkdir(parents=True)
        path.write_bytes(data.draw(mutated(raw)))
        before = digest(path)
        got = in_process(lambda: read_tsv(path, task, split), f"{name} {split_name}")
        if not isinstance(got, UserError):
            _sensible(got, task)
        assert digest(path) == before


# ----------------------------------------------------------------------------------------------------------
# model folders: config, weights, tokenizer

MODEL_FILES = sorted(p.name for p in TINY.iterdir())


@st.composite
def damaged_file(draw, raw: bytes, name: str) -> bytes | None:
    """``raw`` truncated, garbled, emptied or (JSON files) replaced by another JSON value; None: deleted."""
    kind = draw(st.sampled_from(["cut", "garble", "empty", "delete", "json"]))
    if kind == "cut":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "garble":
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at + 16 :]
    if kind == "empty":
        return b""
    if kind == "delete":
        return None
    if name.endswith(".json"):
        data = json.loads(raw)
        if isinstance(data, dict) and data and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(data)))
            data[key] = draw(values)  # one field of another type or out of range
        else:
            data = draw(values)
        return json.dumps(data).encode()
    return raw[::-1]


def damage_model(data, folder: Path) -> str:
    shutil.copytree(TINY, folder)
    name = data.draw(st.sampled_from(MODEL_FILES))
    new = data.draw(damaged_file((folder / name).read_bytes(), name))
    if new is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(new)
    return name


def load_both(folder: Path, task: str = "sst2"):
    from train.model.load import load_model, load_tokenizer, model_inputs

    cfg = load_config(SMOKE, [f"model.name_or_path={folder}", f"data.task={task}"])
    tok = load_tokenizer(cfg)
    model = load_model(cfg, TASKS[task], tok)
    return model_inputs(tok, model)


def _model_contract(data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        name = damage_model(data, folder)
        before = digest(folder)
        start = time.monotonic()
        in_process(lambda: load_both(folder), f"damaged {name}")
        assert time.monotonic() - start < LIMIT_S
        assert digest(folder) == before


@budget(10)
@given(data=st.data())
def test_a_damaged_model_folder(data) -> None:
    _model_contract(data)


@pytest.mark.slow
@budget(80)
@given(data=st.data())
def test_a_damaged_model_folder_many(data) -> None:
    _model_contract(data)


# ----------------------------------------------------------------------------------------------------------
# the real program (slow): a run with an odd value, a run folder and its checkpoints with a damaged file

FAST = ["train.max_steps=2", "eval.predict_test=false", "train.log_every=1"]


def _real(args: list[str], what: str, user: list[Path]) -> tuple[int, str]:
    before = digest(*user)
    start = time.monotonic()
    proc = run_train(args, check=False, timeout=LIMIT_S + 30)
    holds(proc.returncode, proc.stderr, time.monotonic() - start, what)
    assert digest(*user) == before, f"{what}: the user's files changed"
    return proc.returncode, proc.stderr


small = st.one_of(
    st.sampled_from(ODD_TEXT), st.integers(-3, 600), st.floats(-1e3, 1e3), st.booleans(), st.none()
)


@pytest.mark.slow
@budget(8)
@given(key=st.sampled_from(KEYS), value=small)
def test_a_run_with_an_odd_value(key: str, value, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("odd") / "run"
    args = ["--config", str(SMOKE), *FAST, f"output_dir={out}", f"{key}={as_cli(value)}"]
    rc, _ = _real(args, f"{key}={as_cli(value)!r}", [SMOKE, SAMPLE, TINY])
    if rc == 0 and key != "output_dir" and (out / "eval_results.json").exists():
        assert "final" in json.loads((out / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished smoke run that kept its checkpoints."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = ["--config", str(SMOKE), *FAST, "checkpoint.every_steps=1", "checkpoint.keep_last=2"]
    run_train([*args, f"output_dir={out}"])
    return out, args


@pytest.mark.slow
@budget(5)
@given(data=st.data())
def test_a_run_folder_with_a_damaged_file(data, finished_run, tmp_path_factory) -> None:
    src, args = finished_run
    out = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(src, out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    name = data.draw(st.sampled_from(files))
    new = data.draw(damaged_file((out / name).read_bytes(), name))
    if new is None:
        (out / name).unlink()
    else:
        (out / name).write_bytes(new)
    what = f"run folder with damaged {name}"
    _real([*args, f"output_dir={out}"], f"{what}: the same command again", [SMOKE, SAMPLE, TINY])
    for command in (["summary", str(out)], ["card", str(out)]):
        start = time.monotonic()
        proc = run_train(command, check=False, timeout=LIMIT_S + 30)
        holds(proc.returncode, proc.stderr, time.monotonic() - start, f"{what}: {command[0]}")
    ckpts = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    if ckpts:
        fresh = tmp_path_factory.mktemp("resume") / "run"
        _real(
            [*args, f"output_dir={fresh}", f"checkpoint.resume={ckpts[-1]}"],
            f"{what}: resumed from {ckpts[-1].name}",
            [SMOKE, SAMPLE, TINY],
        )
