"""Training losses of ProARD: TRADES for the teacher, RSLAD over sampled students, BN recalibration.

Each loss is a callback for :func:`robench.train` (``loss(model, x, y) -> Tensor``). Both
draw their random starts (and the RSLAD loss its students) from a generator of their own
and implement :class:`robench.Stateful`, so a phase killed mid-way resumes with the very
draws an uninterrupted run makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench import ImageData
from robench.plugins.proard.space import Choices, Config, encode, sample_config


def _noisy_start(x: Tensor, gen: torch.Generator) -> Tensor:
    """``x + 0.001 * N(0, 1)``, the TRADES/RSLAD starting point (drawn on the CPU, then moved)."""
    return x.detach() + 0.001 * torch.randn(x.shape, generator=gen).to(x.device)


def _ascend_kl(
    model: nn.Module, x: Tensor, target: Tensor, eps: float, step: float, steps: int, start: Tensor
) -> Tensor:
    """Sign ascent on sum KL(softmax(target) || softmax(model(x'))) in the Linf ball, model in eval mode.

    Full precision: the attack keeps its strength under the training loop's autocast.
    """
    was_training = model.training
    model.eval()
    x_adv = start
    with torch.autocast(device_type=x.device.type, enabled=False):
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), target, reduction="sum")
            (grad,) = torch.autograd.grad(kl, [x_adv])
            x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.detach().clamp(0, 1)


class TradesLoss:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), batch mean (METHODS.md §4.3).

    ``x_adv`` ascends that KL from ``x + 0.001 N(0, 1)`` in ``steps`` sign steps of ``step``
    (pixel units), projected to the ``eps`` ball and [0, 1], with the model in eval mode.
    """

    def __init__(self, eps: float, step: float, steps: int, beta: float, seed: int) -> None:
        self.eps, self.step, self.steps, self.beta, self.seed = eps, step, steps, beta, seed
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The batch's TRADES loss."""
        with torch.no_grad():
            was_training = model.training
            clean = F.softmax(model.eval()(x), dim=1)
            model.train(was_training)
        x_adv = _ascend_kl(model, x, clean, self.eps, self.step, self.steps, _noisy_start(x, self.gen))
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * robust

    def identity(self) -> dict[str, object]:
        """The parameters (:class:`robench.Stateful`)."""
        return {"kind": "trades", "eps": self.eps, "step": self.step, "steps": self.steps, "beta": self.beta,
                "seed": self.seed}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The generator's state."""
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator."""
        self.gen.set_state(state["gen"])


def rslad_kl(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """RSLAD's KL term as released: mean over batch x classes of p_T (log(p_T + 1e-5) - log p_S).

    The mean runs over classes as well, so it is 1/num_classes of the usual batch-mean KL
    (METHODS.md §4.5): it matters when mixing losses or comparing learning rates.
    """
    log_student = F.log_softmax(student_logits, dim=1)
    return (teacher_probs * (torch.log(teacher_probs + 1e-5) - log_student)).mean()


def rslad_loss(
    student: nn.Module,
    teacher_probs: Tensor,
    x: Tensor,
    attack: tuple[float, float, int],
    start: Tensor,
    adv_weight: float = 5 / 6,
) -> Tensor:
    """RSLAD (Zi et al. 2021) for one student against fixed teacher probabilities on clean ``x``
    (METHODS.md §4.5): ``adv_weight`` (5/6) x KL on the student's KL-maximising ``x_adv``
    (``attack`` = eps, step, steps from ``start``) + the rest (1/6) x KL on ``x``, student
    in train mode for both."""
    eps, step, steps = attack
    x_adv = _ascend_kl(student, x, teacher_probs, eps, step, steps, start)
    student.train()
    adv = rslad_kl(student(x_adv), teacher_probs)
    clean = rslad_kl(student(x), teacher_probs)
    return adv_weight * adv + (1 - adv_weight) * clean


class ShrinkingLoss:
    """One progressive-shrinking stage's loss: RSLAD summed over ``k`` sampled students.

    The model is the dynamic network; the teacher (the TRADES-trained largest network) is
    frozen in eval mode. ``sampling``:

    * ``batch`` (default; OFA and the paper's description): ``k`` configurations drawn
      uniformly from the stage's enabled choices for every batch; their losses are summed,
      so one optimizer step follows their accumulated gradients;
    * ``epoch`` (the released ProARD code's loop, METHODS.md §4.4 pitfall): ``k``
      configurations drawn once per epoch, each trained for a full pass over the data with
      a step every batch. The schedule then runs ``k`` passes per epoch
      (``batches_per_pass`` tells this callback where each pass starts).
    """

    def __init__(
        self,
        teacher: nn.Module,
        lengths: dict[str, int],
        enabled: Choices,
        k: int,
        attack: tuple[float, float, int],
        seed: int,
        sampling: Literal["batch", "epoch"] = "batch",
        batches_per_pass: int = 0,
        adv_weight: float = 5 / 6,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.lengths, self.enabled, self.k = lengths, {d: tuple(v) for d, v in enabled.items()}, k
        self.attack, self.adv_weight = attack, adv_weight
        self.seed, self.sampling, self.batches_per_pass = seed, sampling, batches_per_pass
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.epoch_configs: list[Config] = []

    def students(self) -> Sequence[Config]:
        """The configurations this batch trains (advances the sampling state)."""
        if self.sampling == "batch":
            return [sample_config(self.lengths, self.enabled, self.gen) for _ in range(self.k)]
        if self.batches_per_pass < 1:
            raise ValueError("epoch sampling needs batches_per_pass >= 1")
        per_epoch = self.batches_per_pass * self.k
        if self.calls % per_epoch == 0:
            self.epoch_configs = [sample_config(self.lengths, self.enabled, self.gen) for _ in range(self.k)]
        return [self.epoch_configs[(self.calls % per_epoch) // self.batches_per_pass]]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The sum of the sampled students' RSLAD losses on this batch."""
        configs = self.students()
        self.calls += 1
        with torch.no_grad():
            probs = F.softmax(self.teacher(x), dim=1)
        total = torch.zeros((), device=x.device)
        for config in configs:
            model.set_active(config)  # type: ignore[operator]
            start = _noisy_start(x, self.gen)
            total = total + rslad_loss(model, probs, x, self.attack, start, self.adv_weight)
        return total

    def identity(self) -> dict[str, object]:
        """The parameters (:class:`robench.Stateful`)."""
        return {
            "kind": "rslad-shrinking",
            "enabled": encode(self.enabled),
            "k": self.k,
            "attack": list(self.attack),
            "adv_weight": self.adv_weight,
            "seed": self.seed,
            "sampling": self.sampling,
            "batches_per_pass": self.batches_per_pass,
        }

    def state_dict(self) -> dict[str, Any]:
        """Generator, call counter and the current epoch's students."""
        return {"gen": self.gen.get_state(), "calls": self.calls, "epoch": [encode(c) for c in self.epoch_configs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        from robench.plugins.proard.space import decode

        self.gen.set_state(state["gen"])
        self.calls = int(state["calls"])
        self.epoch_configs = [decode(text) for text in state["epoch"]]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, data: ImageData, indices: Tensor, batch_size: int, device: torch.device
) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them on ``indices`` (METHODS.md §4.6).

    Cumulative averages (momentum None) over the images, as OFA's ``set_running_statistics``
    computes the exact mean and variance; the momentum is restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.to(device).train()
    for start in range(0, len(indices), batch_size):
        x, _ = data.batch(indices[start : start + batch_size])
        model(x.to(device))
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()
