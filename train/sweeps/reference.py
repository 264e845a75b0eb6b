"""Published BERT-base GLUE **dev-set** numbers, shown next to ours in ``glue-train report``.

Source: Hugging Face Transformers, ``examples/text-classification/README.md`` (later
``examples/pytorch/text-classification/README.md``), section "PyTorch version", the table after
"We get the following results on the dev set of the benchmark with the previous commands":
https://github.com/huggingface/transformers/tree/main/examples/pytorch/text-classification

Setup of those numbers: ``bert-base-cased``, ``run_glue.py``, max_seq_length 128, batch 32, lr 2e-5, 3 epochs
(5 for MRPC and WNLI), one seed, single GPU, FP32. The table (percent):

    CoLA  Matthew's corr                 56.53
    SST-2 Accuracy                       92.32
    MRPC  F1/Accuracy                    88.85/84.07
    STS-B Pearson/Spearman corr.         88.64/88.48
    QQP   Accuracy/F1                    90.71/87.49
    MNLI  Matched acc./Mismatched acc.   83.91/84.10
    QNLI  Accuracy                       90.66
    RTE   Accuracy                       65.70
    WNLI  Accuracy                       56.34

They are single runs: small tasks (RTE, MRPC, CoLA, STS-B, WNLI) move by several points between seeds, so
compare them with our median and spread, not with one seed. (The BERT paper's Table 1 numbers are test-set
scores from the GLUE server, not dev, so they are not used here.)
"""

from __future__ import annotations

REFERENCE_NAME = "HF run_glue bert-base-cased (dev, 1 seed)"
REFERENCE_URL = "https://github.com/huggingface/transformers/tree/main/examples/pytorch/text-classification"

# Task entry (as in the GLUE table) -> metric -> value in percent.
BERT_BASE_DEV: dict[str, dict[str, float]] = {
    "CoLA": {"matthews_corr": 56.53},
    "SST-2": {"accuracy": 92.32},
    "MRPC": {"f1": 88.85, "accuracy": 84.07},
    "STS-B": {"pearson": 88.64, "spearman": 88.48},
    "QQP": {"accuracy": 90.71, "f1": 87.49},
    "MNLI-m": {"accuracy": 83.91},
    "MNLI-mm": {"accuracy": 84.10},
    "QNLI": {"accuracy": 90.66},
    "RTE": {"accuracy": 65.70},
    "WNLI": {"accuracy": 56.34},
}


def reference_score(entry: str) -> float | None:
    """The entry's GLUE score (mean of its metrics) in percent, or None when there is no reference."""
    metrics = BERT_BASE_DEV.get(entry)
    return sum(metrics.values()) / len(metrics) if metrics else None
