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
    assert len(lines) == 4
    assert lines[0] == "advt train: started (4 steps)"
    assert lines[1].startswith("advt train: 1/4 (25%), 0m00s elapsed, ~0m00s left, loss=0.5")
    assert lines[2].startswith("advt train: 4/4 (100%)")
    assert lines[3].startswith("advt train: ended, 4/4 in ")


def test_off_terminal_bars_say_when_a_phase_starts_and_ends_and_stay_quiet_between_intervals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = TqdmProgress(bars=False, log_every=3600).bar(1000, "train")
    assert capsys.readouterr().err == "train: started (1000 steps)\n"  # a short phase shows in a log too
    for _ in range(1000):
        bar.update(1)
    assert capsys.readouterr().err == ""
    bar.close()
    bar.close()  # once
    assert capsys.readouterr().err.startswith("train: ended, 1000/1000 in ")
