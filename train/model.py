"""Load the tokenizer and the sequence-classification model, with clear errors for the usual mistakes."""

from __future__ import annotations

from train.config import Config, ConfigError
from train.data import resolve_builtin
from train.tasks import Task


def _offline_hint(name: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"model.name_or_path: could not load '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
        "If it is a Hub id, this machine needs network or a filled cache (run `python -m train.prepare` "
        "where there is network, then set HF_HUB_OFFLINE=1); otherwise give a local directory holding "
        "config.json and the weights."
    )


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    name = resolve_builtin(cfg.model.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision, use_fast=True)
    except (OSError, ValueError) as e:
        raise _offline_hint(name, e) from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"model.name_or_path: '{name}' has no fast tokenizer; a tokenizers-backed one is required")
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

