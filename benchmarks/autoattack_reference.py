"""The reference AutoAttack as a yardstick: robench's ``autoattack`` against Croce & Hein's own code.

robench's ``autoattack`` is torchattacks' standard sequence (APGD-CE, APGD-T, FAB-T, Square;
100 iterations, 5000 queries) run by robench's engine. The reference is the ``AutoAttack``
of the ``pyautoattack`` package that robustbench installs (the fra31/auto-attack code;
``version="standard"``, seed 0). Both attack the same Fashion-MNIST models (the smoke
``baseline``, undefended, and ``advt``, PGD adversarial training; robench's model cache, so
the first run trains them) on the same test samples at the same eps, one after the other,
each with one torch thread. Prints per model: clean and robust accuracy of each, the
per-sample agreement of the robust verdicts (and the samples each one alone broke), and
the wall times with their ratio (robench's cell time without its model checks, against
the reference's ``run_standard_evaluation``, whose checks are part of it)::

    python benchmarks/autoattack_reference.py [--n-samples 200] [--eps 0.1] [--cache-dir DIR]

About 20 minutes on 2 idle CPU cores, mostly the adversarially trained model's APGD-T,
FAB-T and Square. ``--smoke`` runs tiny models, 8 samples and a few iterations (tests).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from _models import built_model, default_cache, model_session
from torch import Tensor, nn

import robench
from robench.plugin import PluginSpec
from robench.results.metrics import wilson_interval

SMOKE_TRAINING = {"train_subset": 256, "epochs": 1}


def reference_module() -> ModuleType:
    """The reference AutoAttack: robustbench's dependency installs it as ``pyautoattack`` (older
    releases as ``autoattack``; plugins/robustbench/compat.py has the story)."""
    for name in ("pyautoattack", "autoattack"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise SystemExit("the reference AutoAttack is not installed: pip install robustbench==1.1.1 (or pyautoattack)")


def reference(model: nn.Module, x: Tensor, y: Tensor, eps: float, smoke: bool) -> tuple[Tensor, float]:
    """Per-sample robust verdicts of the reference AutoAttack, and its seconds."""
    attack: Any = reference_module().AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
    if smoke:  # the reference takes no budget arguments: its attacks' attributes are the knobs
        attack.apgd.n_iter = attack.apgd_targeted.n_iter = attack.fab.n_iter = 2
        attack.square.n_queries = 10
    logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its per-attack progress lines
    start = time.perf_counter()
    _, y_adv = attack.run_standard_evaluation(x, y, batch_size=250)
    return (y_adv == y).cpu(), time.perf_counter() - start


def ours(model: nn.Module, args: argparse.Namespace, scratch: Path) -> tuple[Tensor, Tensor, float]:
    """The test indices robench's cell evaluated, its per-sample robust verdicts on them, and its
    cell's attack seconds."""
    params = {"steps": 2, "n_queries": 10} if args.smoke else {}
    cells = robench.evaluate(
        model,
        attack="autoattack",
        attack_params=params,
        eps=args.eps,
        n_samples=args.n_samples,
        device="cpu",
        out=scratch / "run",
        cache_dir=scratch / "cache",
        progress=False,
    )
    samples = robench.read_run(scratch / "run", samples=True)
    robust = samples[samples["cell_key"] == cells["cell_key"].iloc[0]].groupby("sample")["correct"].all().sort_index()
    indices = torch.tensor(robust.index.to_numpy())
    return indices, torch.tensor(robust.to_numpy()), float(cells["attack_seconds"].iloc[0])


def compare(name: str, model: nn.Module, args: argparse.Namespace, data: robench.ImageData) -> None:
    """Run both on one model and print the comparison."""
    with tempfile.TemporaryDirectory(prefix="robench-aa-") as scratch:
        indices, mine, t_mine = ours(model, args, Path(scratch))
    x, y = data.batch(indices)  # the very samples robench's cell evaluated
    with torch.inference_mode():
        clean = float((model(x).argmax(1) == y).float().mean())
    theirs, t_theirs = reference(model, x, y, args.eps, args.smoke)
    n = len(y)
    agree = int((mine == theirs).sum())
    print(f"{name}: clean {100 * clean:.1f} %, n={n}, eps={args.eps}")
    for label, robust, seconds in (("robench  ", mine, t_mine), ("reference", theirs, t_theirs)):
        low, high = wilson_interval(int(robust.sum()), n)
        share = 100 * robust.float().mean()
        print(f"  {label} robust {share:5.1f} % [{100 * low:.1f}, {100 * high:.1f}]  {seconds:7.1f} s")
    print(
        f"  agreement {agree}/{n} verdicts ({100 * agree / n:.1f} %); broken by the reference only: "
        f"{int((mine & ~theirs).sum())}, by robench only: {int((~mine & theirs).sum())}; "
        f"time robench/reference {t_mine / t_theirs:.2f}"
    )


def main() -> None:
    """Both attacks on both models."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: $ROBENCH_CACHE)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 8 samples, 2 iterations (tests)")
    args = parser.parse_args()
    if args.smoke:
        args.n_samples = 8
    torch.set_num_threads(1)  # one thread each: the ratio compares the code, not the thread pools
    with tempfile.TemporaryDirectory(prefix="robench-aa-models-") as scratch:
        cache = args.cache_dir or (Path(scratch) if args.smoke else default_cache())
        session = model_session(cache)
        data = session.data("fashion-mnist", "test")
        print(f"torch {torch.__version__}, 1 thread, CPU capability {torch.backends.cpu.get_cpu_capability()}")
        for name in ("baseline", "advt"):
            spec = PluginSpec.of(name, SMOKE_TRAINING if args.smoke else None)
            compare(f"{name} (smoke preset)", built_model(session, spec), args, data)


if __name__ == "__main__":
    main()
