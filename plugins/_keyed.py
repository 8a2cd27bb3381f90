"""The keyed iterative engines every gradient attack runs on, on torchattacks' ``Attack`` base.

:class:`KeyedPGD` is torchattacks' PGD / PGDL2 iteration (same step, projection and
clipping; a test checks they agree exactly) from a given per-sample start, with a chosen
per-sample loss and optional early stop; :class:`KeyedIterative` adds MI-FGSM momentum, a
per-iteration input transform and EOT averaging. They live apart from the attack plugins
because importing torchattacks costs about 1.5 s (its attacks pull in scipy): the plugins
import this module when an attack runs, so `robench list` and plugin-name errors stay fast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchattacks.attack import Attack

from robench import LossFn, Norm

_TINY = 1e-10  # torchattacks' eps_for_division in PGDL2

Transform = Callable[[Tensor, int, Tensor], Tensor]
"""An input transform applied before the forward pass: ``(x, step, index) -> x'``, where
``index`` gives the positions in the batch of the samples in ``x``."""


class KeyedPGD(Attack):  # type: ignore[misc]
    """torchattacks attack running PGD from a given per-sample start, with a chosen loss.

    Built on torchattacks' ``Attack`` base for its model-mode and input-range handling.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: Norm,
        eps: float,
        alpha: float,
        steps: int,
        start: Tensor | None,
        loss: LossFn,
        stop_on_success: bool = False,
    ) -> None:
        super().__init__("KeyedPGD", model)
        self.norm, self.eps, self.alpha, self.steps = norm, eps, alpha, steps
        self.start, self.loss, self.stop_on_success = start, loss, stop_on_success
        self.supported_mode = ["default"]

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Run the iteration; returns adversarial images in the eps-ball and in [0, 1].

        With ``stop_on_success`` a sample is frozen at its first iterate the model
        misclassifies (it is adversarial, so further steps are wasted work) and later steps
        run only on the samples still classified correctly.
        """
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.start is not None:
            adv = self._project(images, adv + self.start.to(adv.device))
        if not self.stop_on_success:
            for _ in range(self.steps):
                adv = self._step(images, adv, labels)[0]
            return adv
        live = torch.arange(len(adv), device=adv.device)
        for _ in range(self.steps):
            stepped, fooled = self._step(images[live], adv[live], labels[live])
            keep = ~fooled
            adv[live[keep]] = stepped[keep]
            live = live[keep]
            if len(live) == 0:
                break
        return adv

    def _step(self, images: Tensor, adv: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One step; also which inputs the model already misclassified before it."""
        adv = adv.detach().requires_grad_(True)
        logits = self.get_logits(adv)
        grad = torch.autograd.grad(self.loss(logits, labels).sum(), adv)[0]
        stepped = self._project(images, adv.detach() + self.alpha * step_direction(grad, self.norm))
        return stepped, logits.detach().argmax(dim=1) != labels

    def _project(self, images: Tensor, adv: Tensor) -> Tensor:
        delta = adv - images
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(self.eps / norms, max=1.0)
        return torch.clamp(images + delta, 0, 1)


def step_direction(grad: Tensor, norm: Norm) -> Tensor:
    """The step direction: the gradient's sign (Linf) or the unit gradient (L2)."""
    if norm == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1) + _TINY
    return grad / norms


def momentum_step(grad: Tensor, momentum: Tensor, decay: float) -> Tensor:
    """MI-FGSM's accumulation ``g' = grad / mean|grad| + decay * g``, per sample.

    The mean absolute value is the L1 norm up to a constant, which the sign step ignores.
    """
    scale = grad.abs().mean(dim=tuple(range(1, grad.ndim)), keepdim=True)
    # A sample whose loss is flat (e.g. a CW margin already met) has a zero gradient;
    # torchattacks would divide 0 by 0 and make the sample NaN. Nonzero scales are untouched.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return grad / scale + momentum * decay


class KeyedIterative(KeyedPGD):
    """:class:`KeyedPGD` with optional momentum, input transform and EOT gradient averaging.

    With ``decay=None``, no transform and ``eot_iter=1`` it is exactly :class:`KeyedPGD`,
    ``stop_on_success`` included.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: Norm,
        eps: float,
        alpha: float,
        steps: int,
        start: Tensor | None,
        loss: LossFn,
        stop_on_success: bool = False,
        decay: float | None = None,
        transform: Transform | None = None,
        eot_iter: int = 1,
    ) -> None:
        super().__init__(
            model, norm=norm, eps=eps, alpha=alpha, steps=steps, start=start, loss=loss, stop_on_success=stop_on_success
        )
        self.decay, self.transform, self.eot_iter = decay, transform, eot_iter

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Run the iteration; returns adversarial images in the eps-ball and in [0, 1]."""
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.start is not None:
            adv = self._project(images, adv + self.start.to(adv.device))
        momentum = torch.zeros_like(images)
        live = torch.arange(len(adv), device=adv.device)  # samples still iterated
        for step in range(self.steps):
            grad, fooled = self.gradient(adv[live], labels[live], step, live)
            if self.stop_on_success:  # freeze samples whose current iterate is adversarial
                live, grad = live[~fooled], grad[~fooled]
                if len(live) == 0:
                    break
            if self.decay is not None:
                grad = momentum[live] = momentum_step(grad, momentum[live], self.decay)
            adv[live] = self._project(images[live], adv[live] + self.alpha * step_direction(grad, self.norm))
        return adv

    def gradient(self, adv: Tensor, labels: Tensor, step: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """The loss gradient summed over ``eot_iter`` passes, and which inputs are misclassified.

        A sum, not a mean: the step direction (sign, or L2-normalised) ignores the factor.
        Each pass is a separate graph, so memory does not grow with ``eot_iter``, and a
        randomized model draws its randomness afresh in every forward call. Several draws
        predict by their mean probability, as robench's ExpectationModel does.

        :param index: the samples' positions in the batch, for per-sample transforms
        """
        adv = adv.detach().requires_grad_(True)
        grad = torch.zeros_like(adv)
        scores = []
        for _ in range(self.eot_iter):
            inputs = adv if self.transform is None else self.transform(adv, step, index)
            logits = self.get_logits(inputs)
            grad += torch.autograd.grad(self.loss(logits, labels).sum(), adv)[0]
            scores.append(logits.detach() if self.eot_iter == 1 else logits.detach().softmax(dim=1))
        return grad, torch.stack(scores).mean(dim=0).argmax(dim=1) != labels


__all__ = ["KeyedIterative", "KeyedPGD", "Transform", "momentum_step", "step_direction"]
