"""Checkpoints that let a training phase killed mid-way resume where it stopped.

:func:`robench.train` keeps one checkpoint file per training phase in the build's scratch
folder (``Context.cache_dir``, which the model cache deletes once the build's models are
saved, so only an interrupted build leaves checkpoints behind). A file holds everything the
rest of the phase depends on: the weights, the optimizer and learning-rate schedule, the
epoch's batch order and position, the loop's data generator, torch's global generator
(CPU, and CUDA when training there: torchattacks' random starts draw from it) and the state
of stateful callbacks (``inputs``, ``loss``, ``after_step``: the eps ramp of
:func:`robench.pgd_inputs`, a loss's own generator). Resuming from it therefore ends with
exactly the weights of an uninterrupted phase.

A phase is identified by *what it computes*, not by when it runs: a digest of its
description, schedule, seed, training data (size and labels), the device kind, its
starting weights and module structure, and its callbacks (parameters and starting state
for :class:`Stateful` ones; module and qualified name for other callables, which is enough
because the scratch folder is private to one model key: only a code change could give
another callable the same name there, and a code change bumps the defense's revision). The
training loop is a function of exactly these, so a checkpoint whose identity matches is
valid wherever it is found; one written with other parameters has another name, and its
stored identity is compared on load as well. Phases of a multi-phase build never collide
(phase 2 starts from phase 1's weights), and a finished phase keeps its final checkpoint
until the build is saved: rerunning a build that crashed in phase 2 loads phase 1's result
instead of training it again, then resumes phase 2.

Files are written to a temporary name in the same folder and renamed into place
(``os.replace``), so a kill at any moment leaves the previous checkpoint or the new one,
never half of one. They are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from robench.context import Context

FORMAT = 2
PERIOD_ENV = "ROBENCH_CHECKPOINT_SECONDS"
DEFAULT_PERIOD = 600.0
"""Seconds between mid-epoch checkpoints (besides the one at every epoch's end): paper-preset
epochs on a GPU take minutes, and a checkpoint of a CIFAR ResNet costs well under a second."""


@runtime_checkable
class Stateful(Protocol):
    """A training callback with state that must survive a resume (a step counter, a
    generator of its own): an ``inputs``, ``loss`` or ``after_step`` of :func:`robench.train`.

    :func:`robench.train` saves ``state_dict()`` in its checkpoints and calls
    ``load_state_dict`` on resume; ``identity()`` names the callback's parameters, which
    (with the starting state) are part of the phase's identity.
    """

    def identity(self) -> dict[str, object]:
        """JSON-able parameters that determine the function's outputs (not its state)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The mutable state, as python numbers or tensors."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@dataclass
class Position:
    """Where a phase resumes: the next epoch and batch, and that epoch's batch order."""

    epoch: int = 0
    batch: int = 0
    order: Tensor | None = None


@dataclass
class Parts:
    """The objects of one training phase whose state a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    callbacks: dict[str, Callable[..., Any] | None]
    """The phase's ``inputs``, ``loss`` and ``after_step`` (None where the default applies)."""
    device: torch.device


class Checkpointer:
    """Saves and restores one training phase's checkpoint file (none when ``path`` is None)."""

    def __init__(self, path: Path | None, identity: str, log: Callable[[str], None]) -> None:
        self.path, self.identity, self.log = path, identity, log
        self.period = float(os.environ.get(PERIOD_ENV, DEFAULT_PERIOD))
        self.last = time.monotonic()

    @classmethod
    def for_phase(
        cls,
        model: nn.Module,
        ctx: Context,
        schedule: dict[str, object],
        callbacks: dict[str, Callable[..., Any] | None],
        desc: str,
    ) -> Checkpointer:
        """The checkpointer of the phase ``train(model, ctx, schedule, **callbacks, desc)``
        runs (``schedule`` as a dict of its fields: this module does not import the loop).

        Without a scratch folder (``ctx.cache_dir`` missing: a caller outside the runner),
        nothing is saved.
        """
        identity = json.dumps(_identity(model, ctx, schedule, callbacks, desc), sort_keys=True)
        if not ctx.cache_dir.is_dir():
            return cls(None, identity, ctx.progress.log)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", desc).strip("-")[:40] or "train"
        return cls(ctx.cache_dir / f"train-{slug}-{digest}.pt", identity, ctx.progress.log)

    def restore(self, parts: Parts, desc: str, epochs: int) -> Position:
        """Load the phase's checkpoint into ``parts`` if there is a valid one; where to go on."""
        state = self._read()
        if state is None:
            return Position()
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.generator.set_state(state["generator"])
        torch.set_rng_state(state["cpu_rng"])
        if parts.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], parts.device)
        for name, callback in parts.callbacks.items():
            if isinstance(callback, Stateful):
                callback.load_state_dict(state["callbacks"][name])
        pos = Position(state["epoch"], state["batch"], state["order"])
        if pos.epoch >= epochs:
            self.log(f"resuming {desc} at its end (finished before the interruption) from {self.path}")
        else:
            self.log(f"resuming {desc} from epoch {pos.epoch + 1}, batch {pos.batch + 1} of {self.path}")
        return pos

    def due(self) -> bool:
        """Whether the period since the last checkpoint has passed (for mid-epoch ones)."""
        return self.path is not None and time.monotonic() - self.last >= self.period

    def save(self, parts: Parts, pos: Position) -> None:
        """Write the phase's state at ``pos`` atomically, replacing the previous checkpoint."""
        if self.path is None:
            return
        cuda = parts.device.type == "cuda"
        state = {
            "format": FORMAT,
            "identity": self.identity,
            "epoch": pos.epoch,
            "batch": pos.batch,
            "order": pos.order,
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "generator": parts.generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(parts.device) if cuda else None,
            "callbacks": {
                name: callback.state_dict() if isinstance(callback, Stateful) else None
                for name, callback in parts.callbacks.items()
            },
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(state, handle)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.last = time.monotonic()

    def _read(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable (e.g. a full disk): train the phase from its start
            self.log(f"ignoring unreadable checkpoint {self.path}: {type(exc).__name__}: {exc}")
            return None
        if state.get("format") != FORMAT or state.get("identity") != self.identity:
            self.log(f"ignoring checkpoint {self.path}: written for other parameters")
            return None
        return state


def _identity(
    model: nn.Module,
    ctx: Context,
    schedule: dict[str, object],
    callbacks: dict[str, Callable[..., Any] | None],
    desc: str,
) -> dict[str, object]:
    return {
        "format": FORMAT,
        "desc": desc,
        "schedule": schedule,
        "seed": ctx.seed,
        "device": ctx.device.type,
        "data": [len(ctx.train), hashlib.sha256(ctx.train.labels.numpy().tobytes()).hexdigest()],
        "model": _model_digest(model),
        "callbacks": {name: _callback_identity(callback) for name, callback in sorted(callbacks.items())},
    }


def _model_digest(model: nn.Module) -> str:
    """Module structure and starting weights (bytes, dtypes, shapes)."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for name, value in model.state_dict().items():
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            raw = value.int_repr() if value.is_quantized else value
            # a copy: numpy() would pin the tensor's storage, and observers resize theirs
            h.update(raw.reshape(-1).view(torch.uint8).clone().numpy().tobytes())
        else:
            h.update(f"{name}:{value!r};".encode())
    return h.hexdigest()


def _callback_identity(callback: Callable[..., Any] | None) -> object:
    if callback is None:
        return None
    if isinstance(callback, Stateful):
        start = {k: _plain(v) for k, v in callback.state_dict().items()}
        return {"params": callback.identity(), "start": start}
    kind = callback if hasattr(callback, "__qualname__") else type(callback)
    return f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', '')}"


def _plain(value: object) -> object:
    """A JSON-able digest of one state entry (a generator state is a large uint8 tensor)."""
    if isinstance(value, Tensor):
        if value.numel() > 64:
            return hashlib.sha256(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
