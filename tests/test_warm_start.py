"""model.init_from (train/model/warm_start.py): RTE and STS-B start from an MNLI run's best model (real runs, tiny BERT).

An MNLI run on the MNLI fixture, then the weights RTE and STS-B get from it (exactly the MNLI best model's encoder;
a new head, or RTE's mapped from MNLI's), the resolution of SWEEP_DIR@task, what the run records, and the errors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SMOKE, run_train

from train.config import load_config
from train.errors import ConfigError
from train.model import warm_start
from train.tasks import TASKS

FIXTURES = REPO / "tests" / "fixtures"
TINY = ["eval.predict_test=false", "train.log_every=2", "train.epochs=1"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep folder with one finished MNLI run (96 fixture rows, 6 steps)."""
    root = tmp_path_factory.mktemp("warm")
    run_train(
        ["--config", str(SMOKE), "data.task=mnli", f"data.glue_dir={FIXTURES}", "seed=1", *TINY,
         f"output_dir={root / 'mnli-s1'}"]
    )  # fmt: skip
    return root


def _cfg(task: str, *extra: str):
    glue = FIXTURES if task in ("mnli", "stsb") else "builtin:glue-sample"
    return load_config(SMOKE, [f"data.task={task}", f"data.glue_dir={glue}", *extra])


def _initial_model(cfg):
    """The weights a run starts from: what setup() loads, after the same seeding."""
    from accelerate.utils import set_seed

    from train.model.load import load_model, load_tokenizer

    set_seed(cfg.seed)
    tok = load_tokenizer(cfg)
    return tok, load_model(cfg, TASKS[cfg.data.task], tok)


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _split(state: dict, prefix: str) -> tuple[dict, dict]:
    enc = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    return enc, {k: v for k, v in state.items() if k not in enc}


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_rte_and_stsb_start_from_the_mnli_encoder(sweep_dir: Path, task: str):
    best = sweep_dir / "mnli-s1" / "best"
    tok, model = _initial_model(_cfg(task, f"model.init_from={sweep_dir / 'mnli-s1'}"))
    prefix = model.base_model_prefix
    enc, head = _split({k: v.detach() for k, v in model.state_dict().items()}, prefix)
    saved_enc, saved_head = _split(_saved(best), prefix)
    assert saved_enc and set(enc) >= set(saved_enc)
    for key, value in saved_enc.items():
        assert torch.equal(enc[key], value), key  # bit for bit the MNLI best model's encoder
    fresh = _initial_model(_cfg(task))[1].state_dict()  # from the pretrained checkpoint, same seed
    assert any(not torch.equal(fresh[k], v) for k, v in saved_enc.items())  # MNLI training moved it
    assert set(head) == set(saved_head) and head
    assert all(head[k].shape[0] == TASKS[task].num_labels for k in head if k.endswith("weight"))
    assert model.config.num_labels == TASKS[task].num_labels
    assert model.config.problem_type == ("regression" if task == "stsb" else None)
    assert tok.name_or_path == str(best)  # the tokenizer saved with the weights
    info = model.init_source
    assert info["model_folder"] == str(best) and info["run"] == str(sweep_dir / "mnli-s1")
    assert info["head"]["kind"] == "new" and info["head"]["saved_labels"] == list(TASKS["mnli"].labels)


def test_rte_head_mapped_from_mnli(sweep_dir: Path):
    """init_head=map: entailment from entailment, not_entailment = mean(neutral, contradiction) + log 2."""
    _, model = _initial_model(_cfg("rte", f"model.init_from={sweep_dir}@mnli", "model.init_head=map"))
    saved = _saved(sweep_dir / "mnli-s1" / "best")
    _, head = _split(saved, model.base_model_prefix)
    state = model.state_dict()
    out_layer = [k for k, v in head.items() if v.shape[0] == 3]
    assert sorted(k.rsplit(".", 1)[1] for k in out_layer) == ["bias", "weight"]
    for key in out_layer:
        w = head[key].double()
        expected = torch.stack([w[0], (w[1] + w[2]) / 2])
        if key.endswith("bias"):
            expected[1] += math.log(2)
        assert torch.allclose(state[key].double(), expected, rtol=0, atol=1e-6), key
    for key in set(head) - set(out_layer):  # any other head layer is kept as trained
        assert torch.equal(state[key], head[key]), key
    assert model.init_source["head"]["kind"] == "mapped"
    # on a real pair: P(entailment) = p_e / (p_e + 2 sqrt(p_n p_c)) of the MNLI model's p (= p_e when p_n = p_c)
    mnli = _initial_model(_cfg("mnli", f"model.init_from={sweep_dir}@mnli"))[1]
    assert mnli.init_source["head"]["kind"] == "kept"  # MNLI from MNLI: the same labels, the head as saved
    tok = _initial_model(_cfg("rte", f"model.init_from={sweep_dir}@mnli"))[0]
    batch = tok(["A man plays a guitar."], ["A person makes music."], return_tensors="pt")
    with torch.no_grad():
        p3 = mnli.eval()(**batch).logits.softmax(-1)[0]
        p2 = model.eval()(**batch).logits.softmax(-1)[0]
    assert float(p2[0]) == pytest.approx(float(p3[0]) / float(p3[0] + 2 * (p3[1] * p3[2]).sqrt()), abs=1e-5)


def test_runs_from_mnli_record_where_their_weights_came_from(sweep_dir: Path, tmp_path: Path):
    for task, init in (("rte", f"{sweep_dir}@mnli"), ("stsb", str(sweep_dir / "mnli-s1" / "best"))):
        out = tmp_path / task
        glue = FIXTURES if task == "stsb" else "builtin:glue-sample"
        run_train(
            ["--config", str(SMOKE), f"data.task={task}", f"data.glue_dir={glue}", f"model.init_from={init}",
             *TINY, f"output_dir={out}"]
        )  # fmt: skip
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg["model"]["init_from"] == init  # the run config says where from, as asked
        info = json.loads((out / "run_info.json").read_text())["init_from"]
        assert info["model_folder"] == str(sweep_dir / "mnli-s1" / "best")
        assert info["run"] == str(sweep_dir / "mnli-s1") and info["head"]["kind"] == "new"
        assert json.loads((out / "eval_results.json").read_text())["task"] == task
    info = json.loads((tmp_path / "rte" / "run_info.json").read_text())["init_from"]
    assert info["selected"]["task"] == "mnli" and info["selected"]["run"] == "mnli-s1"


def _fake_run(root: Path, name: str, task: str, seed: int, score: float) -> Path:
    folder = root / name
    (folder / "best").mkdir(parents=True)
    (folder / "best" / "config.json").write_text("{}")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "builtin:tiny-bert"}}))
    split = {"accuracy": score, "score": score}
    splits = {s.name: split for s in TASKS[task].split("dev")}
    results = {"task": task, "seed": seed, "model": "builtin:tiny-bert", "best": {"splits": splits}}
    results["final"] = results["best"]  # a whole file: the program writes both
    (folder / "eval_results.json").write_text(json.dumps(results))
    return folder


def test_sweep_dir_at_task_picks_the_best_seed_of_the_best_median_set(tmp_path: Path):
    for lr, scores in {"1e-5": [0.9, 0.5, 0.5], "2e-5": [0.6, 0.7, 0.65]}.items():
        for seed, score in enumerate(scores, start=1):
            _fake_run(tmp_path, f"mnli-s{seed}-lr{lr}", "mnli", seed, score)
    _fake_run(tmp_path, "rte-s1", "rte", 1, 0.99)  # other tasks do not count
    src = warm_start.resolve(load_config(SMOKE, [f"model.init_from={tmp_path}@mnli"]))
    assert src.run_dir == (tmp_path / "mnli-s2-lr2e-5").resolve()  # median 0.65 > 0.5; its best seed is 2
    assert src.selected["set"] == "tiny-bert · lr2e-5" and src.selected["median"] == pytest.approx(0.65)


def test_init_from_errors(sweep_dir: Path, tmp_path: Path):
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            warm_start.resolve(load_config(SMOKE, list(overrides)))
        return str(err.value)

    assert "not a run folder (with best/), a model folder" in error(f"model.init_from={tmp_path / 'nope'}")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 1\n")
    assert "has no best/ model yet" in error(f"model.init_from={unfinished}")
    assert "no finished mnli run" in error(f"model.init_from={tmp_path}@mnli")
    assert "unknown task" in error(f"model.init_from={sweep_dir}@mnlx")
    msg = error(f"model.init_from={sweep_dir / 'mnli-s1'}", "model.name_or_path=bert-base-uncased")
    assert "trained from model.name_or_path=builtin:tiny-bert" in msg
    # a model folder without a tokenizer: the error names model.init_from
    bare = tmp_path / "bare"
    shutil.copytree(sweep_dir / "mnli-s1" / "best", bare)
    for p in bare.glob("tokenizer*"):
        p.unlink()
    (bare / "vocab.txt").unlink(missing_ok=True)
    proc = run_train(["--config", str(SMOKE), f"model.init_from={bare}", *TINY, f"output_dir={tmp_path / 'x'}"],
                     check=False)  # fmt: skip
    assert proc.returncode == 2 and "error: model.init_from: the folder" in proc.stderr
    assert "Traceback" not in proc.stderr
