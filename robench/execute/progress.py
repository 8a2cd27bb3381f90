"""Progress on a terminal (tqdm bars), quiet status lines in CI logs."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

from robench.context import Progress, ProgressBar


class _TqdmBar(ProgressBar):
    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def update(self, n: int = 1, **postfix: float) -> None:
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()


class _LogBar(ProgressBar):
    """Off-terminal progress: a line when the phase starts and when it ends, and a status
    line per ``every`` seconds in between (never per step), so a CI log or a background run
    shows every phase, short ones included, and a long one shows it is alive."""

    def __init__(self, total: int, desc: str, every: float) -> None:
        self.total, self.desc, self.every = total, desc, every
        self.done = 0
        self.closed = False
        self.start = self.last = time.monotonic()
        tqdm.write(f"{desc}: started ({total} steps)", file=sys.stderr)

    def close(self) -> None:
        """The phase's end line: steps done and time taken (once)."""
        if self.closed:
            return
        self.closed = True
        tqdm.write(
            f"{self.desc}: ended, {self.done}/{self.total} in {_clock(time.monotonic() - self.start)}", file=sys.stderr
        )

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every or not self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed * (self.total - self.done) / max(self.done, 1)
        figures = "".join(f", {k}={v:.3g}" for k, v in postfix.items())
        tqdm.write(
            f"{self.desc}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), "
            f"{_clock(elapsed)} elapsed, ~{_clock(left)} left{figures}",
            file=sys.stderr,
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class TqdmProgress(Progress):
    """Bars on a terminal; off-terminal (CI logs, background runs) a status line per bar
    every ``log_every`` seconds, besides the :meth:`log` lines."""

    def __init__(self, bars: bool | None = None, log_every: float = 60.0) -> None:
        self.bars = sys.stderr.isatty() if bars is None else bars
        self.log_every = log_every

    def bar(self, total: int, desc: str) -> ProgressBar:
        """A tqdm bar, or a periodic status line off-terminal."""
        if not self.bars:
            return _LogBar(total, desc, self.log_every)
        return _TqdmBar(tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True))

    def log(self, message: str) -> None:
        """One line on stderr that does not break running bars."""
        tqdm.write(message, file=sys.stderr)
