"""Load the tokenizer and the sequence-classification model of any encoder family, with clear errors.

Nothing here names a family: what a batch carries comes from the tokenizer and the model's ``forward``
signature (:func:`model_inputs`), dropout keys from the model's config, limits from the config and tokenizer.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from pathlib import Path

from train.config import Config
from train.data.batches import Inputs
from train.data.glue import offline_advice, resolve_model
from train.data.tokenized import check_max_length, min_max_length
from train.errors import ConfigError, reading
from train.model import warm_start
from train.tasks import Task

log = logging.getLogger(__name__)

# Files that hold a tokenizer's vocabulary, in the formats transformers reads (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "spm.model",
)
ATTENTION_CHOICES = ("eager", "sdpa", "flash_attention_2")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _load_error(name: str, e: Exception) -> ConfigError:
    """Why ``name`` could not be loaded, and what to do (remote code, a wrong path, no network)."""
    if "trust_remote_code" in str(e):
        return ConfigError(
            f"model.name_or_path: '{name}' needs Python code from its own repository to load (its config names "
            "custom classes). Loading it RUNS that code; if you trust the repository, set "
            "model.trust_remote_code=true"
        )
    what = (
        "it is not a folder holding config.json and the weights; check the path"
        if _is_local(name)
        else "it is neither a local folder nor a Hub model this machine could load. " + offline_advice()
    )
    return ConfigError(f"model.name_or_path: could not load '{name}' ({_first_line(e)}); {what}")


def _model_files(name: str, key: str) -> str:
    """The hint for a model folder a library could not read."""
    return (
        f"the files are damaged or incomplete; download or copy the checkpoint again (or save it anew with "
        f"save_pretrained), or point {key} at a complete one"
    )


def _check_tokenizer_files(name: str, key: str = "model.name_or_path") -> None:
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        raise ConfigError(
            f"{key}: the folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}; "
            f"it holds {present}). Save the tokenizer next to the weights (tokenizer.save_pretrained(folder)) "
            "or copy its files from the checkpoint the model came from"
        )


def load_tokenizer(cfg: Config):
    """The checkpoint's fast tokenizer; a pad token is taken from EOS for decoder checkpoints that have none.

    With ``model.init_from`` it is the tokenizer saved with those weights (train/model/warm_start.py)."""
    from transformers import AutoTokenizer

    src = warm_start.resolve(cfg)
    name = str(src.model_dir) if src else resolve_model(cfg.model.name_or_path)
    key = "model.init_from" if src else "model.name_or_path"
    _check_tokenizer_files(name, key)
    with reading(f"{key}: the tokenizer in", name, _model_files(name, key), ConfigError):
        try:
            tok = AutoTokenizer.from_pretrained(
                name,
                revision=None if src else cfg.model.revision,
                use_fast=True,
                trust_remote_code=cfg.model.trust_remote_code,
            )
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            raise _load_error(name, e) from None
        _check_vocabulary(name, tok)  # the first call of the tokenizer: a broken vocabulary fails here
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"model.name_or_path: '{name}' has no fast tokenizer; a tokenizers-backed one is required"
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"model.name_or_path: the tokenizer of '{name}' has neither a pad nor an end-of-sequence token, "
                "so batches cannot be padded; add a pad token to its tokenizer_config.json"
            )
        tok.pad_token = tok.eos_token  # what the HF docs do for decoder checkpoints (GPT-2, Llama, ...)
        log.info("tokenizer has no pad token: padding with its EOS token %r", tok.eos_token)
    return tok


def _check_vocabulary(name: str, tok) -> None:
    """Refuse a tokenizer that maps ordinary English to its unknown token (a placeholder vocabulary)."""
    if tok.unk_token_id is None:
        return  # byte-level vocabularies have no unknown token
    ids = tok("the movie was good and the story is simple", add_special_tokens=False)["input_ids"]
    if ids and all(i == tok.unk_token_id for i in ids):
        raise ConfigError(
            f"model.name_or_path: the tokenizer of '{name}' maps every word of an English sentence to its "
            f"unknown token {tok.unk_token!r} (a vocabulary of {len(tok)} entries); it is not the tokenizer "
            "the model was trained with. Put the checkpoint's own tokenizer files next to its weights"
        )


# Config fields that size or count what the model allocates (the naming every family follows: num_hidden_layers,
# hidden_size, num_attention_heads, vocab_size, max_position_embeddings, ...).
_SIZE_FIELD = re.compile(r"^num_|_size$|layers|heads|vocab|position")


def stored_weights(folder: Path) -> int | None:
    """How many numbers the folder's safetensors files hold, from their headers (nothing else is read); None
    when there are none or a header cannot be read (the loader then says why)."""
    total, found = 0, False
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else None
            tensors = [v for k, v in header.items() if k != "__metadata__"]
            total += sum(math.prod(t["shape"]) for t in tensors)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        found = True
    return total if found else None


def _check_sizes(mcfg, name: str, key: str) -> None:
    """A config.json whose sizes the weights beside it cannot fill (a layer count of 10^12 would build layers
    for hours before any file is read): each size or count at most the number of weights stored."""
    stored = stored_weights(Path(name)) if Path(name).is_dir() else None
    if stored is None:
        return
    for field, value in sorted(mcfg.to_dict().items()):
        if (
            _SIZE_FIELD.search(field)
            and isinstance(value, int)
            and not isinstance(value, bool)
            and value > stored
        ):
            raise ConfigError(
                f"{key}: {Path(name) / 'config.json'} sets {field}={value}, more than the {stored} weights its "
                "safetensors files hold; the config does not describe these weights. Put the checkpoint's own "
                "config.json back (download or copy it again)"
            )


def set_dropout(mcfg, p: float) -> dict[str, float]:
    """Set every dropout probability of the config (any field whose name contains 'dropout') to ``p``."""
    changed = {}
    for key, value in sorted(mcfg.to_dict().items()):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if "dropout" in key and (number or value is None):
            setattr(mcfg, key, float(p))
            changed[key] = float(p)
    return changed


def position_limit(mcfg, tokenizer) -> int | None:
    """The longest input the model takes: its position table, and the tokenizer's limit where it gives one."""
    limits = [getattr(mcfg, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    sane = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**6]  # unset: a huge sentinel
    return min(sane) if sane else None


def check_lengths(cfg: Config, mcfg, tokenizer, name: str, task: Task) -> None:
    """data.max_length between what the tokenizer's special tokens need and the position limit (and the padded
    length pad_to_multiple_of makes of it within the limit)."""
    limit = position_limit(mcfg, tokenizer)
    check_max_length(cfg.data.max_length, tokenizer, task, limit, name)
    if limit is None:
        return
    longest = cfg.data.max_length
    if cfg.data.max_length > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's position limit ({limit} tokens: "
            f"max_position_embeddings={getattr(mcfg, 'max_position_embeddings', None)}, tokenizer "
            f"model_max_length={getattr(tokenizer, 'model_max_length', None)} in {name}); set "
            f"{min_max_length(tokenizer, task)} <= data.max_length <= {limit}"
        )
    multiple = cfg.data.pad_to_multiple_of
    if multiple and -(-longest // multiple) * multiple > limit:
        raise ConfigError(
            f"data.pad_to_multiple_of={multiple} pads data.max_length={longest} to "
            f"{-(-longest // multiple) * multiple} tokens, beyond the model's position limit {limit}; choose a "
            f"multiple that divides {limit} or lower data.max_length"
        )


def head_class(mcfg, name: str):
    """The family's sequence-classification class, or an error naming the model and what is supported."""
    from transformers import AutoModelForSequenceClassification

    mapping = AutoModelForSequenceClassification._model_mapping
    try:
        return mapping[type(mcfg)]
    except KeyError:
        raise ConfigError(
            f"model.name_or_path: '{name}' is a '{mcfg.model_type}' model, which has no sequence-classification "
            "head in transformers (AutoModelForSequenceClassification). Use an encoder checkpoint: BERT, RoBERTa, "
            "XLM-R, DistilBERT, DeBERTa(-v2/v3), ELECTRA, ALBERT, ModernBERT, MPNet, ... (the README's Models "
            "table lists the tested ones)"
        ) from None


def supported_attention(cls) -> list[str]:
    flags = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}
    return ["eager"] + [impl for impl, flag in flags.items() if getattr(cls, flag, False)]


def _attention_kwargs(cfg: Config, cls, name: str) -> dict:
    impl = cfg.model.attn_implementation
    if impl == "auto":
        return {}
    supported = supported_attention(cls)
    if impl not in supported:
        raise ConfigError(
            f"model.attn_implementation={impl}: {cls.__name__} ('{name}') does not support it; it supports "
            f"{', '.join(supported)} (or auto)"
        )
    return {"attn_implementation": impl}


def load_model(cfg: Config, task: Task, tokenizer):
    """The encoder with a fresh (or the checkpoint's) head for ``task``; dropout and attention as configured.

    With ``model.init_from`` the weights come from that folder (train/model/warm_start.py); ``model.init_source`` then
    says from where (for run_info.json), else it is None."""
    from transformers import AutoConfig

    src = warm_start.resolve(cfg)
    name = str(src.model_dir) if src else resolve_model(cfg.model.name_or_path)
    revision = None if src else cfg.model.revision
    kwargs: dict = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(task.labels)}
        kwargs["problem_type"] = None  # a checkpoint fine-tuned for regression (STS-B) must not stay one
    key = "model.init_from" if src else "model.name_or_path"
    with reading(f"{key}: the config.json in", name, _model_files(name, key), ConfigError):
        try:
            mcfg = AutoConfig.from_pretrained(
                name, revision=revision, trust_remote_code=cfg.model.trust_remote_code, **kwargs
            )
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise _load_error(name, e) from None
    _check_sizes(mcfg, name, key)
    if cfg.model.dropout is not None:
        changed = set_dropout(mcfg, cfg.model.dropout)
        log.info("model.dropout=%g set in the model config: %s", cfg.model.dropout, ", ".join(changed) or "-")
    if getattr(mcfg, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        mcfg.pad_token_id = tokenizer.pad_token_id  # decoder heads find the last real token with it
    check_lengths(cfg, mcfg, tokenizer, name, task)
    cls = _model_class(cfg, mcfg, name)
    load_kwargs = {
        "ignore_mismatched_sizes": cfg.model.ignore_mismatched_sizes,
        "trust_remote_code": cfg.model.trust_remote_code,
        "output_loading_info": True,  # (model, info): the load report, in one log line
        **_attention_kwargs(cfg, cls, name),
    }
    with reading(f"{key}: the weights in", name, _model_files(name, key), ConfigError):
        try:
            with _quiet_transformers():  # its multi-line load report becomes the one line below
                if src:
                    model, info = warm_start.load(cls, src, mcfg, task, cfg.model.init_head, **load_kwargs)
                else:
                    model, info = cls.from_pretrained(name, config=mcfg, revision=revision, **load_kwargs)
        except RuntimeError as e:
            if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
                raise ConfigError(
                    f"model.name_or_path: '{name}' has a classification head of another size than task "
                    f"{task.name} needs ({task.num_labels} outputs). Use the encoder without its head, or set "
                    "model.ignore_mismatched_sizes=true to re-initialise the head"
                ) from None
            raise
        except (ImportError, ValueError) as e:
            msg = str(e).lower()
            if cfg.model.attn_implementation != "auto" and ("attention" in msg or "flash" in msg):
                raise ConfigError(
                    f"model.attn_implementation={cfg.model.attn_implementation} cannot be used here "
                    f"({_first_line(e)}); use sdpa, eager or auto"
                ) from None
            raise _load_error(name, e) from None
        except OSError as e:
            raise _load_error(name, e) from None
    _check_embeddings(model, tokenizer, name)
    log.info("loaded %s (%s)%s", name, type(model).__name__, _load_report(info))
    model.init_source = src.record() if src else None
    return model


def _load_report(info: dict) -> str:
    """transformers' load report in one clause: the newly initialised weights (the head) and unused ones."""
    parts = []
    for key, what in (
        ("missing_keys", "newly initialised"),
        ("unexpected_keys", "in the checkpoint, unused"),
    ):
        names = sorted(info.get(key) or [])
        if names:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            parts.append(f"{what}: {shown}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        parts.append(
            f"re-initialised (other size in the checkpoint): {', '.join(str(m[0]) for m in mismatched)}"
        )
    return "; " + "; ".join(parts) if parts else "; every weight from the checkpoint"


class _quiet_transformers:
    """transformers at error level inside the block (its warnings are reported by the caller instead)."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self.level = tlog.get_verbosity()
        tlog.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self.level)


def _model_class(cfg: Config, mcfg, name: str):
    if getattr(mcfg, "auto_map", None) and "AutoModelForSequenceClassification" in mcfg.auto_map:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification  # remote code: only the Auto class knows where it lives
    return head_class(mcfg, name)


def _check_embeddings(model, tokenizer, name: str) -> None:
    table = model.get_input_embeddings()
    rows = getattr(table, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(
            f"model.name_or_path: the tokenizer of '{name}' has {len(tokenizer)} tokens but the model's embedding "
            f"table only {rows} rows; the tokenizer does not belong to this model"
        )


def forward_params(model) -> set[str]:
    """Argument names the model's ``forward`` takes by name (a ``**kwargs`` catch-all does not count)."""
    params = inspect.signature(model.forward).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_inputs(tokenizer, model) -> Inputs:
    """What a batch feeds the model: the fields the tokenizer makes that ``forward`` takes, minus
    ``token_type_ids`` for models with a single token type (RoBERTa, XLM-R: type_vocab_size 1; DeBERTa-v3: 0)."""
    made = [k for k in tokenizer("a", "b") if k != "attention_mask"]
    accepted = forward_params(model)
    fields, dropped = [], []
    for key in made:
        types = getattr(model.config, "type_vocab_size", None)
        if key not in accepted:
            dropped.append(f"{key} (not an argument of {type(model).__name__}.forward)")
        elif key == "token_type_ids" and types is not None and types <= 1:
            dropped.append(f"{key} (the model has type_vocab_size={types})")
        else:
            fields.append(key)
    if "input_ids" not in fields:
        raise ConfigError(
            f"the model {type(model).__name__} does not take input_ids from this tokenizer (it makes {made})"
        )
    pads = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
    inputs = Inputs(tuple(fields), "attention_mask" in accepted, {k: int(pads.get(k) or 0) for k in fields})
    log.info(
        "model inputs: %s%s",
        ", ".join(inputs.model_keys),
        f"; not passed: {', '.join(dropped)}" if dropped else "",
    )
    return inputs
