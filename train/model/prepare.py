"""``glue-train prepare --config FILE [key.sub=value ...]``: fill the caches before an offline run.

Run it on a machine with network (a cluster's login node) with the same config and overrides as the job. It
downloads the model (weights, config, tokenizer) into the Hugging Face cache and the dataset (Hub GLUE, unless
``data.glue_dir`` points at local files), and tokenizes every split the run reads into the tokenized-data cache
(``data.cache_dir`` / ``$GLUE_TRAIN_CACHE``). The job then runs with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``
and never re-tokenizes. Export the same ``HF_HOME`` / ``GLUE_TRAIN_CACHE`` for both, on a file system the compute
nodes can read.
"""

from __future__ import annotations

import argparse
import logging

from train.config import load_config
from train.errors import guarded


def prepare(cfg) -> list[str]:
    """Download and tokenize what ``cfg``'s run needs; return one line per cached item."""
    from train.data import glue, tokenized
    from train.model.load import load_model, load_tokenizer
    from train.tasks import get_task

    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(cfg)
    load_model(cfg, task, tokenizer)  # weights into the HF cache (a local folder is just read)
    done = [f"model {glue.resolve_model(cfg.model.name_or_path)}"]
    kinds = ("train", "dev", "test") if cfg.eval.predict_test else ("train", "dev")
    for kind in kinds:
        for split in task.split(kind):
            ds = tokenized.tokenize_split(cfg.data, task, split, tokenizer)
            key = tokenized.cache_key(cfg.data, task, split, tokenizer)
            done.append(f"{task.name}/{split.name}: {len(ds)} rows -> {tokenized.cache_root(cfg.data) / key}")
    return done


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="glue-train prepare",
        description="Download the model and dataset and tokenize every split, so that `glue-train train` with the "
        "same config runs offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1) from the caches.",
    )
    parser.add_argument(
        "--config", action="append", default=[], help="YAML config file(s) the job will use (repeatable)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="the job's config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    for line in prepare(cfg):
        print(f"prepared {line}")
    print("ready: run the job with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 and the same cache locations")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``glue-train prepare``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
