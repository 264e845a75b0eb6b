"""Every encoder family through every path: the batch carries what the tokenizer makes and the model takes.

Tiny random models of each family (``tests/families.py``: BERT, RoBERTa with one token type, XLM-R, DistilBERT,
DeBERTa-v3 with none, ELECTRA, ALBERT, ModernBERT, MPNet), each saved without a head and with a tokenizer in the
format its real checkpoints ship, go through a single-sentence task, a pair task and STS-B regression with
``model.dropout=0``; RoBERTa and ModernBERT also on 2 processes (1x16 vs 2x8: the same weights), under ZeRO-2 and
on the compiled path. Decoder checkpoints, architectures without a classification head and remote-code
checkpoints get a clear answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE, accelerate_cmd, load_weights, run_train
from families import FAMILIES, build_decoder, build_remote_code, build_without_head

from train.config import load_config
from train.data import batches, glue, tokenized
from train.errors import ConfigError
from train.tasks import TASKS

FIXTURES = REPO / "tests" / "fixtures"
SHORT = ["model.dropout=0", "train.max_steps=6", "train.log_every=2", "data.max_eval_samples=48"]
# task -> (glue_dir, submission file)
TASK_SHAPES = {
    "sst2": ("builtin:glue-sample", "SST-2.tsv"),
    "rte": ("builtin:glue-sample", "RTE.tsv"),
    "stsb": (str(FIXTURES), "STS-B.tsv"),
}
TOKEN_TYPES = {"bert", "electra"}  # the families whose tokenizer makes token types the model uses


def _run(model_dir, task: str, out, *extra: str, **kw):
    glue_dir, _ = TASK_SHAPES[task]
    args = ["--config", str(SMOKE), f"model.name_or_path={model_dir}", f"data.task={task}"]
    return run_train([*args, f"data.glue_dir={glue_dir}", f"output_dir={out}", *SHORT, *extra], **kw)


def _reloaded_predictions(folder, task: str) -> list[str]:
    """Test-set predictions of ``folder`` loaded with the Auto classes, in the submission format."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    t = TASKS[task]
    split = t.split("test")[0]
    glue_dir, _ = TASK_SHAPES[task]
    rows = glue.read_tsv(Path(glue.glue_folder(glue_dir, t)) / split.tsv, t, split)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(
        *[rows[c] for c in t.text_columns], truncation=True, max_length=128, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**enc).logits
    if t.is_regression:
        return [f"{min(5.0, max(0.0, float(v))):.3f}" for v in logits.squeeze(-1)]
    names = t.submission_labels or t.labels
    return [names[int(i)] for i in logits.argmax(-1)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_every_task_shape(family, families, tmp_path):
    for task, (_, submission) in TASK_SHAPES.items():
        out = tmp_path / task
        proc = _run(families[family], task, out)
        log = proc.stdout + proc.stderr
        fields = (
            "input_ids, token_type_ids, attention_mask"
            if family in TOKEN_TYPES
            else "input_ids, attention_mask"
        )
        assert f"model inputs: {fields}" in log, (task, log[-3000:])
        res = json.loads((out / "eval_results.json").read_text())
        score = res["final"]["splits"]["validation"]["score"]
        total = json.loads((out / "run_info.json").read_text())["total_steps"]
        assert math.isfinite(score) and res["final"]["step"] == total == min(6, total), (task, res)
        config = json.loads((out / "final" / "config.json").read_text())
        dropouts = {k: v for k, v in config.items() if "dropout" in k}
        assert dropouts and not any(v for v in dropouts.values()), (task, dropouts)
        written = [
            ln.split("\t")[1] for ln in (out / "predictions" / submission).read_text().splitlines()[1:]
        ]
        got = _reloaded_predictions(out / "best", task)
        if task == "stsb":
            assert [float(g) for g in got] == pytest.approx([float(w) for w in written], abs=2e-3)
        else:
            assert got == written, task  # best/ reloads with the Auto classes and predicts the run's labels


def test_inputs_come_from_tokenizer_and_model(families, tmp_path):
    """Pair templates, pad ids and token types as each tokenizer and model define them."""
    from train.model.load import load_model, load_tokenizer, model_inputs

    seen = {}
    for family, folder in families.items():
        cfg = load_config(
            SMOKE, [f"model.name_or_path={folder}", "data.task=rte", f"data.cache_dir={tmp_path}"]
        )
        tok = load_tokenizer(cfg)
        inputs = model_inputs(tok, load_model(cfg, TASKS["rte"], tok))
        seen[family] = inputs.fields
        task = TASKS["rte"]
        ds = tokenized.tokenize_split(cfg.data, task, task.split("train")[0], tok)
        row = batches.Packed(ds).row(0)
        want = tok(_rte_row0(task), _rte_row0(task, 1), truncation=True, max_length=cfg.data.max_length)
        assert row["input_ids"].tolist() == want["input_ids"], family
        if tok.sep_token == "</s>":  # RoBERTa, XLM-R, MPNet: "</s></s>" between the sentences
            ids = row["input_ids"].tolist()
            assert any(a == b == tok.sep_token_id for a, b in zip(ids, ids[1:], strict=False)), family
        batch = batches.make_collator(inputs, False)([batches.Packed(ds).row(i) for i in range(4)])
        assert set(batch) == {*inputs.model_keys, "labels", "weight", "idx"}
        short = int(batch["attention_mask"].sum(1).argmin())
        assert batch["input_ids"][short, -1] == tok.pad_token_id, family
    assert {f for f, fields in seen.items() if "token_type_ids" in fields} == TOKEN_TYPES


def _rte_row0(task, column: int = 0) -> str:
    split = task.split("train")[0]
    rows = glue.read_tsv(Path(glue.BUILTIN_DATA["builtin:glue-sample"]) / split.tsv, task, split)
    return rows[task.text_columns[column]][0]


def test_bert_tokenizer_on_a_one_type_model(families, tmp_path):
    """A RoBERTa body (type_vocab_size 1) with a BERT-style tokenizer: the segment ids are not passed."""
    import shutil

    mixed = tmp_path / "roberta-with-wordpiece"
    shutil.copytree(families["roberta"], mixed)
    for f in mixed.glob("tokenizer*"):
        f.unlink()
    for f in families["bert"].glob("tokenizer*"):
        shutil.copy(f, mixed / f.name)
    proc = _run(mixed, "rte", tmp_path / "out")
    assert "not passed: token_type_ids (the model has type_vocab_size=1)" in proc.stderr


def test_one_vocabulary_two_tokenizers_never_share_a_tokenized_entry(families, tmp_path):
    """DistilBERT ships BERT's vocabulary and tokenizer.json, but its tokenizer returns no token_type_ids: a
    DistilBERT run and then a BERT run on one tokenized cache each tokenize their own entry, and the BERT run on
    the shared cache trains exactly as on a cache of its own (it used to crash with KeyError: 'token_type_ids')."""
    import shutil

    from datasets import load_from_disk

    distil = tmp_path / "distilbert-with-bert-vocab"
    shutil.copytree(families["distilbert"], distil)
    shutil.copy(families["bert"] / "tokenizer.json", distil / "tokenizer.json")
    assert (distil / "tokenizer.json").read_bytes() == (families["bert"] / "tokenizer.json").read_bytes()
    shared, own = tmp_path / "shared-cache", tmp_path / "own-cache"
    logs = {}
    for name, model, cache in (
        ("distil", distil, shared),
        ("bert", families["bert"], shared),
        ("ref", families["bert"], own),
    ):
        proc = _run(model, "rte", tmp_path / name, f"data.cache_dir={cache}")
        logs[name] = proc.stderr
    assert "model inputs: input_ids, attention_mask" in logs["distil"]
    assert "model inputs: input_ids, token_type_ids, attention_mask" in logs["bert"]
    assert "tokenized cache hit" not in logs["bert"] and "tokenized rte/train" in logs["bert"]
    entries = sorted(e for e in (shared / "tokenized").glob("rte-train-*") if e.is_dir())
    assert len(entries) == 2, entries
    columns = sorted(tuple(sorted(load_from_disk(str(e)).column_names)) for e in entries)
    assert columns == [("idx", "input_ids", "label"), ("idx", "input_ids", "label", "token_type_ids")]
    ref, bert = load_weights(tmp_path / "ref"), load_weights(tmp_path / "bert")
    assert ref.keys() == bert.keys() and all(torch.equal(ref[k], bert[k]) for k in ref)
    # and the other way round: BERT's entries are there now, DistilBERT still gets its own
    again = _run(distil, "rte", tmp_path / "distil-again", f"data.cache_dir={shared}").stderr
    assert "tokenized cache hit" in again and "model inputs: input_ids, attention_mask" in again


# ----------------------------------------------------------------------------------------------------------
# every path: 2 processes, ZeRO-2, compiled (RoBERTa and ModernBERT)

PATHS = [
    "model.dropout=0",
    "precision=no",
    "data.task=sst2",
    "data.max_train_samples=64",
    "data.max_eval_samples=32",
    "train.epochs=1",
    "train.log_every=1",
    "eval.predict_test=false",
    "data.max_length=64",
    "fast.bucket_multiple=64",
]


def _weights_close(a_dir, b_dir, rtol: float) -> None:
    a, b = load_weights(a_dir), load_weights(b_dir)
    assert a.keys() == b.keys()
    for key, ref in a.items():
        torch.testing.assert_close(
            b[key], ref, rtol=rtol, atol=1e-7, msg=lambda m, k=key: f"{b_dir.name} {k}: {m}"
        )


@pytest.fixture(scope="module")
def reference_runs(families, tmp_path_factory) -> dict:
    """1 process x 16 (the reference) of RoBERTa and ModernBERT, shared by the path tests below."""
    out = {}
    for family in ("roberta", "modernbert"):
        folder = tmp_path_factory.mktemp(f"{family}-1x16")
        run_train(
            ["--config", str(SMOKE), f"model.name_or_path={families[family]}", *PATHS, f"output_dir={folder}"]
        )
        out[family] = folder
    return out


@pytest.mark.parametrize("family", ["roberta", "modernbert"])
def test_family_on_two_processes_and_compiled(family, families, reference_runs, tmp_path):
    from transformers import AutoModel

    common = ["--config", str(SMOKE), f"model.name_or_path={families[family]}", *PATHS]
    ref, ddp, fast = reference_runs[family], tmp_path / "2x8", tmp_path / "fast"
    run_train([*common, f"output_dir={ddp}"], nproc=2)
    run_train([*common, f"output_dir={fast}", "fast.enabled=true", "fast.backend=aot_eager"])
    assert json.loads((ddp / "run_info.json").read_text())["world_size"] == 2
    _weights_close(ref, ddp, 1e-5)  # batch invariance: 1x16 == 2x8
    _weights_close(ref, fast, 1e-3)  # compiled graphs (other kernels) == eager
    init = AutoModel.from_pretrained(families[family]).state_dict()
    trained = load_weights(ref)
    changed = [
        not torch.equal(v, init[k.split(".", 1)[1]])
        for k, v in trained.items()
        if k.split(".", 1)[-1] in init
    ]
    assert changed and any(changed), "the comparisons must not compare untrained encoders"


@pytest.mark.parametrize("family", ["roberta", "modernbert"])
def test_family_under_zero2(family, families, reference_runs, tmp_path):
    import os
    import subprocess

    pytest.importorskip("deepspeed")
    zero2 = tmp_path / "zero2"
    args = ["--config", str(SMOKE), f"model.name_or_path={families[family]}", *PATHS, f"output_dir={zero2}"]
    cmd = accelerate_cmd(["--config_file", str(REPO / "configs/accelerate/zero2.yaml")], 2, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((zero2 / "run_info.json").read_text())
    assert info["deepspeed"]["zero_stage"] == 2 and info["world_size"] == 2
    _weights_close(reference_runs[family], zero2, 1e-5)  # ZeRO-2 == DDP


# ----------------------------------------------------------------------------------------------------------
# anything else: a clear answer


def test_attn_implementation_choices(families):
    from train.model.load import load_model, load_tokenizer

    def load(family: str, impl: str):
        cfg = load_config(
            SMOKE, [f"model.name_or_path={families[family]}", f"model.attn_implementation={impl}"]
        )
        return load_model(cfg, TASKS["sst2"], load_tokenizer(cfg))

    assert load("bert", "sdpa").config._attn_implementation == "sdpa"
    assert load("bert", "eager").config._attn_implementation == "eager"
    with pytest.raises(
        ConfigError, match=r"model.attn_implementation=sdpa: MPNetForSequenceClassification .*supports eager"
    ):
        load("mpnet", "sdpa")
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2"):
        load("roberta", "flash_attention_2")  # no flash-attn package and no GPU here
    with pytest.raises(ConfigError, match=r"must be one of"):
        load_config(SMOKE, ["model.attn_implementation=fast"])


def test_decoder_checkpoint_trains_with_eos_padding(families, tmp_path):
    gpt2 = build_decoder(tmp_path / "gpt2")
    out = tmp_path / "out"
    proc = _run(gpt2, "rte", out)
    assert "tokenizer has no pad token: padding with its EOS token" in proc.stderr
    written = [ln.split("\t")[1] for ln in (out / "predictions" / "RTE.tsv").read_text().splitlines()[1:]]
    assert _reloaded_predictions(out / "best", "rte") == written
    assert json.loads((out / "final" / "config.json").read_text())["pad_token_id"] is not None


def test_no_head_and_remote_code_get_clear_answers(families, tmp_path):
    marian = build_without_head(tmp_path / "marian", families["bert"])
    custom = build_remote_code(tmp_path / "custom", families["bert"])
    for model, expect in (
        (marian, "is a 'marian' model, which has no sequence-classification head"),
        (custom, "set model.trust_remote_code=true"),
    ):
        proc = _run(model, "sst2", tmp_path / f"{model.name}-run", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.count("error: ") == 1 and expect in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / f"{model.name}-run").exists()
    _run(custom, "sst2", tmp_path / "trusted", "model.trust_remote_code=true")
    assert (
        json.loads((tmp_path / "trusted" / "final" / "config.json").read_text())["model_type"]
        == "tiny-custom"
    )


# ----------------------------------------------------------------------------------------------------------
# presets

PRESETS = sorted((REPO / "configs" / "models").glob("*.yaml"))


def test_presets_exist_for_every_family_users_bring():
    names = {p.stem for p in PRESETS}
    assert {"bert-base-uncased", "roberta-base", "deberta-v3-base", "electra-base-discriminator",
            "distilbert-base-uncased", "xlm-roberta-base", "ModernBERT-base"} <= names  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_merges_after_a_task_and_fails_clearly_offline(preset, monkeypatch):
    from train.model.load import load_tokenizer

    text = preset.read_text()
    assert "source" in text.lower() and "effective" in text.lower(), "presets cite their recipe and batch"
    cfg = load_config([REPO / "configs/tasks/rte.yaml", preset])
    assert cfg.data.task == "rte" and "/" in cfg.model.name_or_path  # the Hub id, with its organisation
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.name_or_path: could not load .*HF_HUB_OFFLINE=1 is set"):
        load_tokenizer(cfg)
