"""Training a random gated network: pre-training, then vulnerability diversification.

EIO paper Algorithm 1 and METHODS.md §2.2. Pre-training trains one random path per batch on
clean cross-entropy. Vulnerability diversification, per batch: draw the distillation layer
``l`` uniformly from 1..L, sample ``p`` paths whose first ``l`` gates differ pairwise,
distil one non-robust example per path from two independent batches (Eq. 2), train every
path on the other paths' examples (Eq. 4), accumulate the gradients and take **one**
optimizer step on the shared super-net.

Every random choice (data order, augmentation, gates, layers, distillation starts) comes from
generators seeded by the build context, so the same seed trains the same network. Each phase
gets a fresh optimizer and learning-rate schedule: EIO's released code carries the decayed lr
from pre-training into the second phase (METHODS.md §2.2 pitfall), which is not reproduced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench import Context, Schedule, crop_flip, iterate, sgd, subset_indices, train
from robench.plugins.eio.model import GatePath, RandomGatedNetwork, derive

# (optimizer, source images, source labels, target images or None) -> the batch's loss
StepFn = Callable[[torch.optim.Optimizer, Tensor, Tensor, Tensor | None], float]

# Independent random streams of one build (see Context.generator).
_SALT_WARMUP, _SALT_DIVERSIFY, _SALT_DERIVE = 101, 102, 103


@dataclass(frozen=True)
class Distillation:
    """Vulnerability-diversification settings (EIO §3.3, METHODS.md §2.2).

    :param paths_per_batch: ``p``, paths sampled per batch
    :param eps: ``eps_d``, Linf radius of the distilled examples around ``x_s``
    :param steps: sign-gradient steps of the feature distillation
    :param step_size: step as a fraction of ``eps`` (EIO: eps_d/10)
    :param train_mode: distil with BatchNorm in train mode (EIO's ``--distill_train_mode``;
        off by default, unlike DVERGE, so distillation inputs never touch BN statistics)
    """

    paths_per_batch: int = 3
    eps: float = 0.07
    steps: int = 10
    step_size: float = 0.1
    train_mode: bool = False


@dataclass(frozen=True)
class StepResult:
    """What one diversification step did: its mean path loss, layer and sampled paths."""

    loss: float
    layer: int
    paths: list[GatePath]


def sample_distinct_paths(rgn: RandomGatedNetwork, count: int, prefix: int, gen: torch.Generator) -> list[GatePath]:
    """``count`` uniform random paths whose first ``prefix`` gates differ pairwise (rejection sampling)."""
    if count > rgn.n_paths**prefix:
        raise ValueError(f"only {rgn.n_paths**prefix} distinct {prefix}-gate prefixes exist, {count} asked")
    paths: list[GatePath] = []
    while len(paths) < count:
        path = rgn.sample_path(gen)
        if all(path[:prefix] != other[:prefix] for other in paths):
            paths.append(path)
    return paths


def distill(
    rgn: RandomGatedNetwork,
    path: GatePath,
    layer: int,
    x_s: Tensor,
    x_t: Tensor,
    cfg: Distillation,
    gen: torch.Generator,
) -> Tensor:
    """Eq. 2: ``argmin_z MSE(f^l_P(z), f^l_P(x_t))`` over the eps-ball around ``x_s`` in [0, 1].

    Sign-gradient descent from a uniform random start, no momentum, features after the
    activation (EIO's choices; DVERGE starts at ``x_s`` with momentum, METHODS.md §2.2).
    """
    was_training = rgn.training
    rgn.train(cfg.train_mode)
    try:
        with rgn.using(path):
            with torch.no_grad():
                target = rgn.features(x_t, layer)
            noise = torch.rand(x_s.shape, generator=gen).to(x_s.device).mul_(2).sub_(1).mul_(cfg.eps)
            z = (x_s + noise).clamp_(0, 1)
            for _ in range(cfg.steps):
                z.requires_grad_(True)
                loss = F.mse_loss(rgn.features(z, layer), target)
                (grad,) = torch.autograd.grad(loss, z)  # parameter gradients stay untouched
                z = z.detach() - cfg.step_size * cfg.eps * grad.sign()
                z = torch.minimum(torch.maximum(z, x_s - cfg.eps), x_s + cfg.eps).clamp_(0, 1)
    finally:
        rgn.train(was_training)
    return z.detach()


def diversification_step(
    rgn: RandomGatedNetwork,
    opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor],
    cfg: Distillation,
    gen: torch.Generator,
) -> StepResult:
    """One batch of Algorithm 1, lines 11-24, on ``batch = (x_s, y_s, x_t)``.

    ``loss_i = sum_{j != i} CE(f_{P_i}(x'_j), y_s) / p_cur``; the paths' gradients accumulate
    and one optimizer step follows. Candidates on no sampled path get no gradient, so SGD
    (which skips parameters without one) leaves them exactly as they were.
    """
    x_s, y_s, x_t = batch
    layer = int(torch.randint(1, rgn.num_layers + 1, (1,), generator=gen))
    prefix = min(layer, len(rgn.blocks))  # the logits layer depends on every gate
    count = min(cfg.paths_per_batch, rgn.n_paths**prefix)
    paths = sample_distinct_paths(rgn, count, prefix, gen)
    distilled = [distill(rgn, path, layer, x_s, x_t, cfg, gen) for path in paths]
    opt.zero_grad(set_to_none=True)
    rgn.train()
    total = 0.0
    for i, path in enumerate(paths):
        with rgn.using(path), _autocast(x_s.device):
            losses = [F.cross_entropy(rgn(x), y_s) for j, x in enumerate(distilled) if j != i]
            loss = torch.stack(losses).sum() / count
        loss.backward()
        total += loss.item()
    opt.step()
    return StepResult(total / count, layer, paths)


def warmup_step(
    rgn: RandomGatedNetwork, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, gen: torch.Generator
) -> float:
    """Algorithm 1, lines 4-5: train one uniformly random path on clean cross-entropy."""
    with rgn.using(rgn.sample_path(gen)), _autocast(x.device):
        loss = F.cross_entropy(rgn(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return loss.item()


def train_rgn(
    rgn: RandomGatedNetwork, ctx: Context, warmup: Schedule, diversify: Schedule, cfg: Distillation
) -> RandomGatedNetwork:
    """Pre-train, then diversify ``rgn`` (Algorithm 1); each phase with its own fresh schedule."""
    rgn.to(ctx.device)
    if ctx.device.type == "cuda":
        rgn.to(memory_format=torch.channels_last)
    gen_w = ctx.generator(_SALT_WARMUP)
    run_phase(rgn, ctx, warmup, lambda opt, x, y, _: warmup_step(rgn, opt, x, y, gen_w), "eio pre-train", _SALT_WARMUP)
    gen_d = ctx.generator(_SALT_DIVERSIFY)

    def diversify_batch(opt: torch.optim.Optimizer, x: Tensor, y: Tensor, x_t: Tensor | None) -> float:
        assert x_t is not None
        return diversification_step(rgn, opt, (x, y, x_t), cfg, gen_d).loss

    run_phase(rgn, ctx, diversify, diversify_batch, "eio diversify", _SALT_DIVERSIFY, pairs=True)
    return rgn.eval()


def run_phase(
    rgn: RandomGatedNetwork,
    ctx: Context,
    schedule: Schedule,
    step: StepFn,
    desc: str,
    salt: int,
    *,
    pairs: bool = False,
) -> None:
    """Run ``schedule.epochs`` epochs of ``step`` with a fresh SGD optimizer and lr schedule.

    :param pairs: also draw an independent target batch ``x_t`` per step (a second shuffle of
        the same images, like DVERGE's and EIO's two loaders)
    """
    if schedule.epochs == 0:
        return
    gen = ctx.generator(salt + 1000)  # data order and augmentation, apart from the step's draws
    opt, sched = sgd(rgn, schedule)
    indices = subset_indices(len(ctx.train), schedule.train_subset, ctx.seed)
    bar = ctx.progress.bar(schedule.epochs * -(-len(indices) // schedule.batch_size), desc)
    for _epoch in range(schedule.epochs):
        rgn.train()
        sources = iterate(ctx.train, indices, schedule.batch_size, gen)
        targets = iterate(ctx.train, indices, schedule.batch_size, gen) if pairs else None
        for x, y in sources:
            x_t = _prepare(next(targets)[0], schedule, ctx, gen) if targets is not None else None
            loss = step(opt, _prepare(x, schedule, ctx, gen), y.to(ctx.device), x_t)
            bar.update(1, loss=loss)
        sched.step()
    bar.close()


def derive_paths(rgn: RandomGatedNetwork, ctx: Context, count: int, finetune: Schedule) -> list[nn.Module]:
    """``count`` distinct random paths rolled out as plain networks, each fine-tuned (EIO §3.4).

    Fine-tuning is clean cross-entropy (METHODS.md §2.3: SGD lr 0.001, momentum 0.9, wd 1e-4);
    with ``finetune.epochs == 0`` the paths are returned as derived.
    """
    paths = sample_distinct_paths(rgn, count, len(rgn.blocks), ctx.generator(_SALT_DERIVE))
    models = []
    for k, path in enumerate(paths):
        ctx.progress.log(f"eio: derived path {k}: {''.join(map(str, path))}")
        model = derive(rgn, path, ctx.new_model)
        if finetune.epochs:
            model = train(model, ctx, finetune, desc=f"eio fine-tune {k}")
        models.append(model.eval())
    return models


def _prepare(x: Tensor, schedule: Schedule, ctx: Context, gen: torch.Generator) -> Tensor:
    """Augment (on the CPU, from the phase's generator) and move to the training device."""
    if schedule.augment == "crop-flip":
        x = crop_flip(x, gen)
    x = x.to(ctx.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if ctx.device.type == "cuda" else x


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast for training losses on CUDA (as robench.training does); distillation
    runs in full precision so its sign steps follow the true gradient."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
