"""Training loops shared by defense plugins: batching, augmentation, schedules, devices.

Public for third-party defenses too. Every random draw comes from generators seeded by
the build context, so the same seed trains the same model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench.context import Context, ImageData

# (model, x, y) -> the inputs to train on, e.g. PGD examples for adversarial training
InputFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


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
    model: nn.Module, ctx: Context, schedule: Schedule, *, inputs: InputFn | None = None, desc: str = "train"
) -> nn.Module:
    """Train ``model`` with SGD and cross-entropy on ``inputs(model, x, y)`` (clean by default).

    On CUDA the forward/backward runs in channels_last with bf16 autocast; attacks inside
    ``inputs`` run in full precision so they keep their strength.
    """
    gen = ctx.generator(salt=1)
    torch.manual_seed(ctx.seed)  # for library code that draws from the global generator
    device = ctx.device
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt, sched = sgd(model, schedule)
    indices = subset_indices(len(ctx.train), schedule.train_subset, ctx.seed)
    n_batches = -(-len(indices) // schedule.batch_size)
    bar = ctx.progress.bar(schedule.epochs * n_batches, desc)
    for _epoch in range(schedule.epochs):
        model.train()
        for x, y in iterate(ctx.train, indices, schedule.batch_size, gen):
            if schedule.augment == "crop-flip":
                x = crop_flip(x, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if inputs is not None:
                x = inputs(model, x, y)
            with _autocast(device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            bar.update(1, loss=loss.item())
        sched.step()
    bar.close()
    model.eval()
    return model


def pgd_inputs(eps: float, steps: int, step_fraction: float, *, random_start: bool, ramp_steps: float = 0) -> InputFn:
    """Training inputs: Linf PGD examples against the model being trained (Madry et al.).

    ``step_fraction`` is the PGD step as a fraction of ``eps``. With ``ramp_steps`` > 0 the
    eps grows linearly from 0 over that many training batches. torchattacks' PGD is used as
    is: training needs reproducible draws, not robench's per-sample keyed ones.
    """
    step = 0

    def inputs(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        nonlocal step
        step += 1
        eps_now = eps * min(1.0, step / ramp_steps) if ramp_steps else eps
        import torchattacks  # here, not at the top: it costs 1.5 s to import (scipy)

        attack = torchattacks.PGD(
            model, eps=eps_now, alpha=step_fraction * eps_now, steps=steps, random_start=random_start
        )
        out: Tensor = attack(x, y)
        return out

    return inputs


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
