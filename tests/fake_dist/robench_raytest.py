"""A defense whose worker dies mid-build, for the Ray executor's tests (issue 15).

``kill-once`` trains like ``baseline``; while ``$ROBENCH_TEST_KILL_DIR`` is set it SIGKILLs
its own process at training batch ``kill_at``, ``kills`` times in all (counted in files in
that folder, so a retried task gets further). Ray workers import this module by name, so it
must be on their ``PYTHONPATH``. Register with ``pm.register(robench_raytest, name="raytest")``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

import robench

KILL_DIR_ENV = "ROBENCH_TEST_KILL_DIR"


class _Killer:
    """An ``after_step`` that kills the process at step ``at`` while kills are left."""

    def __init__(self, at: int, kills: int, seed: int) -> None:
        self.at, self.kills, self.seed, self.step = at, kills, seed, 0

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        folder = os.environ.get(KILL_DIR_ENV)
        if not folder or self.step != self.at:
            return
        done = sorted(Path(folder).glob(f"seed{self.seed}-kill*"))
        if len(done) < self.kills:
            (Path(folder) / f"seed{self.seed}-kill{len(done)}").touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def identity(self) -> dict[str, object]:
        return {"kind": "kill-once"}  # the kill changes no weight: the same phase either way

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


@dataclass(frozen=True, kw_only=True)
class KillOnce(robench.Defense):
    """Clean training that kills its worker at batch ``kill_at`` (see the module docstring).

    Args:
        epochs: training epochs.
        kill_at: the training batch at which the worker dies.
        kills: how many times it dies in all.
    """

    name: ClassVar[str] = "kill-once"
    epochs: int = 3
    kill_at: int = 5
    kills: int = 1

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Train a fresh model; die on the way while kills are left."""
        schedule = robench.Schedule(epochs=self.epochs, batch_size=32, lr=0.05, momentum=0.9)
        killer = _Killer(self.kill_at, self.kills, ctx.seed)
        return {"model": robench.train(ctx.new_model(), ctx, schedule, after_step=killer, desc="kill-once train")}


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """The dying defense."""
    return [KillOnce]
