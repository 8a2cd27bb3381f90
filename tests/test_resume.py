"""Builds that resume (issue 15): a training phase killed mid-way continues from its last
checkpoint and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pluggy
import pytest
import torch
from torch import nn

import robench
from robench import training
from robench.context import Context, Progress, ProgressBar
from robench.discover.manager import get_plugin_manager
from robench.execute.runner import Summary, run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore
from robench.testing import TinyPlugin, tiny_context

SCHEDULE = robench.Schedule(epochs=3, batch_size=24, lr=0.05, momentum=0.9, milestones=(2,), augment="crop-flip")
MEASURED = ["cell_id", "n", "clean_acc", "robust_acc", "robust_ci_low", "robust_ci_high", "n_versions"]


class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing on the way catches it."""


class Recorder(Progress):
    """Counts the steps each bar makes and logs; raises :class:`Crash` at step ``crash_at``
    (counted over all bars, or over those whose description contains ``crash_in``)."""

    def __init__(self, crash_at: int = 0, crash_in: str = "") -> None:
        self.crash_at, self.crash_in, self.steps = crash_at, crash_in, 0
        self.per_desc: dict[str, int] = {}
        self.started: dict[str, int] = {}
        self.lines: list[str] = []

    def bar(self, total: int, desc: str) -> ProgressBar:
        recorder = self

        class Bar(ProgressBar):
            first = True

            def update(self, n: int = 1, **postfix: float) -> None:
                if self.first and not postfix:  # the resumed position
                    recorder.started[desc] = n
                    return
                self.first = False
                recorder.steps += n
                recorder.per_desc[desc] = recorder.per_desc.get(desc, 0) + n
                counted = recorder.per_desc[desc] if recorder.crash_in else recorder.steps
                if counted == recorder.crash_at and recorder.crash_in in desc:
                    raise Crash

        return Bar()

    def log(self, message: str) -> None:
        self.lines.append(message)


def context(tmp: Path, progress: Progress | None = None) -> Context:
    ctx = tiny_context(tmp)
    return dataclasses.replace(ctx, progress=progress or Recorder())


def pgd() -> robench.InputFn:
    return robench.pgd_inputs(0.1, 3, 0.25, random_start=True, ramp_steps=10)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def reference(tmp: Path, **kwargs: Any) -> tuple[nn.Module, torch.Tensor]:
    """An uninterrupted run (in its own folder) and the global RNG state it ends with."""
    tmp.mkdir()
    ctx = context(tmp)
    model = robench.train(ctx.new_model(), ctx, SCHEDULE, **kwargs)
    return model, torch.get_rng_state()


@pytest.mark.parametrize("period", ["0", "600"])  # after every batch / at every epoch's end
@pytest.mark.parametrize("crash_at", [4, 7, 12])  # 6 batches per epoch
@pytest.mark.parametrize("adversarial", [False, True])
def test_an_interrupted_phase_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, period: str, crash_at: int, adversarial: bool
) -> None:
    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", period)
    expected, rng = reference(tmp_path / "ref", inputs=pgd() if adversarial else None)
    ctx = context(tmp_path, Recorder(crash_at))
    with pytest.raises(Crash):
        robench.train(ctx.new_model(), ctx, SCHEDULE, inputs=pgd() if adversarial else None)
    again = Recorder()
    ctx = context(tmp_path, again)
    model = robench.train(ctx.new_model(), ctx, SCHEDULE, inputs=pgd() if adversarial else None)
    assert_same_weights(model, expected)
    assert torch.equal(torch.get_rng_state(), rng)  # what runs after training draws the same
    done = crash_at - 1 if period == "0" else (crash_at - 1) // 6 * 6
    assert again.steps == 18 - done and again.started.get("train", 0) == done
    if done:
        epoch, batch = divmod(done, 6)
        assert again.lines == [f"resuming train from epoch {epoch + 1}, batch {batch + 1} of {only(tmp_path)}"]
    else:
        assert not again.lines


class NoisyLoss:
    """A loss with a generator of its own (as a distillation loss sampling subnets has):
    cross-entropy on inputs with Gaussian noise drawn from it."""

    def __init__(self, sigma: float = 0.1) -> None:
        self.sigma, self.gen = sigma, torch.Generator().manual_seed(5)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen) * self.sigma
        return nn.functional.cross_entropy(model((x + noise).clamp(0, 1)), y)

    def identity(self) -> dict[str, object]:
        return {"kind": "noisy", "sigma": self.sigma}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


def zero_first_conv(model: nn.Module) -> None:
    """An after_step that keeps a mask: the first conv's first filter stays zero."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        first.weight[0].zero_()


@pytest.mark.parametrize("crash_at", [4, 9])
def test_a_phase_with_a_stateful_loss_and_an_after_step_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")
    expected, rng = reference(tmp_path / "ref", loss=NoisyLoss(), after_step=zero_first_conv)
    clean, _ = reference(tmp_path / "clean")
    assert not torch.equal(expected.state_dict()["1.0.weight"], clean.state_dict()["1.0.weight"])
    ctx = context(tmp_path, Recorder(crash_at))
    with pytest.raises(Crash):
        robench.train(ctx.new_model(), ctx, SCHEDULE, loss=NoisyLoss(), after_step=zero_first_conv)
    model = robench.train(ctx.new_model(), ctx, SCHEDULE, loss=NoisyLoss(), after_step=zero_first_conv)
    assert_same_weights(model, expected)
    assert torch.equal(torch.get_rng_state(), rng)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.weight[0].abs().sum() == 0  # the mask survived every step, the resumed ones too


def test_another_loss_parameter_is_another_phase(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    robench.train(ctx.new_model(), ctx, SCHEDULE, loss=NoisyLoss(0.1))
    robench.train(ctx.new_model(), ctx, SCHEDULE, loss=NoisyLoss(0.2))
    robench.train(ctx.new_model(), ctx, SCHEDULE)
    assert len(list(tmp_path.glob("train-*.pt"))) == 3


def only(folder: Path) -> Path:
    (path,) = folder.glob("train-*.pt")
    return path


def two_phases(ctx: Context) -> nn.Module:
    """A two-phase build: clean training, then adversarial fine-tuning of its result."""
    model = robench.train(ctx.new_model(), ctx, SCHEDULE, desc="phase 1")
    tune = dataclasses.replace(SCHEDULE, epochs=2, lr=0.01, milestones=())
    return robench.train(model, ctx, tune, inputs=pgd(), desc="phase 2")


def test_a_build_interrupted_in_phase_2_resumes_phase_2_and_skips_phase_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")
    (tmp_path / "ref").mkdir()
    expected = two_phases(context(tmp_path / "ref"))
    with pytest.raises(Crash):
        two_phases(context(tmp_path, Recorder(crash_at=18 + 5)))
    assert len(list(tmp_path.glob("train-phase-*.pt"))) == 2
    again = Recorder()
    assert_same_weights(two_phases(context(tmp_path, again)), expected)
    assert again.per_desc.get("phase 1", 0) == 0 and again.started["phase 1"] == 18  # loaded, not trained
    assert again.per_desc["phase 2"] == 12 - 4 and again.started["phase 2"] == 4
    assert "resuming phase 1 at its end" in again.lines[0]
    assert again.lines[1].startswith("resuming phase 2 from epoch 1, batch 5 of ")


@pytest.mark.parametrize("compression", ["prune", "ptq", "qat"])
def test_advft_resumes_its_fine_tuning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str) -> None:
    """Start model (trained by tiny_context's model cache), compression, then fine-tuning."""
    from robench.plugins.advft import AdverFine

    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")
    defense = AdverFine.create(
        {"compression": compression, "finetune_epochs": 2, "attack_steps": 2, "sparsity": 0.5, "batch_size": 32}
    )
    (tmp_path / "ref").mkdir()
    ((name, expected),) = defense.fit(context(tmp_path / "ref")).items()
    with pytest.raises(Crash):
        defense.fit(context(tmp_path, Recorder(crash_at=6, crash_in="tune")))
    again = Recorder()
    ((_, model),) = defense.fit(context(tmp_path, again)).items()
    assert_same_weights(model, expected)
    assert again.steps == 8 - 5 and again.started[f"{name} tune"] == 5  # the start model loaded, not trained


@pytest.mark.parametrize("crash_at", [1, 2])  # 128 tiny images, batch 64: 2 batches per phase epoch
def test_eio_resumes_in_the_phase_it_was_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int) -> None:
    """Pre-training, then diversification (a stateful loss with its own target shuffle), then
    derivation and fine-tuning: killed in diversification, EIO resumes there."""
    from robench.plugins.eio import EnsembleInOne

    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")
    defense = EnsembleInOne.create(
        {"warmup_epochs": 1, "epochs": 2, "finetune_epochs": 0, "distill_steps": 2, "batch_size": 64}
    )
    (tmp_path / "ref").mkdir()
    expected = defense.fit(context(tmp_path / "ref"))
    with pytest.raises(Crash):
        defense.fit(context(tmp_path, Recorder(crash_at=crash_at + 1, crash_in="eio diversify")))
    again = Recorder()
    models = defense.fit(context(tmp_path, again))
    for name, model in expected.items():
        assert_same_weights(models[name], model)
    assert again.per_desc.get("eio pre-train", 0) == 0  # loaded from its final checkpoint, not trained
    assert again.started["eio diversify"] == crash_at and again.per_desc["eio diversify"] == 4 - crash_at


def test_a_checkpoint_written_for_other_parameters_is_never_used(tmp_path: Path) -> None:
    expected, _ = reference(tmp_path / "ref")
    other = dataclasses.replace(SCHEDULE, lr=0.2)
    ctx = context(tmp_path, Recorder(crash_at=8))
    with pytest.raises(Crash):
        robench.train(ctx.new_model(), ctx, other)
    (stale,) = tmp_path.glob("train-*.pt")
    again = Recorder()
    ctx = context(tmp_path, again)
    assert_same_weights(robench.train(ctx.new_model(), ctx, SCHEDULE), expected)
    assert again.steps == 18 and not again.lines  # another file name: not even looked at
    # the same file name with another identity inside (e.g. a damaged or hand-copied file)
    (own,) = set(tmp_path.glob("train-*.pt")) - {stale}
    own.unlink()
    stale.rename(own)
    again = Recorder()
    ctx = context(tmp_path, again)
    assert_same_weights(robench.train(ctx.new_model(), ctx, SCHEDULE), expected)
    assert again.steps == 18 and again.lines == [f"ignoring checkpoint {own}: written for other parameters"]


def test_other_starting_weights_or_inputs_are_another_phase(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    robench.train(ctx.new_model(), ctx, SCHEDULE)
    robench.train(ctx.new_model(), ctx, SCHEDULE, inputs=pgd())
    robench.train(ctx.new_model(), ctx, SCHEDULE, inputs=robench.pgd_inputs(0.2, 3, 0.25, random_start=True))
    start = ctx.new_model()
    with torch.no_grad():
        next(start.parameters()).add_(1e-3)
    robench.train(start, ctx, SCHEDULE)
    assert len(list(tmp_path.glob("train-*.pt"))) == 4


def test_without_a_scratch_folder_nothing_is_written(tmp_path: Path) -> None:
    ctx = context(tmp_path / "missing")
    robench.train(ctx.new_model(), ctx, SCHEDULE)
    assert not (tmp_path / "missing").exists()


_CHILD = """
import dataclasses, os, sys, time
from pathlib import Path
import robench
from robench.context import Progress, ProgressBar
from robench.testing import tiny_context
from test_resume import SCHEDULE, pgd
from robench import resume

tmp, mode, at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def hang():
    (tmp / "hanging").write_text("")
    time.sleep(120)

class Bar(ProgressBar):
    n = 0
    def update(self, n=1, **postfix):
        Bar.n += n
        if mode == "step" and Bar.n == at:
            hang()

class P(Progress):
    def bar(self, total, desc):
        return Bar()

if mode == "write":  # killed between writing a checkpoint and renaming it into place
    replace, calls = os.replace, [0]
    def slow_replace(src, dst):
        calls[0] += 1
        if calls[0] == at:
            hang()
        replace(src, dst)
    resume.os.replace = slow_replace
ctx = dataclasses.replace(tiny_context(tmp), progress=P())
robench.train(ctx.new_model(), ctx, SCHEDULE, inputs=pgd())
"""


@pytest.mark.parametrize(("mode", "at"), [("step", 9), ("write", 5)])
def test_a_killed_process_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, at: int
) -> None:
    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")
    expected, _ = reference(tmp_path / "ref", inputs=pgd())
    work = tmp_path / "work"
    work.mkdir()
    # the child trains with this process's thread count: CPU float sums depend on it, and the
    # resumed weights must equal this process's uninterrupted ones bit for bit
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD), str(work), mode, str(at)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (work / "hanging").exists():
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    if mode == "write":
        assert list(work.glob(".train-*.tmp"))  # the half-finished write, never read
    again = Recorder()
    ctx = context(work, again)
    assert_same_weights(robench.train(ctx.new_model(), ctx, SCHEDULE, inputs=pgd()), expected)
    assert again.started["train"] == at - 1 and again.steps == 18 - (at - 1)


# -- through the runner ---------------------------------------------------------------


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    return manager


def run_tiny(pm: pluggy.PluginManager, tmp: Path, name: str, defense: PluginSpec) -> Summary:
    benchmark = Benchmark(
        name="tiny",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(defense,),
        attacks=(PluginSpec.of("pgd", {"steps": 5, "restarts": 2}),),
        eps=(0.2,),
        n_samples=64,
        batch_size=32,
    )
    return run(benchmark, pm=pm, run_dir=tmp / name, cache_dir=tmp / f"{name}-cache", device="cpu")


def cells(summary: Summary) -> pd.DataFrame:
    return RunStore(summary.run_dir).read_cells().sort_values("cell_id").reset_index(drop=True)


@pytest.mark.parametrize(
    "defense",
    [
        PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}),
        PluginSpec.of("advt", {"epochs": 3, "lr": 0.05, "momentum": 0.9, "attack_steps": 2, "eps_warmup": 0.5}),
    ],
    ids=["baseline", "advt"],
)
def test_a_build_killed_mid_training_resumes_to_the_same_table(
    pm: pluggy.PluginManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defense: PluginSpec
) -> None:
    monkeypatch.setenv("ROBENCH_CHECKPOINT_SECONDS", "0")
    step, calls = training._step, [0]

    def counting_step(*args: Any) -> float:
        calls[0] += 1
        if calls[0] == crash_at:
            raise Crash
        return step(*args)

    monkeypatch.setattr(training, "_step", counting_step)
    crash_at = 0
    expected = cells(run_tiny(pm, tmp_path, "ref", defense))
    assert not list((tmp_path / "ref-cache" / "models").glob("*.work"))  # scratch gone after the save
    total, calls[0], crash_at = calls[0], 0, 5
    assert total > crash_at
    with pytest.raises(Crash):
        run_tiny(pm, tmp_path, "run", defense)
    (work,) = (tmp_path / "run-cache" / "models").glob("*.work")
    assert list(work.glob("train-*.pt"))  # the crash left the checkpoint
    calls[0], crash_at = 0, 0
    resumed = cells(run_tiny(pm, tmp_path, "run", defense))
    pd.testing.assert_frame_equal(expected[MEASURED], resumed[MEASURED])
    assert calls[0] == total - 4  # resumed after the 4 finished steps
    assert not work.exists()  # removed once the resumed build's model is saved
