"""Progress reporting: tqdm bars on a terminal, periodic status lines elsewhere."""

from __future__ import annotations

import pytest

from robench.execute.progress import TqdmProgress


def test_off_terminal_bars_print_status_lines_with_the_time_left(capsys: pytest.CaptureFixture[str]) -> None:
    bar = TqdmProgress(bars=False, log_every=0).bar(4, "advt train")
    bar.update(1, loss=0.5)
    bar.update(3)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("advt train: 1/4 (25%), 0m00s elapsed, ~0m00s left, loss=0.5")
    assert lines[1].startswith("advt train: 4/4 (100%)")


def test_off_terminal_bars_stay_quiet_between_intervals(capsys: pytest.CaptureFixture[str]) -> None:
    bar = TqdmProgress(bars=False, log_every=3600).bar(1000, "train")
    for _ in range(1000):
        bar.update(1)
    assert capsys.readouterr().err == ""
