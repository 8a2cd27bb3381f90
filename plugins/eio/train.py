"""Training a random gated network: pre-training, then vulnerability diversification.

EIO paper Algorithm 1 and METHODS.md §2.2. Pre-training trains one random path per batch on
clean cross-entropy. Vulnerability diversification, per batch: draw the distillation layer
``l`` uniformly from 1..L, sample ``p`` paths whose first ``l`` gates differ pairwise,
distil one non-robust example per path from two independent batches (Eq. 2), train every
path on the other paths' examples (Eq. 4), accumulate the gradients and take **one**
optimizer step on the shared super-net.

Both phases run in :func:`robench.train` (the shared loop: data order, augmentation, SGD,
checkpoints) with EIO's batch loss as its ``loss``: a build killed in either phase resumes
in that phase, from its last checkpoint, to the weights of an uninterrupted build. Each
loss is :class:`robench.Stateful`: its gate, layer and distillation draws and the target
batches' order come from its own generator, saved in the phase's checkpoints.

Every random choice (data order, augmentation, gates, layers, distillation starts) comes from
generators seeded by the build context, so the same seed trains the same network. Each phase
gets a fresh optimizer and learning-rate schedule: EIO's released code carries the decayed lr
from pre-training into the second phase (METHODS.md §2.2 pitfall), which is not reproduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench import Context, ImageData, Schedule, crop_flip, subset_indices, train
from robench.plugins.eio.model import GatePath, RandomGatedNetwork, derive

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


def diversification_loss(
    rgn: RandomGatedNetwork, batch: tuple[Tensor, Tensor, Tensor], cfg: Distillation, gen: torch.Generator
) -> tuple[Tensor, StepResult]:
    """Algorithm 1, lines 11-23, on ``batch = (x_s, y_s, x_t)``: the batch's loss, whose
    gradient is the paths' accumulated gradients, and what the step drew.

    ``loss_i = sum_{j != i} CE(f_{P_i}(x'_j), y_s) / p_cur`` and the loss is ``sum_i loss_i``
    (one backward of the sum gives the accumulated gradients). Candidates on no sampled path
    get no gradient, so SGD (which skips parameters without one) leaves them as they were.
    """
    x_s, y_s, x_t = batch
    layer = int(torch.randint(1, rgn.num_layers + 1, (1,), generator=gen))
    prefix = min(layer, len(rgn.blocks))  # the logits layer depends on every gate
    count = min(cfg.paths_per_batch, rgn.n_paths**prefix)
    paths = sample_distinct_paths(rgn, count, prefix, gen)
    with _full_precision(x_s.device):  # the sign steps must follow the true gradient
        distilled = [distill(rgn, path, layer, x_s, x_t, cfg, gen) for path in paths]
    rgn.train()
    losses = []
    for i, path in enumerate(paths):
        with rgn.using(path):
            others = [F.cross_entropy(rgn(x), y_s) for j, x in enumerate(distilled) if j != i]
            losses.append(torch.stack(others).sum() / count)
    loss = torch.stack(losses).sum()
    return loss, StepResult(float(loss.detach()) / count, layer, paths)


def diversification_step(
    rgn: RandomGatedNetwork,
    opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor],
    cfg: Distillation,
    gen: torch.Generator,
) -> StepResult:
    """One batch of Algorithm 1, lines 11-24: :func:`diversification_loss`, then **one**
    optimizer step on the shared super-net."""
    opt.zero_grad(set_to_none=True)
    loss, result = diversification_loss(rgn, batch, cfg, gen)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return result


class WarmupLoss:
    """Algorithm 1, lines 4-5, as :func:`robench.train`'s loss: clean cross-entropy of one
    uniformly random path per batch."""

    def __init__(self, rgn: RandomGatedNetwork, gen: torch.Generator) -> None:
        self.rgn, self.gen = rgn, gen

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with self.rgn.using(self.rgn.sample_path(self.gen)):
            return F.cross_entropy(model(x), y)

    def identity(self) -> dict[str, object]:
        """The phase's loss (its parameters are the network's)."""
        return {"kind": "eio-warmup"}

    def state_dict(self) -> dict[str, Any]:
        """The path generator."""
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the path generator."""
        self.gen.set_state(state["gen"])


class DiversifyLoss:
    """Vulnerability diversification as :func:`robench.train`'s loss: each source batch is
    paired with a target batch from an independent shuffle of the same training images
    (DVERGE's and EIO's second loader), augmented like the sources."""

    def __init__(
        self, rgn: RandomGatedNetwork, ctx: Context, schedule: Schedule, cfg: Distillation, gen: torch.Generator
    ) -> None:
        self.rgn, self.cfg, self.gen, self.train = rgn, cfg, gen, ctx.train
        self.indices = subset_indices(len(ctx.train), schedule.train_subset, ctx.seed)
        self.batch_size, self.augment = schedule.batch_size, schedule.augment
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_t = self._target_batch().to(x.device, non_blocking=True)
        if x.device.type == "cuda":
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        loss, _ = diversification_loss(self.rgn, (x, y, x_t), self.cfg, self.gen)
        return loss

    def _target_batch(self) -> Tensor:
        """The next target batch; a new shuffle when the last one is used up (once an epoch)."""
        if self.position >= len(self.order):
            self.order, self.position = self.indices[torch.randperm(len(self.indices), generator=self.gen)], 0
        chunk = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        x_t = _images(self.train, chunk)
        return crop_flip(x_t, self.gen) if self.augment == "crop-flip" else x_t

    def identity(self) -> dict[str, object]:
        """The distillation settings."""
        return {"kind": "eio-diversify", **dataclasses.asdict(self.cfg)}

    def state_dict(self) -> dict[str, Any]:
        """The generator and the target shuffle's order and position."""
        return {"gen": self.gen.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.gen.set_state(state["gen"])
        self.order, self.position = state["order"], int(state["position"])


def train_rgn(
    rgn: RandomGatedNetwork, ctx: Context, warmup: Schedule, diversify: Schedule, cfg: Distillation
) -> RandomGatedNetwork:
    """Pre-train, then diversify ``rgn`` (Algorithm 1): two resumable phases of
    :func:`robench.train`, each with its own fresh optimizer and schedule."""
    if warmup.epochs:
        train(rgn, ctx, warmup, loss=WarmupLoss(rgn, ctx.generator(_SALT_WARMUP)), desc="eio pre-train")
    if diversify.epochs:
        loss = DiversifyLoss(rgn, ctx, diversify, cfg, ctx.generator(_SALT_DIVERSIFY))
        train(rgn, ctx, diversify, loss=loss, desc="eio diversify")
    return rgn.eval()


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


def _images(data: ImageData, indices: Tensor) -> Tensor:
    """Float images in [0, 1] of ``indices``."""
    return data.batch(indices)[0]


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """No autocast for the distillation (robench.train runs the loss under bf16 autocast on CUDA)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", enabled=False)
    return contextlib.nullcontext()
