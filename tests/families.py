"""Tiny random encoders of every family users bring, each with a tokenizer in the format its real checkpoints ship.

Each model is saved as a bare encoder (``<Family>Model``, no head, as the Hub checkpoints are), next to a
tokenizer trained here with the ``tokenizers`` library on real GLUE text (the bundled sample):

- WordPiece: BERT, DistilBERT, ELECTRA (``[CLS] A [SEP] B [SEP]``, token types), MPNet (``<s> A </s></s> B </s>``);
- byte-level BPE: RoBERTa (``<s> A </s></s> B </s>``, ``type_vocab_size: 1`` as roberta-base ships),
  ModernBERT (``[CLS] A [SEP] B [SEP]``, no token types);
- Unigram (SentencePiece-style, Metaspace): XLM-R (``<s> A </s></s> B </s>``), DeBERTa-v3 (token types made by the
  tokenizer, ``type_vocab_size: 0`` in the model), ALBERT.

Built once per test session (a few seconds for all of them) by the ``families`` fixture in ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "train" / "assets" / "glue_sample"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VOCAB = 700


def glue_text() -> list[str]:
    """Every sentence of the bundled SST-2, RTE and MRPC samples (train, dev and test)."""
    out = []
    for task in ("SST-2", "RTE", "MRPC"):
        for split in ("train", "dev", "test"):
            for line in (SAMPLE / task / f"{split}.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]:
                out += [f for f in line.split("\t") if len(f) > 12]
    return out


def _template(cls: str, sep: str, roberta_pairs: bool, types: bool) -> tuple[str, str]:
    if roberta_pairs:
        return f"{cls} $A {sep}", f"{cls} $A {sep} {sep} $B {sep}"
    return f"{cls} $A {sep}", f"{cls} $A {sep} $B{':1' if types else ''} {sep}{':1' if types else ''}"


def wordpiece(text, cls="[CLS]", sep="[SEP]", pad="[PAD]", unk="[UNK]", mask="[MASK]", roberta_pairs=False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        text, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=[pad, unk, cls, sep, mask])
    )
    single, pair = _template(cls, sep, roberta_pairs, types=not roberta_pairs)
    ids = [(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    return tok


def byte_bpe(text, cls, sep, pad, unk, mask, roberta_pairs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[cls, pad, sep, unk, mask],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    if roberta_pairs:
        tok.post_processor = processors.RobertaProcessing(
            (sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls))
        )
    else:
        single, pair = _template(cls, sep, False, types=False)
        ids = [(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    return tok


def unigram(text, cls, sep, pad, unk, mask, roberta_pairs, types):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = [cls, pad, sep, unk, mask]
    tok.train_from_iterator(
        text, trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token=unk)
    )
    single, pair = _template(cls, sep, roberta_pairs, types)
    ids = [(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
    return tok


_BERT_TOKENS = dict(
    cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
)
_ROBERTA_TOKENS = dict(
    bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
    mask_token="<mask>",
)  # fmt: skip


def _specials(kw: dict) -> tuple[str, str, str, str, str]:
    return kw["cls_token"], kw["sep_token"], kw["pad_token"], kw["unk_token"], kw["mask_token"]


# family -> (config class name, tokenizer class name, tokenizer builder, special tokens, config extras)
FAMILIES: dict[str, tuple] = {
    "bert": ("BertConfig", "BertTokenizer", "wordpiece", _BERT_TOKENS, {}),
    "distilbert": (
        "DistilBertConfig", "DistilBertTokenizer", "wordpiece", _BERT_TOKENS,
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    ),
    "electra": ("ElectraConfig", "ElectraTokenizer", "wordpiece", _BERT_TOKENS, dict(embedding_size=16)),
    "mpnet": (
        "MPNetConfig", "MPNetTokenizer", "wordpiece_roberta",
        {**_ROBERTA_TOKENS, "unk_token": "[UNK]"}, dict(max_position_embeddings=514),
    ),
    "roberta": (
        "RobertaConfig", "RobertaTokenizer", "byte_bpe_roberta", _ROBERTA_TOKENS,
        dict(type_vocab_size=1, max_position_embeddings=514),
    ),
    "modernbert": (
        "ModernBertConfig", "PreTrainedTokenizerFast", "byte_bpe", {**_BERT_TOKENS, "unk_token": "<unk>"},
        dict(global_attn_every_n_layers=2, local_attention=16, max_position_embeddings=512),
    ),
    "xlm-roberta": (
        "XLMRobertaConfig", "XLMRobertaTokenizer", "unigram_roberta", _ROBERTA_TOKENS,
        dict(type_vocab_size=1, max_position_embeddings=514),
    ),
    "deberta-v3": (
        "DebertaV2Config", "DebertaV2Tokenizer", "unigram_types", _BERT_TOKENS,
        dict(type_vocab_size=0, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
             position_biased_input=False, max_relative_positions=-1),
    ),
    "albert": (
        "AlbertConfig", "AlbertTokenizer", "unigram_types", {**_BERT_TOKENS, "pad_token": "<pad>", "unk_token": "<unk>"},
        dict(embedding_size=16),
    ),
}  # fmt: skip


def build_tokenizer(kind: str, kw: dict, text: list[str]):
    cls, sep, pad, unk, mask = _specials(kw)
    if kind == "wordpiece":
        return wordpiece(text, cls, sep, pad, unk, mask)
    if kind == "wordpiece_roberta":
        return wordpiece(text, cls, sep, pad, unk, mask, roberta_pairs=True)
    if kind.startswith("byte_bpe"):
        return byte_bpe(text, cls, sep, pad, unk, mask, roberta_pairs=kind.endswith("roberta"))
    return unigram(
        text, cls, sep, pad, unk, mask, roberta_pairs=kind.endswith("roberta"), types=kind.endswith("types")
    )


def build_family(name: str, dest: Path, text: list[str] | None = None) -> Path:
    """Save a tiny random ``name`` encoder (no head) and its tokenizer into ``dest``."""
    import torch
    import transformers
    from transformers import AutoModel

    config_cls, tok_cls, kind, special, extra = FAMILIES[name]
    raw = build_tokenizer(kind, special, text or glue_text())
    tokenizer = getattr(transformers, tok_cls)(tokenizer_object=raw, model_max_length=512, **special)
    if (
        tok_cls == "PreTrainedTokenizerFast"
    ):  # ModernBERT's tokenizer_config names no class and no token types
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.save_pretrained(dest)
    kwargs = {**TINY, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **extra}
    for key, value in (("bos_token_id", tokenizer.cls_token_id), ("eos_token_id", tokenizer.sep_token_id)):
        kwargs.setdefault(key, value)
    if name == "modernbert":
        kwargs.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(dest)
    return dest


def build_all(root: Path) -> dict[str, Path]:
    text = glue_text()
    return {name: build_family(name, Path(root) / name, text) for name in FAMILIES}


def build_decoder(dest: Path, text: list[str] | None = None) -> Path:
    """A tiny GPT-2 (a decoder checkpoint) whose tokenizer has no pad token, as GPT-2's does not."""
    import torch
    from transformers import GPT2Config, GPT2Model, GPT2Tokenizer

    raw = byte_bpe(
        text or glue_text(), "<|endoftext|>", "<|pad-unused|>", "<|endoftext|>", "<|unk|>", "<|mask|>", False
    )
    from tokenizers import processors

    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = GPT2Tokenizer(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|unk|>"
    )
    tok.pad_token = None
    tok.save_pretrained(dest)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256)
    torch.manual_seed(0)
    GPT2Model(cfg).save_pretrained(dest)
    return dest


def build_without_head(dest: Path, tokenizer_from: Path) -> Path:
    """A Marian (translation) checkpoint: transformers has no sequence-classification head for it."""
    import shutil

    from transformers import MarianConfig

    MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(dest)
    for f in Path(tokenizer_from).glob("tokenizer*"):
        shutil.copy(f, dest / f.name)
    return dest


REMOTE_CODE = """
from transformers import BertConfig, BertForSequenceClassification


class TinyCustomConfig(BertConfig):
    model_type = "tiny-custom"


class TinyCustomForSequenceClassification(BertForSequenceClassification):
    config_class = TinyCustomConfig
"""


def build_remote_code(dest: Path, bert_from: Path) -> Path:
    """A checkpoint whose config names classes in its own ``custom.py`` (needs model.trust_remote_code)."""
    import shutil

    shutil.copytree(bert_from, dest)
    (dest / "custom.py").write_text(REMOTE_CODE)
    config = json.loads((dest / "config.json").read_text())
    config.update(
        model_type="tiny-custom",
        architectures=["TinyCustomForSequenceClassification"],
        auto_map={
            "AutoConfig": "custom.TinyCustomConfig",
            "AutoModelForSequenceClassification": "custom.TinyCustomForSequenceClassification",
        },
    )
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest
