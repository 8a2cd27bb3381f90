"""A defense whose worker dies mid-build, and an attack whose worker dies mid-shard, for the
Ray executor's tests (issues 15, 20).

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

import torch
from torch import Tensor, nn

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


@dataclass(frozen=True, kw_only=True)
class KillShard(robench.Attack):
    """One signed gradient step of size eps (FGSM) that kills its worker at its first call
    ever while ``$ROBENCH_TEST_KILL_DIR`` is set (a ``shard-kill`` file marks it done), and
    appends the batch's first key to ``calls`` there at every call: a shard rerun after the
    kill shows up as its key twice.
    """

    name: ClassVar[str] = "kill-shard"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """The FGSM step; first the call log and, once, the kill."""
        folder = os.environ.get(KILL_DIR_ENV)
        if folder:
            with open(Path(folder) / "calls", "a") as log:
                log.write(f"{int(keys[0])}\n")
            marker = Path(folder) / "shard-kill"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        x_adv = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        return (x + threat.eps * grad.sign()).clamp(0, 1).detach()


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """The dying defense."""
    return [KillOnce]


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    """The dying attack."""
    return [KillShard]
