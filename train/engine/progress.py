"""Progress that fits where it goes: a tqdm bar on a terminal, plain lines in a file, a pipe or a SLURM log.

Not on a terminal there are no carriage returns: one line at each train log step (``train.log_every``) and, in
between, at most one every ``PLAIN_EVERY_S`` seconds, each with step/total, epoch, loss, lr, samples/s and ETA.
Only the main process shows progress.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

log = logging.getLogger("train.engine.loop")
PLAIN_EVERY_S = 30.0


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, initial: int, desc: str, main: bool, stream=None):
        self.total, self.initial, self.main = total, initial, main
        self.stream = stream or sys.stderr
        self.tty = main and getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last_line = time.monotonic()
        self.step, self.epoch = initial, 0.0
        self.loss: float | None = None
        self.lr: float | None = None
        self.rate: float | None = None  # samples/s of the last log window
        self.desc = desc
        self.bar = None  # the tqdm bar, opened by redirect() (so nothing is drawn before training starts)

    def redirect(self):
        """Training starts: open the bar (on a terminal), with log lines printed above it, not through it."""
        self.t0 = self.last_line = time.monotonic()  # the ETA counts training, not the start-up before it
        if not self.tty:
            return contextlib.nullcontext()
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        if self.bar is None:
            kw = dict(
                total=self.total, initial=self.initial, unit="step", mininterval=2.0, dynamic_ncols=True
            )
            self.bar = tqdm(desc=self.desc, **kw)
        return logging_redirect_tqdm()

    def update(self, step: int, epoch: float) -> None:
        """After every optimizer step."""
        self.step, self.epoch = step, epoch
        if self.bar is not None:
            self.bar.update()
        elif self.main and time.monotonic() - self.last_line >= PLAIN_EVERY_S:
            log.info(self.line())

    def logged(self, loss: float, lr: float, samples_per_s: float) -> None:
        """At a train log step: the window's numbers, and a line (above the bar on a terminal)."""
        self.loss, self.lr, self.rate = loss, lr, samples_per_s
        if not self.main:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
        log.info(self.line())

    def line(self) -> str:
        self.last_line = time.monotonic()
        done = self.step - self.initial
        elapsed = time.monotonic() - self.t0
        eta = _eta(elapsed / done * (self.total - self.step)) if done > 0 else "?"
        parts = [f"step {self.step}/{self.total}", f"epoch {self.epoch:.2f}"]
        if self.loss is not None:
            parts += [f"loss {self.loss:.4f}", f"lr {self.lr:.3g}"]
        if self.rate is not None:
            parts.append(f"{self.rate:,.1f} samples/s")
        parts.append(f"ETA {eta}")
        return " · ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
