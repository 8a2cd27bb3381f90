"""Whether a model has an input gradient at all, and the versions that cannot run without one.

A defense that computes a step under ``torch.no_grad()`` (or ``.detach()``, or through
``argmax``/``one_hot``) has no gradient path from its input to its output. Every gradient
attack then stops with a raw autograd error ("element 0 of tensors does not require grad",
"One of the differentiated Tensors appears to not have been used in the graph"), and the
cell would be an ``error`` row with no robustness number, although the model may be as
vulnerable as an undefended one. The model checks probe the path once (:func:`probe`),
after the detection patterns in Pintor et al.'s ``interrupted_computational_graph_metric``
(any exception from the gradient call) and ART's ``loss_gradient`` (a ``None`` input
gradient); the runner then skips the white-box versions whose attacks need gradients
(:func:`skip_gradient_versions`) and evaluates the cell with the transfer and Square
versions the masking diagnosis adds, which need no gradient of the evaluated model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robench.discover.registry import Registries
from robench.execute.versions import Version


@dataclass(frozen=True)
class Probe:
    """One input-gradient computation through a model.

    :param logits: the model's output on the probed inputs (detached)
    :param margin_grad: the input gradient of the summed logit margin; ``None`` when there
        is no gradient path (then ``problem`` says why)
    :param problem: ``""``, or why the model has no gradient path
    """

    logits: Tensor
    margin_grad: Tensor | None
    problem: str = ""


def probe(model: nn.Module, x: Tensor, y: Tensor) -> Probe:
    """The input gradient of the logit margin (true logit minus the largest other) at ``x``.

    Checked in the order a gradient attack would fail: an output without ``grad_fn`` (no
    graph at all), a backward that raises (a custom autograd function without a backward,
    for instance), an input the graph never used (the gradient is ``None``).
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if not logits.requires_grad:
            return Probe(logits.detach(), None, "output has no grad_fn (computed without autograd)")
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        try:
            (grad,) = torch.autograd.grad((true - others.amax(dim=1)).sum(), x, allow_unused=True)
        except Exception as exc:  # any failure of the backward means attacks cannot use it (Pintor et al.)
            return Probe(logits.detach(), None, f"input gradient raised {type(exc).__name__}: {_first_line(exc)}")
    if grad is None:
        return Probe(
            logits.detach(), None, "input gradient is None (the output does not depend on the input in autograd)"
        )
    return Probe(logits.detach(), grad)


def needs_gradients(version: Version, registries: Registries) -> bool:
    """Whether ``version`` differentiates the evaluated model: a white-box use of an attack
    that declares ``needs_gradients`` (transfer versions differentiate their surrogate)."""
    if version.use.source is not None:
        return False
    return bool(registries.attacks.get(version.use.attack.name).needs_gradients)


def skip_gradient_versions(versions: list[Version], registries: Registries, reason: str) -> list[Version]:
    """``versions`` with every one that :func:`needs_gradients` marked skipped for ``reason``
    (no change when ``reason`` is empty). Skipped versions keep their place and index, so
    the row's ``versions`` list and the per-sample table stay aligned with the protocol."""
    if not reason:
        return versions
    return [
        dataclasses.replace(v, skipped=f"no gradient path: {reason}") if needs_gradients(v, registries) else v
        for v in versions
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else ""
