"""Caches keyed by everything that changes what they hold: the tokenized cache's key (train/data/tokenized.py) and
the compile cache's key (train/engine/fastpath.py ``_compile_key``).

Table-driven: each row changes ONE thing that changes an entry's content (a tokenizer file, a setting made after
loading, a call argument, a byte of the source file with its size and mtime kept, ...) and must change the key
and the named part; the invariants (where things were loaded from, what calling a tokenizer leaves behind,
another interpreter) must not. The end-to-end pair (DistilBERT then BERT on one cache) is in test_families.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE

from train.config import DataConfig, load_config
from train.data import tokenized
from train.tasks import TASKS

TINY = REPO / "train" / "assets" / "tiny-bert"
SAMPLE = REPO / "train" / "assets" / "glue_sample"
RTE = TASKS["rte"]
TRAIN = RTE.split("train")[0]


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _tok_copy(root: Path, name: str, edit=None) -> Path:
    """tiny-bert's tokenizer files in ``root/name``; ``edit(folder)`` changes them."""
    dest = root / name
    dest.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(TINY / f, dest / f)
    if edit:
        edit(dest)
    return dest


def _edit_json(path: Path, change) -> None:
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


@dataclasses.dataclass
class Inputs:
    cfg: DataConfig
    task: object
    split: object
    tokenizer: object


@pytest.fixture
def base(tmp_path) -> Inputs:
    glue = tmp_path / "glue"
    shutil.copytree(SAMPLE, glue)
    return Inputs(
        DataConfig(task="rte", glue_dir=str(glue)), RTE, TRAIN, _tokenizer(_tok_copy(tmp_path, "tok"))
    )


def _with(base: Inputs, **changes) -> Inputs:
    return dataclasses.replace(base, **changes)


def _same_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    st = path.stat()
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _lowercase_off(folder: Path) -> None:
    _edit_json(folder / "tokenizer_config.json", lambda s: s.update(do_lower_case=False))


def _swap_vocab(folder: Path) -> None:
    def swap(spec):
        vocab = spec["model"]["vocab"]
        a, b = sorted(vocab)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    _edit_json(folder / "tokenizer.json", swap)


def _class(name: str):
    return lambda folder: _edit_json(
        folder / "tokenizer_config.json", lambda s: s.update(tokenizer_class=name)
    )


def _set(**attributes):
    def change(tok):
        for k, v in attributes.items():
            setattr(tok, k, v)
        return tok

    return change


def _added(tok, special: bool):
    if special:
        tok.add_special_tokens({"additional_special_tokens": ["[NEW]"]})
    else:
        tok.add_tokens(["zzqx"])
    return tok


def _variant(base: Inputs, tmp_path: Path, row: str) -> Inputs:
    """``base`` with the one change ``row`` names."""
    glue = Path(base.cfg.glue_dir)
    if row.startswith("file:"):  # a tokenizer file edited
        edit = {
            "lowercase": _lowercase_off,
            "vocabulary": _swap_vocab,
            "class": _class("DistilBertTokenizer"),
        }
        return _with(base, tokenizer=_tokenizer(_tok_copy(tmp_path, row[5:], edit[row[5:]])))
    setting = {
        "padding_side": _set(padding_side="left"),
        "truncation_side": _set(truncation_side="left"),
        "model_input_names": _set(model_input_names=["input_ids", "attention_mask"]),
        "model_max_length": _set(model_max_length=64),
        "added_token": lambda t: _added(t, False),
        "special_token": lambda t: _added(t, True),
    }
    if row in setting:
        return _with(base, tokenizer=setting[row](_tokenizer(_tok_copy(tmp_path, row))))
    if row == "max_length":
        return _with(base, cfg=dataclasses.replace(base.cfg, max_length=64))
    if row == "text_columns":
        return _with(base, task=dataclasses.replace(RTE, text_columns=RTE.text_columns[::-1]))
    if row == "split":
        return _with(base, split=dataclasses.replace(TRAIN, name="train_again"))
    if row == "task":
        return _with(base, task=dataclasses.replace(RTE, name="rte_again"))
    if row == "source_bytes":  # one byte, same size, same mtime
        _same_size_and_mtime(glue / TRAIN.tsv, b"not_entailment", b"not_entailmenT")
        return base
    if row == "source_path":
        shutil.copytree(glue, tmp_path / "glue-elsewhere")
        return _with(base, cfg=dataclasses.replace(base.cfg, glue_dir=str(tmp_path / "glue-elsewhere")))
    raise AssertionError(row)


# the one change -> the key parts it must change (others may change with it: a new class returns other fields)
TOKENIZED_ROWS = {
    "file:lowercase": {"tokenizer", "returns"},
    "file:vocabulary": {"tokenizer"},
    "file:class": {"tokenizer", "tokenizer_class"},
    "padding_side": {"tokenizer_attributes"},
    "truncation_side": {"tokenizer_attributes"},
    "model_input_names": {"tokenizer_attributes", "returns"},
    "model_max_length": {"tokenizer"},
    "added_token": {"tokenizer"},
    "special_token": {"tokenizer"},
    "max_length": {"call"},
    "text_columns": {"text_columns"},
    "split": {"split"},
    "task": {"task"},
    "source_bytes": {"source"},
    "source_path": {"source"},
}


def _parts(x: Inputs) -> dict:
    return tokenized.key_parts(x.cfg, x.task, x.split, x.tokenizer)


@pytest.mark.parametrize("row", list(TOKENIZED_ROWS))
def test_each_component_changes_the_tokenized_key(row, base, tmp_path):
    before = _parts(base)
    changed = _variant(base, tmp_path, row)
    after = _parts(changed)
    differ = {k for k in before if before[k] != after[k]}
    assert TOKENIZED_ROWS[row] <= differ, (row, differ)
    assert tokenized.key_of(base.task, base.split, before) != tokenized.key_of(
        changed.task, changed.split, after
    )


def test_the_code_and_library_versions_are_in_the_key(base, tmp_path, monkeypatch):
    import tokenizers

    before = _parts(base)
    copies = []
    for path in tokenized.CODE:
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    monkeypatch.setattr(tokenized, "CODE", tuple(copies))
    assert _parts(base)["code"] == before["code"]  # the same text
    copies[0].write_text(copies[0].read_text() + "\n# a change to the reader\n")
    assert _parts(base)["code"] != before["code"]
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1")
    assert _parts(base)["versions"] != before["versions"]


def test_the_key_ignores_where_things_were_loaded_from_and_what_calls_left_behind(base, tmp_path):
    key = tokenized.cache_key(base.cfg, base.task, base.split, base.tokenizer)
    moved = _tokenizer(_tok_copy(tmp_path, "elsewhere"))
    moved("a b c d e", "f g h i j", truncation="only_second", max_length=9, padding="max_length")
    moved(["x"] * 3, padding=True, return_tensors="pt")
    for other in (moved, base.tokenizer):
        assert tokenized.cache_key(base.cfg, base.task, base.split, other) == key
    fewer = dataclasses.replace(base.cfg, max_train_samples=3, max_eval_samples=2)  # applied after the cache
    assert tokenized.cache_key(fewer, base.task, base.split, base.tokenizer) == key
    # another interpreter (another hash seed) computes the same key
    code = (
        "import sys; from train.data import tokenized; from train.config import DataConfig; "
        "from train.tasks import TASKS; from transformers import AutoTokenizer; t = TASKS['rte']; "
        f"print(tokenized.cache_key(DataConfig(task='rte', glue_dir={base.cfg.glue_dir!r}), t, t.split('train')[0], "
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip().splitlines()[-1:] == [key], out.stderr[-2000:]


def test_a_local_hub_copy_is_keyed_by_its_content(base, tmp_path):
    hub = tmp_path / "hub"
    (hub / "rte").mkdir(parents=True)
    (hub / "README.md").write_text("---\nconfigs: []\n---\n")
    (hub / "rte" / "train-00000-of-00001.parquet").write_bytes(b"rows, version 1")
    (hub / ".git").mkdir()
    cfg = DataConfig(task="rte", glue_dir=None, hub_dataset=str(hub))
    first = tokenized.source_fingerprint(cfg, RTE, TRAIN)
    (hub / ".git" / "index").write_bytes(b"git's own files are not the data")
    assert tokenized.source_fingerprint(cfg, RTE, TRAIN) == first
    _same_size_and_mtime(hub / "rte" / "train-00000-of-00001.parquet", b"1", b"2")
    assert tokenized.source_fingerprint(cfg, RTE, TRAIN) != first
    remote = DataConfig(task="rte", glue_dir=None)  # the Hub's copy is versioned by the Hub
    assert tokenized.source_fingerprint(remote, RTE, TRAIN) == {
        "hub": "nyu-mll/glue",
        "config": "rte",
        "split": "train",
    }


def test_an_entry_is_what_its_call_makes_and_records_its_parts(base, tmp_path):
    """The cached rows equal a direct call with call_arguments; an entry made from other parts is rebuilt."""
    cfg = dataclasses.replace(base.cfg, cache_dir=str(tmp_path / "cache"), max_length=24)
    ds = tokenized.tokenize_split(cfg, RTE, TRAIN, base.tokenizer)
    from train.data.glue import read_split

    rows = read_split(cfg, RTE, TRAIN)
    direct = base.tokenizer(rows["sentence1"], rows["sentence2"], **tokenized.call_arguments(cfg))
    assert ds["input_ids"] == direct["input_ids"] and ds["token_type_ids"] == direct["token_type_ids"]
    entry = tokenized.cache_root(cfg) / tokenized.cache_key(cfg, RTE, TRAIN, base.tokenizer)
    meta = json.loads((entry / tokenized.META).read_text())
    assert meta["parts"] == json.loads(json.dumps(_parts(_with(base, cfg=cfg)))) and meta["rows"] == len(ds)
    meta["parts"]["call"]["max_length"] = 25  # an entry that does not hold what its key says
    (entry / tokenized.META).write_text(json.dumps(meta))
    again = tokenized.tokenize_split(cfg, RTE, TRAIN, base.tokenizer)
    assert again["input_ids"] == ds["input_ids"]
    assert json.loads((entry / tokenized.META).read_text())["parts"]["call"]["max_length"] == 24


# ----------------------------------------------------------------------------------------------------------
# the compile cache's key


class NarrowForward:  # mixed into a model class below: another forward signature
    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _model(**kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(TINY), num_labels=2, **kwargs)


def _class_from_file(path: Path, text: str, monkeypatch):
    """A model class defined in a module file, as transformers imports remote code: the same name, its source."""
    import importlib.util

    path.write_text(text)
    spec = importlib.util.spec_from_file_location("glue_train_test_custom_model", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module.Custom


CUSTOM = "from transformers import BertForSequenceClassification\n\n\nclass Custom(BertForSequenceClassification):\n    pass\n"


def _compile_parts(**over) -> dict:
    from train.data.batches import Inputs as BatchInputs
    from train.data.batches import Layout
    from train.engine.fastpath import Decision, _compile_key

    cfg = over.pop("cfg", None) or load_config(SMOKE, [])
    d = Decision(True, "test", compile=True, mode="default", backend="inductor", buckets=(32, 64, 128))
    d = dataclasses.replace(d, **over.pop("decision", {}))
    args = {
        "device_name": "cpu",
        "model": None,
        "inputs": BatchInputs(("input_ids", "token_type_ids")),
        "regression": False,
        "layout": Layout.derive(16, None, 1),
        "precision": "no",
        **over,
    }
    return _compile_key(cfg, d, args.pop("device_name"), args.pop("model"), **args)


@pytest.fixture(scope="module")
def tiny_model():
    return _model()


def _compile_variant(row: str, model, tmp_path: Path, monkeypatch) -> dict:
    from train.data.batches import Inputs as BatchInputs
    from train.data.batches import Layout

    if row == "model_config":
        return {"model": _model(hidden_dropout_prob=0.0)}
    if row == "attention":
        return {
            "model": _model(
                attn_implementation="eager" if model.config._attn_implementation != "eager" else "sdpa"
            )
        }
    if row == "param_dtypes":
        return {"model": _model().to(torch.bfloat16)}
    if row == "model_class":
        cls = _class_from_file(tmp_path / "custom_model.py", CUSTOM, monkeypatch)
        return {"model": cls(model.config)}
    if row == "forward":
        from transformers import BertForSequenceClassification

        narrow = type("BertForSequenceClassification", (NarrowForward, BertForSequenceClassification), {})
        return {"model": narrow(model.config)}
    if row == "inputs":
        return {"inputs": BatchInputs(("input_ids",))}
    if row == "inputs_mask":
        return {"inputs": BatchInputs(("input_ids", "token_type_ids"), mask=False)}
    if row == "regression":
        return {"regression": True}
    if row == "buckets":
        return {"decision": {"buckets": (64, 128)}}
    if row == "train_rows":
        return {"layout": Layout.derive(16, 8, 1)}
    if row == "world":
        return {"layout": Layout.derive(16, None, 2)}
    if row == "eval_rows":
        return {"cfg": load_config(SMOKE, ["eval.batch_size=8"])}
    if row == "precision":
        return {"precision": "bf16"}
    if row in ("backend", "mode", "dynamic", "cudagraphs"):
        value = {"backend": "aot_eager", "mode": "reduce-overhead", "dynamic": True, "cudagraphs": True}[row]
        return {"decision": {row: value}}
    if row == "device":
        return {"device_name": "NVIDIA H200"}
    if row == "launcher":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        return {}
    if row == "compile_env":
        monkeypatch.setenv("TORCHINDUCTOR_MAX_AUTOTUNE", "1")
        return {}
    if row in ("torch", "transformers", "python"):
        import platform

        import transformers

        target = {"torch": (torch, "__version__"), "transformers": (transformers, "__version__")}
        if row == "python":
            monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
        else:
            monkeypatch.setattr(*target[row], "0.0.0")
        return {}
    raise AssertionError(row)


COMPILE_ROWS = {
    "model_config": {"model_config"},
    "attention": {"attention"},
    "param_dtypes": {"param_dtypes"},
    "model_class": {"model_class", "model_code"},
    "forward": {"forward"},
    "inputs": {"inputs"},
    "inputs_mask": {"inputs"},
    "regression": {"regression"},
    "buckets": {"buckets"},
    "train_rows": {"train_rows", "accum"},
    "world": {"world", "train_rows"},
    "eval_rows": {"eval_rows"},
    "precision": {"precision"},
    "backend": {"backend"},
    "mode": {"mode"},
    "dynamic": {"dynamic"},
    "cudagraphs": {"cudagraphs"},
    "device": {"device"},
    "launcher": {"launcher"},
    "compile_env": {"compile_env"},
    "torch": {"torch"},
    "transformers": {"transformers"},
    "python": {"python"},
}


@pytest.mark.parametrize("row", list(COMPILE_ROWS))
def test_each_component_changes_the_compile_key(row, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    key, before = _compile_parts(model=tiny_model)
    over = _compile_variant(row, tiny_model, tmp_path, monkeypatch)
    new_key, after = _compile_parts(**{"model": tiny_model, **over})
    differ = {k for k in before if before[k] != after[k]}
    assert COMPILE_ROWS[row] <= differ, (row, differ)
    assert key != new_key


def test_the_compile_key_ignores_names_and_cache_folders(tiny_model, monkeypatch):
    key, _ = _compile_parts(model=tiny_model)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")  # where, not what
    relabelled = _model(id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    assert _compile_parts(model=relabelled)[0] == key
    assert _compile_parts(model=_model())[0] == key  # loaded again


def test_edited_model_code_changes_the_compile_key(tiny_model, tmp_path, monkeypatch):
    """The same class name from an edited file (remote code updated): only the code differs."""
    path = tmp_path / "custom_model.py"
    key, before = _compile_parts(model=_class_from_file(path, CUSTOM, monkeypatch)(tiny_model.config))
    edited = _class_from_file(path, CUSTOM + "\n# edited\n", monkeypatch)
    new_key, after = _compile_parts(model=edited(tiny_model.config))
    assert {k for k in before if before[k] != after[k]} == {"model_code"} and key != new_key
