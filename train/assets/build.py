"""Rebuild the bundled assets: samples of real GLUE rows and a tiny BERT (tokenizer + random weights).

    python train/assets/build.py /path/to/glue_data     # the official GLUE download layout

The rows are copied byte for byte (headers, BOMs and quoting kept) so the samples exercise the real readers.
"""

import sys
from pathlib import Path

HERE = Path(__file__).parent
# asset folder -> GLUE folder -> rows kept per file (data rows, header excluded; None = all)
SAMPLES = {
    # the tests' sample: small enough for seconds-long pipeline runs
    "glue_sample": {
        "SST-2": {"train.tsv": 512, "dev.tsv": 96, "test.tsv": 40},
        "RTE": {"train.tsv": 128, "dev.tsv": 40, "test.tsv": 24},
        "MRPC": {"train.tsv": 128, "dev.tsv": 40, "test.tsv": 24},
    },
    # the README's first run (configs/first-run.yaml): a fixed training subset, the full dev and test sets
    "sst2_2400": {"SST-2": {"train.tsv": 2400, "dev.tsv": None, "test.tsv": None}},
}


def copy_samples(glue: Path) -> None:
    for asset, folders in SAMPLES.items():
        for folder, files in folders.items():
            out = HERE / asset / folder
            out.mkdir(parents=True, exist_ok=True)
            for name, rows in files.items():
                data = (glue / folder / name).read_bytes()
                if rows is not None:
                    data = b"\n".join(data.split(b"\n")[: rows + 1]) + b"\n"
                (out / name).write_bytes(data)


def build_tiny_bert() -> None:
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    texts = []
    for path in sorted((HERE / "glue_sample").rglob("*.tsv")):
        for line in path.read_text(encoding="utf-8-sig").splitlines()[1:]:
            texts += [c for c in line.split("\t") if len(c) > 20]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=2000, min_frequency=1)
    out = HERE / "tiny-bert"
    out.mkdir(exist_ok=True)
    wp.save_model(str(out))
    vocab = (out / "vocab.txt").read_text().splitlines()
    tok = BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512
    )
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    copy_samples(Path(sys.argv[1]))
    build_tiny_bert()
