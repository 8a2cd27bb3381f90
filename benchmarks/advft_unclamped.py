"""The Adver-Fine paper's attack, outside robench's threat model: PGD that does not clamp
adversarial images to [0, 1] (METHODS.md §3.3), next to the same PGD with the clamp.

robench refuses unclamped inputs (they are not images), so this script exists only to
explain why robench's robust accuracies on Fashion-MNIST sit above the paper's: about half
of all Fashion-MNIST pixels are 0, and only an unclamped attack can push them below 0.
It attacks the models of a benchmark file (built or loaded from the model cache, exactly
as ``robench run`` does) on the same test subset, with the same PGD (20 steps of eps/10, no
random start, last iterate), through the fake-quant twin for int8 variants, and scores the
deployed (int8) model.

    python benchmarks/advft_unclamped.py benchmarks/advft-fashion.toml [--cache-dir DIR] [--eps 0.05] [-k TEXT]

``--smoke`` (no benchmark file) runs a tiny int8 model (QAT from scratch on 256 images) on 8
samples instead (for the tests).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _models import default_cache, model_session
from torch import Tensor, nn

from robench.cell import Cell
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.session import Session
from robench.plan.benchfile import load_benchmark
from robench.plan.config import Benchmark
from robench.plan.grid import plan
from robench.plugin import PluginSpec

SMOKE_DEFENSE = PluginSpec.of(
    "advft",
    {"start": "scratch", "compression": "qat", "finetune": "standard", "finetune_epochs": 1, "train_subset": 256},
)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, clamp: bool, steps: int = 20) -> Tensor:
    """The paper's PGD: sign steps of eps/10 from x, projected to the eps-ball (and [0, 1])."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x + (x_adv.detach() + eps / 10 * grad.sign() - x).clamp(-eps, eps)
        x_adv = x_adv.clamp(0, 1) if clamp else x_adv
    return x_adv.detach()


def main() -> None:
    """Print clean and robust accuracy with and without the clamp, per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", type=Path, nargs="?", help="benchmark file (not with --smoke)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: $ROBENCH_CACHE)")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("-k", dest="select", default="", help="only cells whose id contains this text")
    parser.add_argument("--smoke", action="store_true", help="a tiny int8 model on 8 samples (for the tests)")
    args = parser.parse_args()
    if (args.benchmark is None) != args.smoke:
        parser.error("give a benchmark file, or --smoke")
    if args.smoke:
        protocols = (PluginSpec("advft-pgd"),)
        benchmark = Benchmark(
            name="unclamped-smoke", defenses=(SMOKE_DEFENSE,), protocols=protocols, eps=(args.eps,), n_samples=8
        )
    else:
        benchmark = load_benchmark(args.benchmark)
    registries = Registries.collect(get_plugin_manager())
    cells = [
        c
        for c in plan(benchmark, registries)
        if c.protocol.name == "advft-pgd" and c.eps == args.eps and args.select in c.id
    ]
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache_dir or (Path(scratch) / "cache" if args.smoke else default_cache())
        session = model_session(cache, benchmark, registries, scratch=Path(scratch) / "run")
        report(session, cells, args.eps)


def report(session: Session, cells: list[Cell], eps: float) -> None:
    """One line per cell: clean, clamped and unclamped PGD-20 accuracy of the deployed model."""
    data, indices = session.data("fashion-mnist", "test"), session.eval_indices("fashion-mnist")
    x, y = data.batch(indices)
    print(f"n={len(y)}, eps={eps}; robench's all-or-nothing robust % is in the run's table")
    print(f"{'variant':<16} {'clean':>6} {'clamped':>8} {'unclamped':>10}")
    for cell in cells:
        models, _, _ = session.models(cell.model)
        variant = session.defense(cell.model).variant(cell.variant, models[cell.variant].eval())
        with torch.inference_mode():
            clean = (variant.model(x).argmax(1) == y).float().mean()
        robust = []
        for clamp in (True, False):
            batches = zip(torch.split(x, 500), torch.split(y, 500), strict=True)
            x_adv = torch.cat([pgd(variant.attack_model, xb, yb, eps, clamp) for xb, yb in batches])
            with torch.inference_mode():
                robust.append((variant.model(x_adv).argmax(1) == y).float().mean())
        print(f"{cell.variant:<16} {100 * clean:6.1f} {100 * robust[0]:8.1f} {100 * robust[1]:10.1f}")


if __name__ == "__main__":
    main()
