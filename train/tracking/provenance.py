"""Where the code of a run came from: the git commit of the source tree, and whether it had local changes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_info(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the source tree (empty when it is not a git checkout)."""
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode:
            return {}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}
