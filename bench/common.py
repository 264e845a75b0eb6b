"""What both benchmarks share (bench/compare_trainer.py, bench/end_to_end.py): the repository on sys.path, the
model presets and the paths, the random model folder, the GLUE task of a folder, device names, versions, and the
Trainer's view of the tokenized rows. Importing it puts the repository on sys.path (for ``train.*``) and sets the
offline environment before transformers is imported (lazily, inside the functions)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

TINY = REPO / "train" / "assets" / "tiny-bert"
PRESETS = {  # random-init shapes; the tokenizer is the bundled one (ids < 2000 fit every vocabulary here)
    "bert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 30522,
    },
    "bert-small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
        "vocab_size": 30522,
    },
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 2000,
    },
}
PATHS = ("trainer", "loop_eager", "loop_fast")


def make_model_dir(spec: str, root: Path, num_labels: int, seed: int) -> Path:
    if spec not in PRESETS:
        return Path(spec)
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(**PRESETS[spec], num_labels=num_labels, max_position_embeddings=512)
    torch.manual_seed(seed)
    out = root / f"model-{spec}"
    BertForSequenceClassification(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(TINY / name, out / name)
    return out


def task_of_folder(folder: Path) -> str:
    from train.tasks import TASKS

    for name, task in TASKS.items():
        if task.dir == folder.name:
            return name
    raise SystemExit(
        f"--lengths {folder}: not a GLUE task folder (expected one of "
        f"{', '.join(t.dir for t in TASKS.values())})"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # the CPU model, e.g. "AMD EPYC ... (2 cores)"
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def versions() -> dict:
    import accelerate
    import transformers

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": sha,
    }


def trainer_dataset(train_ds, tokenizer, model, padding: str, max_length: int):
    """The tokenized rows as the Trainer takes them: the model's own input fields (train/model/load.py's
    ``model_inputs``, never assumed BERT names), ``labels``; and the collator for ``padding``."""
    from transformers import DataCollatorWithPadding, default_data_collator

    from train.model.load import model_inputs

    inputs = model_inputs(tokenizer, model)
    keep = {*inputs.fields, "label"}
    ds = train_ds.remove_columns([c for c in train_ds.column_names if c not in keep])
    ds = ds.rename_column("label", "labels")
    if padding != "max_length":
        return ds, DataCollatorWithPadding(tokenizer)  # pads every field the tokenizer knows, and the mask

    def pad_row(r: dict) -> dict:
        n = len(r["input_ids"])
        out = {name: r[name] + [inputs.pad[name]] * (max_length - n) for name in inputs.fields}
        if inputs.mask:
            out["attention_mask"] = [1] * n + [0] * (max_length - n)
        return out

    return ds.map(pad_row), default_data_collator
