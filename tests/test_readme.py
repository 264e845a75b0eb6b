"""The README stays true: its commands are the ones CI runs, and its config table lists every key."""

from __future__ import annotations

import re

from conftest import REPO

from train.cli import keys_markdown

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    return [ln.strip() for ln in README.splitlines() if ln.startswith("    python3 -m venv .venv")]


def test_two_setup_commands_and_ci_runs_the_test_one():
    first, tests = readme_commands()
    assert first.endswith(
        "pip install torch==2.13.0 -e '.[demo]' && glue-train train --config configs/first-run.yaml"
    )
    tail = tests.split("activate && ", 1)[1]
    assert tail.startswith("pip install") and "pytest" in tail
    assert tail in (REPO / ".ci" / "run").read_text()


def test_config_table_is_current():
    table = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", README, re.S).group(1)
    assert table == keys_markdown(), "regenerate with: python -m train --keys-markdown"
