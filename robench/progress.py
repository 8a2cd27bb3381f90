"""Progress on a terminal (tqdm bars), quiet status lines in CI logs."""

from __future__ import annotations

import sys
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


class TqdmProgress(Progress):
    """Bars on a terminal; none when stderr is not a terminal (CI), where only
    :meth:`log` lines appear."""

    def __init__(self, bars: bool | None = None) -> None:
        self.bars = sys.stderr.isatty() if bars is None else bars

    def bar(self, total: int, desc: str) -> ProgressBar:
        """A tqdm bar, or a silent one off-terminal."""
        if not self.bars:
            return ProgressBar()
        return _TqdmBar(tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True))

    def log(self, message: str) -> None:
        """One line on stderr that does not break running bars."""
        tqdm.write(message, file=sys.stderr)
