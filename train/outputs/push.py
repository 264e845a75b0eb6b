"""``glue-train push RUN_DIR --repo-id NAME [--which best|final] [--private]``: a run's model to the Hub.

Uploads ``RUN_DIR/best`` (default) or ``RUN_DIR/final`` (model, tokenizer and the model card ``README.md`` the run
wrote, see ``train/outputs/card.py``) with ``huggingface_hub``: ``create_repo(exist_ok=True)`` then ONE ``upload_folder``
commit, so the repository gets the whole folder or nothing of it.

Everything that can be checked locally is checked before the first network call: the folder and its files, the
model card's metadata (offline, ``train.outputs.card.check_card``), the repo id, offline mode (``HF_HUB_OFFLINE``) and a
token (``hf auth login`` or ``$HF_TOKEN``). Then the Hub validates the card (``ModelCard.validate``) before the
upload. Any problem: one ``error: ...`` line, exit 2, no traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.errors import PushError, guarded
from train.outputs.card import check_card

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_folder(run_dir: Path, which: str):
    """The folder to upload and its parsed model card; raises ``PushError`` naming what is missing or wrong."""
    from huggingface_hub import ModelCard

    if not run_dir.is_dir():
        raise PushError(f"{run_dir} is not a folder (give a run folder, the output_dir of a run)")
    folder = run_dir / which
    if not folder.is_dir():
        raise PushError(
            f"{folder} not found: the run has no {which}/ model (it writes best/ and final/ when it finishes)"
        )
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder / 'config.json'} not found: {folder} is not a saved model folder")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise PushError(f"{folder} holds no model weights ({', '.join(WEIGHTS)})")
    readme = folder / "README.md"
    if not readme.is_file():
        raise PushError(f"{readme} not found: write the model card first with `glue-train card {run_dir}`")
    try:
        card = ModelCard.load(readme, ignore_metadata_errors=False)
    except (ValueError, OSError) as e:
        raise PushError(f"{readme}: the model card does not parse ({e})") from None
    problems = check_card(card)
    if problems:
        raise PushError(
            f"{readme}: " + "; ".join(problems) + f" (rewrite it with `glue-train card {run_dir}`)"
        )
    return folder, card


def check_target(repo_id: str) -> str:
    """The repo id and the token, before any network call."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(
            f"--repo-id {repo_id!r} is not a valid Hub repo id ({e}); use NAME or USER/NAME"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise PushError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded; run the push where there is network, "
            "with HF_HUB_OFFLINE unset (nothing was uploaded)"
        )
    token = get_token()
    if not token:
        raise PushError("not logged in to the Hugging Face Hub: run `hf auth login` or set $HF_TOKEN")
    return token


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def push(run_dir: str | Path, repo_id: str, which: str = "best", private: bool = False) -> str:
    """Upload ``run_dir/which`` to ``repo_id`` in one commit; returns the commit URL."""
    folder, card = check_folder(Path(run_dir), which)
    token = check_target(repo_id)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        card.validate(repo_type="model")
    except Exception as e:  # noqa: BLE001 - network or validation: both end the push before any upload
        raise PushError(
            f"the Hub's check of the model card failed ({_why(e)}): no network, or the Hub refused the card's "
            "metadata; nothing was uploaded"
        ) from None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as e:  # noqa: BLE001
        raise PushError(
            f"could not create or find the repo {repo_id} ({_why(e)}); nothing was uploaded"
        ) from None
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=f"glue-train: {which} model of {Path(run_dir).resolve().name}",
        )
    except Exception as e:  # noqa: BLE001
        raise PushError(
            f"the upload to {repo_id} failed ({_why(e)}); it is one commit, so the repo holds none of {folder} "
            "(files from an earlier push stay as they were); rerun the same command"
        ) from None
    return str(info.commit_url)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="glue-train push", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder (output_dir)")
    p.add_argument("--repo-id", required=True, help="NAME or USER/NAME on the Hub (created if missing)")
    p.add_argument(
        "--which", choices=["best", "final"], default="best", help="which model folder (default best)"
    )
    p.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo is kept as is)"
    )
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    url = push(args.run_dir, args.repo_id, args.which, args.private)
    print(f"pushed {Path(args.run_dir) / args.which} to {args.repo_id}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``glue-train push``; errors through the CLI's one boundary."""
    return guarded(lambda: _main(argv))
