"""Where metrics go: ``metrics.jsonl`` always (main process), and trackers such as W&B when configured."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Append-only JSON lines, one object per logged step; rewound on resume so no step appears twice."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def rewind(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to work a resumed run will redo)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
