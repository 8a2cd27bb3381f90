"""Evaluation speed: robench against the naive torchattacks loop, side by side in one process.

The naive loop is what a user writes today: every restart on every sample with
``torchattacks.PGD``, then the all-or-nothing AND; for transfer, every target regenerates
the transfer set. Both run on the same Fashion-MNIST models (smoke presets, from robench's
model cache; the first run trains them) and the same samples. Prints times, ratios and
accuracies. Usage::

    python benchmarks/perf_eval.py [--n-samples 500] [--steps 50] [--cache-dir DIR]

``--smoke`` runs every measurement on tiny models, 8 samples and 2 steps (for the tests).

Accuracies are not bit-identical by design: torchattacks draws random starts per batch from
the global generator while robench keys them per sample, and robench counts a sample as
fooled at its first adversarial iterate (``stop_on_success``). The script prints both
numbers with robench's Wilson interval so the difference can be judged.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchattacks
from _models import built_model, default_cache, model_session
from torch import Tensor, nn

from robench.context import ImageData, Progress, Threat
from robench.defense import Variant
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.engine import Setup, evaluate
from robench.execute.runner import run
from robench.execute.session import Session
from robench.execute.versions import Version, expand
from robench.losses import cross_entropy
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.plugins._keyed import KeyedPGD
from robench.protocol import AttackUse, Protocol, Surrogate
from robench.results.metrics import wilson_interval
from robench.results.storage import RunStore


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    """Result and wall seconds of ``fn()``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(fn: Callable[[], Tensor], repeats: int) -> float:
    """The fastest of ``repeats`` timings (the machine is shared: noise only adds)."""
    return min(timed(fn)[1] for _ in range(repeats))


def batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    """Consecutive batches."""
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def correct(model: nn.Module, x: Tensor, y: Tensor, size: int) -> Tensor:
    """Per-sample correctness."""
    with torch.inference_mode():
        return torch.cat([model(a).argmax(1) == b for a, b in batches(x, y, size)])


def naive_whitebox(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, size: int) -> Tensor:
    """Every restart on every sample with torchattacks.PGD, then all-or-nothing."""
    robust = correct(model, x, y, size)
    for restart in range(restarts):
        torch.manual_seed(restart)  # DVERGE's convention: restart i uses seed i
        attack = torchattacks.PGD(model, eps=eps, alpha=eps / 5, steps=steps, random_start=True)
        adv = torch.cat([attack(a, b) for a, b in batches(x, y, size)])
        robust = robust & correct(model, adv, y, size)
    return robust


def naive_transfer(
    targets: list[nn.Module], source: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
) -> Tensor:
    """Every target regenerates the same transfer set (3 PGD restarts on the surrogate)."""
    accuracies = []
    for model in targets:
        robust = correct(model, x, y, args.batch_size)
        for restart in range(3):
            torch.manual_seed(restart)
            attack = torchattacks.PGD(source, eps=args.eps, alpha=args.eps / 5, steps=args.steps)
            adv = torch.cat([attack(a, b) for a, b in batches(x, y, args.batch_size)])
            robust = robust & correct(model, adv, y, args.batch_size)
        accuracies.append(robust.float().mean())
    return torch.stack(accuracies)


SMOKE_TRAINING = {"train_subset": 256, "epochs": 1}


def spec(name: str, args: argparse.Namespace, **params: object) -> PluginSpec:
    """The defense ``name`` with ``params``; with ``--smoke``, trained on 256 images for one epoch."""
    return PluginSpec.of(name, {**(SMOKE_TRAINING if args.smoke else {}), **params})


def model_of(session: Session, spec: PluginSpec, seed: int = 0) -> nn.Module:
    """The (cached) Fashion-MNIST cnn8 model of ``spec`` trained with ``seed``."""
    return built_model(session, spec, seed)


def whitebox(session: Session, registries: Registries, args: argparse.Namespace) -> None:
    """(a) whitebox-pgd on a standard and an adversarially trained model."""
    data = session.data("fashion-mnist", "test")
    indices = session.eval_indices("fashion-mnist")[: args.n_samples]
    x, y = data.batch(indices)
    threat = Threat("linf", args.eps)
    protocol = registries.protocols.get("whitebox-pgd").create({"steps": args.steps}).resolve("smoke")
    versions = expand(protocol, registries, "linf")
    setup = Setup(key="perf", batch_size=args.batch_size, device=torch.device("cpu"), exhaustive=False)
    print(f"(a) whitebox-pgd: PGD-{args.steps}, step eps/5, 5 restarts, eps {args.eps}, n={len(indices)}")
    for name in ("baseline", "advt"):
        variant = Variant("model", model_of(session, spec(name, args)))
        naive, t_naive = timed(partial(naive_whitebox, variant.model, x, y, args.eps, args.steps, 5, args.batch_size))
        outcome, t_ours = timed(partial(_robust, variant, versions, threat, data, indices, setup))
        low, high = wilson_interval(int(outcome.sum()), len(outcome))
        print(
            f"  {name:<9} naive {t_naive:7.1f} s  robench {t_ours:6.1f} s  speed-up {t_naive / t_ours:5.2f}x   "
            f"robust acc naive {naive.float().mean():.3f}  robench {outcome.float().mean():.3f} "
            f"[{low:.3f}, {high:.3f}]"
        )


def _robust(
    variant: Variant, versions: list[Version], threat: Threat, data: ImageData, indices: Tensor, setup: Setup
) -> Tensor:
    out = evaluate(variant, versions, threat, data, indices, setup=setup, transfer=_no_transfer, progress=Progress())
    return out.robust


def _no_transfer(version: Version) -> Tensor:
    raise AssertionError("white-box protocol")


def transfer(registries: Registries, args: argparse.Namespace) -> None:
    """(b) a transfer protocol on 3 targets: regenerate per target vs robench's shared cache."""
    cache = Path(args.cache_dir)
    # the third target is a weaker baseline: one epoch (smoke models already train one, so half the images)
    weaker = {"train_subset": 128} if args.smoke else {"epochs": 1}
    targets = (spec("baseline", args), spec("advt", args), spec("baseline", args, **weaker))
    surrogate = Surrogate("base", spec("baseline", args), (1000,), None)
    use = AttackUse(PluginSpec.of("pgd", {"steps": args.steps, "restarts": 3, "stop_on_success": False}), "base")
    protocol = Protocol(name="transfer-pgd", uses=(use,), surrogates=(surrogate,))
    bench = Benchmark(
        name="perf-transfer",
        defenses=targets,
        inline_protocols=(protocol,),
        eps=(args.eps,),
        n_samples=args.n_samples,
        batch_size=args.batch_size,
    )
    session = model_session(cache, registries=registries)
    models = [model_of(session, t) for t in targets]
    source = model_of(session, surrogate.defense, 1000)
    indices = session.eval_indices("fashion-mnist")[: args.n_samples]
    x, y = session.data("fashion-mnist", "test").batch(indices)
    naive_acc, t_naive = timed(partial(naive_transfer, models, source, x, y, args))
    # A private cache folder that shares the trained models but starts with no transfer sets,
    # so the run is timed cold without touching the user's own transfer cache.
    private = Path(tempfile.mkdtemp(prefix="robench-perf-"))
    (private / "models").symlink_to((cache / "models").resolve())
    run_dir = private / "run"
    start = time.perf_counter()
    run(bench, pm=get_plugin_manager(), run_dir=run_dir, cache_dir=private, device="cpu")
    t_ours = time.perf_counter() - start
    table = RunStore(run_dir).read_cells().sort_values("attack_seconds", ascending=False)
    shutil.rmtree(private)  # the link goes, the shared models stay
    first, extra = table["attack_seconds"].iloc[0], table["attack_seconds"].iloc[1:].mean()
    print(f"(b) transfer PGD-{args.steps} x 3 restarts from a held-out baseline, 3 targets, n={len(indices)}")
    print(
        f"  naive {t_naive:.1f} s  robench {t_ours:.1f} s  speed-up {t_naive / t_ours:.2f}x   "
        f"first target {first:.1f} s, each extra target {extra:.2f} s ({extra / first:.3f} of the first)"
    )
    ours = table.set_index("defense_params").loc[
        [session.model_key("fashion-mnist", "cnn8", t, 0).defense_params for t in targets], "robust_acc"
    ]
    print(
        f"  robust acc (baseline, advt, baseline 1 epoch): naive {[round(float(a), 3) for a in naive_acc]}  "
        f"robench {[round(float(a), 3) for a in ours]}"
    )


def throughput(session: Session, args: argparse.Namespace) -> None:
    """(c) samples x steps per second: robench's attack loop against a bare forward-backward loop."""
    model = model_of(session, spec("advt", args))
    x, y = session.data("fashion-mnist", "test").batch(torch.arange(args.batch_size))
    steps = 20

    def bare() -> Tensor:
        adv = x.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(adv), y, reduction="sum")
            adv = (adv + 0.01 * torch.autograd.grad(loss, adv)[0].sign()).detach()
        return adv

    def ours(inputs: Tensor) -> Callable[[], Tensor]:
        attack = KeyedPGD(model, norm="linf", eps=0.1, alpha=0.02, steps=steps, start=None, loss=cross_entropy)
        return partial(attack, inputs, y)

    rates = {}
    for name, fn in (("bare", bare), ("robench", ours(x))):
        fn()  # warm-up
        rates[name] = len(x) * steps / best_of(fn, 3)
    model.to(memory_format=torch.channels_last)
    channels_last = ours(x.contiguous(memory_format=torch.channels_last))
    channels_last()
    rates["robench channels_last"] = len(x) * steps / best_of(channels_last, 3)
    model.to(memory_format=torch.contiguous_format)
    print(
        "(c) attack-loop throughput, samples x steps / s:  "
        + "  ".join(f"{k} {v:.0f}" for k, v in rates.items())
        + f"   robench/bare {rates['robench'] / rates['bare']:.2f}"
    )


def main() -> None:
    """Run the three measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--cache-dir", default=None, help="model cache (default: $ROBENCH_CACHE)")
    parser.add_argument("--only", choices=["whitebox", "transfer", "throughput"])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 8 samples, 2 steps (for the tests)")
    args = parser.parse_args()
    if args.smoke:
        args.n_samples, args.steps, args.batch_size = 8, 2, 8
        args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="robench-perf-smoke-")
    args.cache_dir = args.cache_dir or str(default_cache())
    registries = Registries.collect(get_plugin_manager())
    session = model_session(Path(args.cache_dir), registries=registries)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {capability}")
    if args.only in (None, "throughput"):
        throughput(session, args)
    if args.only in (None, "whitebox"):
        whitebox(session, registries, args)
    if args.only in (None, "transfer"):
        transfer(registries, args)


if __name__ == "__main__":
    main()
