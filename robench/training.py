"""Training loops shared by defense plugins: batching, augmentation, schedules, devices.

Public for third-party defenses too. Every random draw comes from generators seeded by
the build context, so the same seed trains the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench.context import Context, ImageData
from robench.resume import Checkpointer, Parts, Position

# (model, x, y) -> the inputs to train on, e.g. PGD examples for adversarial training
InputFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
# (model, x, y) -> the batch's scalar training loss (cross-entropy of model(x) by default)
LossStep = Callable[[nn.Module, Tensor, Tensor], Tensor]
# (model) -> None, after every optimizer step (e.g. re-applying pruning masks)
AfterStep = Callable[[nn.Module], None]


@dataclass(frozen=True)
class Schedule:
    """SGD hyperparameters and data budget of one training phase."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    train_subset: int = 0
    augment: str = "none"


def subset_indices(n_total: int, n: int, seed: int) -> Tensor:
    """A reproducible random subset of ``n`` indices (all of them, in order, when n is 0)."""
    if n <= 0 or n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def iterate(data: ImageData, indices: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled float batches in [0, 1] over ``indices``."""
    order = indices[torch.randperm(len(indices), generator=gen)]
    for start in range(0, len(order), batch_size):
        yield data.batch(order[start : start + batch_size])


def crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding and horizontal flip (the CIFAR training augmentation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def sgd(model: nn.Module, schedule: Schedule) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """A fresh SGD optimizer and step learning-rate schedule for one training phase."""
    opt = torch.optim.SGD(
        model.parameters(),
        lr=schedule.lr,
        momentum=schedule.momentum,
        weight_decay=schedule.weight_decay,
        nesterov=schedule.nesterov,
    )
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(schedule.milestones), schedule.gamma)


def train(
    model: nn.Module,
    ctx: Context,
    schedule: Schedule,
    *,
    inputs: InputFn | None = None,
    loss: LossStep | None = None,
    after_step: AfterStep | None = None,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` with SGD, one phase: every batch goes through ``inputs(model, x, y)``
    (clean by default), then ``loss(model, x, y)`` (cross-entropy of ``model(x)`` by
    default: TRADES, distillation or a consistency loss replace it), one optimizer step,
    then ``after_step(model)`` (re-applying pruning masks, say).

    On CUDA the forward/backward runs in channels_last with bf16 autocast; attacks inside
    ``inputs`` run in full precision so they keep their strength. ``loss`` runs under the
    autocast too.

    The phase checkpoints into ``ctx.cache_dir`` at every epoch's end and every
    ``$ROBENCH_CHECKPOINT_SECONDS`` (default 600) within an epoch; called again after a
    crash it resumes from its last checkpoint and ends with the weights of an uninterrupted
    run (:mod:`robench.resume`). A callback with state of its own (a step counter, its own
    generator) must implement :class:`robench.Stateful`, as :func:`pgd_inputs` does; one
    drawing from torch's global generator needs nothing (the checkpoint holds it). A
    multi-phase defense calls ``train`` once per phase and resumes at the phase it was in.
    """
    gen = ctx.generator(salt=1)
    torch.manual_seed(ctx.seed)  # for library code that draws from the global generator
    callbacks = {"inputs": inputs, "loss": loss, "after_step": after_step}
    checkpoints = Checkpointer.for_phase(model, ctx, dataclasses.asdict(schedule), callbacks, desc)
    device = ctx.device
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt, sched = sgd(model, schedule)
    parts = Parts(model, opt, sched, gen, callbacks, device)
    indices = subset_indices(len(ctx.train), schedule.train_subset, ctx.seed)
    n_batches = -(-len(indices) // schedule.batch_size)
    pos = checkpoints.restore(parts, desc, schedule.epochs)
    bar = ctx.progress.bar(schedule.epochs * n_batches, desc)
    if pos.epoch * n_batches + pos.batch:
        bar.update(pos.epoch * n_batches + pos.batch)  # the bar starts where the phase resumes
    for epoch in range(pos.epoch, schedule.epochs):
        model.train()
        # the same draws as iterate(): one permutation per epoch, then crop-flip per batch
        order = pos.order if pos.order is not None else indices[torch.randperm(len(indices), generator=gen)]
        for batch in range(pos.batch, n_batches):
            x, y = ctx.train.batch(order[batch * schedule.batch_size : (batch + 1) * schedule.batch_size])
            batch_loss = _step(parts, schedule, x, y)
            bar.update(1, loss=batch_loss)
            if batch + 1 < n_batches and checkpoints.due():
                checkpoints.save(parts, Position(epoch, batch + 1, order))
        sched.step()
        pos = Position(epoch + 1)
        checkpoints.save(parts, pos)
    bar.close()
    model.eval()
    return model


def _step(parts: Parts, schedule: Schedule, x: Tensor, y: Tensor) -> float:
    """One SGD step on a batch; returns its loss."""
    model, device = parts.model, parts.device
    if schedule.augment == "crop-flip":
        x = crop_flip(x, parts.generator)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    inputs, loss_step, after_step = (parts.callbacks[k] for k in ("inputs", "loss", "after_step"))
    if inputs is not None:
        x = inputs(model, x, y)
    with _autocast(device):
        loss: Tensor = F.cross_entropy(model(x), y) if loss_step is None else loss_step(model, x, y)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    parts.optimizer.step()
    if after_step is not None:
        after_step(model)
    return float(loss.item())


def pgd_inputs(eps: float, steps: int, step_fraction: float, *, random_start: bool, ramp_steps: float = 0) -> InputFn:
    """Training inputs: Linf PGD examples against the model being trained (Madry et al.).

    ``step_fraction`` is the PGD step as a fraction of ``eps``. With ``ramp_steps`` > 0 the
    eps grows linearly from 0 over that many training batches. torchattacks' PGD is used as
    is: training needs reproducible draws, not robench's per-sample keyed ones.
    """
    return _PGDInputs(eps, steps, step_fraction, random_start, ramp_steps)


class _PGDInputs:
    """:func:`pgd_inputs`' function; its batch counter (the eps ramp) is checkpointed."""

    def __init__(self, eps: float, steps: int, step_fraction: float, random_start: bool, ramp_steps: float) -> None:
        self.eps, self.steps, self.step_fraction = eps, steps, step_fraction
        self.random_start, self.ramp_steps = random_start, ramp_steps
        self.step = 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        self.step += 1
        eps = self.eps
        eps_now = eps * min(1.0, self.step / self.ramp_steps) if self.ramp_steps else eps
        import torchattacks  # here, not at the top: it costs 1.5 s to import (scipy)

        attack = torchattacks.PGD(
            model, eps=eps_now, alpha=self.step_fraction * eps_now, steps=self.steps, random_start=self.random_start
        )
        out: Tensor = attack(x, y)
        return out

    def identity(self) -> dict[str, object]:
        """The parameters (see :class:`robench.Stateful`)."""
        return {
            "kind": "pgd",
            "eps": self.eps,
            "steps": self.steps,
            "step_fraction": self.step_fraction,
            "random_start": self.random_start,
            "ramp_steps": self.ramp_steps,
        }

    def state_dict(self) -> dict[str, int]:
        """The batch counter."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the batch counter."""
        self.step = int(state["step"])


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
