"""The CUDA path (runs only where a GPU is present; CI has none).

Training on CUDA uses channels_last and bf16 autocast; evaluation stays in float32, so a
model gives the same verdicts on GPU as on CPU up to float rounding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pluggy
import pytest
import torch
from test_runner import MEASURED, cells, pm, run_tiny, tiny_benchmark  # noqa: F401  (pm is a fixture)

from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.engine import deterministic
from robench.execute.runner import run
from robench.testing import check_attack, tiny_context, tiny_residual_model
from robench.training import Schedule, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_step_uses_channels_last_and_bf16(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path)
    ctx = dataclasses.replace(ctx, device=torch.device("cuda"))
    seen: list[tuple[bool, torch.dtype]] = []
    model = ctx.new_model()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype))
    )
    before = [p.detach().clone() for p in model.parameters()]
    train(model, ctx, Schedule(epochs=1, batch_size=32, lr=0.05, momentum=0.9))
    assert seen and all(cl and dtype == torch.bfloat16 for cl, dtype in seen)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert any(not torch.equal(b.cuda(), p) for b, p in zip(before, model.parameters(), strict=True))


def test_cuda_evaluation_matches_cpu(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    on_cpu = run_tiny(pm, tmp_path, "cpu")  # trains on CPU and caches the model
    summary = run(tiny_benchmark(), pm=pm, run_dir=tmp_path / "gpu", cache_dir=tmp_path / "cache", device="cuda")
    on_gpu = cells(summary)
    assert (on_gpu["device"] == "cuda").all() and (on_gpu["build_seconds"] == 0).all()  # same cached model
    diff = (cells(on_cpu)["robust_acc"] - on_gpu["robust_acc"]).abs().max()
    assert diff <= 2 / 80  # at most two borderline samples may flip with GPU rounding
    assert (cells(on_cpu)["clean_acc"] == on_gpu["clean_acc"]).all()


def test_cuda_batch_size_does_not_matter(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    a = run(tiny_benchmark(), pm=pm, run_dir=tmp_path / "a", cache_dir=tmp_path / "cache", device="cuda")
    b = run(tiny_benchmark(batch_size=7), pm=pm, run_dir=tmp_path / "b", cache_dir=tmp_path / "cache", device="cuda")
    pd.testing.assert_frame_equal(cells(a)[MEASURED], cells(b)[MEASURED])


@pytest.mark.parametrize("name", Registries.collect(get_plugin_manager()).attacks.names())
def test_every_attack_conforms_on_cuda(name: str) -> None:
    from test_builtins import FAST_ATTACK_PARAMS, NEEDS_RESIDUAL

    model = tiny_residual_model() if name in NEEDS_RESIDUAL else None
    with deterministic(torch.device("cuda")):
        check_attack(
            Registries.collect(get_plugin_manager()).attacks.get(name), FAST_ATTACK_PARAMS.get(name), model, "cuda"
        )
