"""Load the tokenizer and the sequence-classification model, with clear errors for the usual mistakes."""

from __future__ import annotations

from pathlib import Path

from train.config import Config, ConfigError
from train.data import offline_advice, resolve_builtin
from train.tasks import Task


def _offline_hint(name: str, e: Exception) -> ConfigError:
    local = name.startswith((".", "/", "~")) or Path(name).exists()
    what = (
        "it is not a folder holding config.json and the weights; check the path"
        if local
        else "it is neither a local folder nor a Hub model this machine could load. " + offline_advice()
    )
    return ConfigError(
        f"model.name_or_path: could not load '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
        f"{what}"
    )


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    name = resolve_builtin(cfg.model.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision, use_fast=True)
    except (OSError, ValueError) as e:
        raise _offline_hint(name, e) from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"model.name_or_path: '{name}' has no fast tokenizer; a tokenizers-backed one is required"
        )
    return tok


def load_model(cfg: Config, task: Task):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    name = resolve_builtin(cfg.model.name_or_path)
    kwargs: dict = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(task.labels)}
    if cfg.model.dropout is not None:
        kwargs.update(hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout)
    try:
        mcfg = AutoConfig.from_pretrained(name, revision=cfg.model.revision, **kwargs)
    except (OSError, ValueError) as e:
        raise _offline_hint(name, e) from None
    limit = getattr(mcfg, "max_position_embeddings", None)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's position limit "
            f"(max_position_embeddings={limit} in {name}); set data.max_length <= {limit}"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            config=mcfg,
            revision=cfg.model.revision,
            ignore_mismatched_sizes=cfg.model.ignore_mismatched_sizes,
        )
    except RuntimeError as e:
        if "size mismatch" in str(e) or "ignore_mismatched_sizes" in str(e):
            raise ConfigError(
                f"model.name_or_path: '{name}' has a classification head of another size than task "
                f"{task.name} needs ({task.num_labels} outputs). Use the encoder without its head, or set "
                "model.ignore_mismatched_sizes=true to re-initialise the head"
            ) from None
        raise
    except OSError as e:
        raise _offline_hint(name, e) from None
    return model
