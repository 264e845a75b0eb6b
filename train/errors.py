"""The one base class of errors caused by the user's input or environment (no heavy imports: cli.py uses it).

``python -m train`` turns a :class:`UserError` (and only it) into one ``error: ...`` paragraph and exit code 2; any
other exception is a bug and keeps its traceback. ``everywhere`` says the error is raised identically on every rank
(a config or data check, an agreed checkpoint failure): then only rank 0 prints it, so N processes show it once.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment; the message names the key/file/line and what to do."""

    everywhere = True
    exit_code = 2


class EnvironmentProblem(UserError):
    """A file-system or network problem met by this rank only (every rank prints its own)."""

    everywhere = False
