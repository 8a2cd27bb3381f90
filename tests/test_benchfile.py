"""Benchmark files (benchmarks/*.toml): parsing, validation, the CLI and a real tiny run."""

from __future__ import annotations

import importlib.metadata as md
import textwrap
from pathlib import Path

import pluggy
import pytest
from conftest import Shell

from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.errors import ConfigError
from robench.execute.runner import run
from robench.plan import benchfile
from robench.plan.benchfile import load_benchmark
from robench.plan.config import Benchmark
from robench.plan.grid import plan
from robench.plugin import PluginSpec
from robench.protocol import AttackUse, Surrogate
from robench.results.storage import RunStore
from robench.testing import TinyPlugin

ROOT = Path(__file__).resolve().parents[1]

# Every feature at once; plan-able with the built-ins (no data, no compute).
FULL = """
name = "full"
preset = "paper"
requires = ["robench>=0.1"]
norm = "linf"
[grid]
dataset = ["fashion-mnist", "cifar10"]
arch = ["cnn8"]
defense = ["baseline", "advt", { name = "advt", eps = 0.05 }]
protocol = ["whitebox-pgd", "advft-pgd", "my-transfer"]
attack = ["pgd", "fgsm"]
eps = [0.02, 0.05]
seed = [0, 1]
exclude = [{ defense = "baseline", protocol = "my-transfer" }, { attack = "fgsm", eps = 0.05 }]
[evaluation]
n_samples = 300
sample_seed = 7
batch_size = 50
[defenses.advt]
epochs = 2
[attacks.pgd]
steps = 20
[protocols.whitebox-pgd]
steps = 30
[protocols.my-transfer]
surrogates = [{ name = "base2", defense = "baseline", params = { epochs = 1 }, seeds = [100, 101] }]
uses = [{ attack = "pgd", params = { steps = 10 }, source = "base2" }, { attack = "fgsm" }]
votes = 3
"""

# A real run in seconds: the tiny synthetic dataset and net, two attacks, one cell excluded.
TINY = """
[grid]
dataset = ["tiny"]
arch = ["tinynet"]
defense = ["baseline"]
attack = ["pgd", "fgsm"]
eps = [0.2, 0.23]
exclude = [{ attack = "fgsm", eps = 0.23 }]
[evaluation]
n_samples = 40
batch_size = 32
[defenses.baseline]
epochs = 2
lr = 0.05
momentum = 0.9
[attacks.pgd]
steps = 5
restarts = 2
"""

MINIMAL = '[grid]\ndefense = ["baseline"]\nattack = ["pgd"]\n'


def write(tmp_path: Path, text: str, name: str = "bench.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str) -> Benchmark:
    return load_benchmark(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> str:
    """The message of the ConfigError that loading ``text`` raises; it must name the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_benchmark(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


@pytest.fixture
def registries() -> Registries:
    return Registries.collect(get_plugin_manager())


@pytest.fixture
def tiny_pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    return manager


# -- parsing ---------------------------------------------------------------------------


def test_every_feature_parses_into_the_benchmark(tmp_path: Path) -> None:
    b = load(tmp_path, FULL)
    assert (b.name, b.preset, b.norm) == ("full", "paper", "linf")
    assert b.datasets == ("fashion-mnist", "cifar10") and b.archs == ("cnn8",)
    assert b.eps == (0.02, 0.05) and b.seeds == (0, 1)
    assert (b.n_samples, b.sample_seed, b.batch_size) == (300, 7, 50)
    # [defenses.advt] applies to every advt; a table's own keys override it
    assert b.defenses == (
        PluginSpec.of("baseline"),
        PluginSpec.of("advt", {"epochs": 2}),
        PluginSpec.of("advt", {"epochs": 2, "eps": 0.05}),
    )
    assert b.attacks == (PluginSpec.of("pgd", {"steps": 20}), PluginSpec.of("fgsm"))
    assert b.protocols == (PluginSpec.of("whitebox-pgd", {"steps": 30}), PluginSpec.of("advft-pgd"))
    (inline,) = b.inline_protocols
    assert inline.name == "my-transfer" and inline.votes == 3
    assert inline.surrogates == (Surrogate("base2", PluginSpec.of("baseline", {"epochs": 1}), (100, 101)),)
    assert inline.uses == (AttackUse(PluginSpec.of("pgd", {"steps": 10}), "base2"), AttackUse(PluginSpec.of("fgsm")))
    assert b.exclude == ((("defense", "baseline"), ("protocol", "my-transfer")), (("attack", "fgsm"), ("eps", 0.05)))


def test_defaults_name_is_the_file_stem(tmp_path: Path) -> None:
    b = load_benchmark(write(tmp_path, MINIMAL, "my-bench.toml"))
    assert b.name == "my-bench" and b.datasets == ("fashion-mnist",) and b.archs == ("cnn8",)
    assert (b.preset, b.norm, b.eps, b.seeds, b.exclude) == ("smoke", "linf", (), (0,), ())


def test_the_grid_is_the_product_of_the_axes_minus_the_excludes(tmp_path: Path, registries: Registries) -> None:
    cells = plan(load(tmp_path, FULL), registries)
    # 2 datasets x 3 defenses x 2 seeds x (5 protocols x 2 eps) = 120; the first exclude drops
    # 2 x 1 x 2 x 2 = 8 (baseline, my-transfer), the second 2 x 3 x 2 = 12 (fgsm at 0.05)
    assert len(cells) == 120 - 8 - 12
    ids = [c.id for c in cells]
    assert "cifar10/cnn8/advt[epochs=2,eps=0.05]/model/my-transfer/linf/eps=0.02/seed=1" in ids
    assert not [i for i in ids if "/baseline/" in i and "/my-transfer/" in i]
    assert not [i for i in ids if "/fgsm/" in i and "/eps=0.05/" in i]
    assert len({c.protocol.name for c in cells}) == 5


def test_config_hash_covers_exclude(tmp_path: Path) -> None:
    plain = load(tmp_path, MINIMAL)
    excluding = load(tmp_path, MINIMAL + "exclude = [{ eps = 0.1 }]\neps = [0.1, 0.2]\n")
    assert excluding.config_hash() != load(tmp_path, MINIMAL + "eps = [0.1, 0.2]\n").config_hash()
    assert "exclude" not in plain.to_json()  # benchmarks without one keep their old hash


def test_requires_satisfied(tmp_path: Path) -> None:
    for spec in ('"robench"', '"robench>=0.1"', '"Robench>=0.0.9,<99"', '"robench==0.1.0"', '"robench>0.0"'):
        assert load(tmp_path, f"requires = [{spec}]\n" + MINIMAL).name == "bench"


def test_requires_unsatisfied_lists_installed_expected_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchfile, "_robench_distributions", lambda: {"robench-eio": "robench-eio==0.3"})
    version = md.version("robench")
    message = error(tmp_path, 'requires = ["robench>=99", "robench-nope>=1", "robench<=99"]\n' + MINIMAL)
    assert message == (
        "required distributions were not installed!\n"
        f"- installed: robench-eio==0.3, robench=={version}\n"
        "- expected: robench-nope>=1, robench<=99, robench>=99\n"
        f"- missing: robench-nope>=1 (not installed), robench>=99 ({version} installed)"
    )


def test_a_malformed_requirement_is_an_error(tmp_path: Path) -> None:
    assert "is not NAME or NAME followed by" in error(tmp_path, 'requires = ["robench~=0.1"]\n' + MINIMAL)


def test_unknown_keys_suggest_the_accepted_ones(tmp_path: Path) -> None:
    message = error(tmp_path, 'presett = "smoke"\n' + MINIMAL)
    assert message.startswith("unknown top-level key 'presett'. Did you mean: preset? Accepted: name, preset,")
    assert "Did you mean: defense?" in error(tmp_path, MINIMAL.replace("defense", "defence"))
    assert "unknown [evaluation] key 'n_sample'. Did you mean: n_samples?" in error(
        tmp_path, MINIMAL + "[evaluation]\nn_sample = 3\n"
    )
    assert "exclude key 'defence' is not an axis. Did you mean: defense?" in error(
        tmp_path, MINIMAL + 'exclude = [{ defence = "baseline" }]\n'
    )
    inline = '[protocols.mine]\nuses = [{ attack = "pgd", param = {} }]\n'
    message = error(tmp_path, MINIMAL.replace('attack = ["pgd"]', 'protocol = ["mine"]') + inline)
    assert "unknown [protocols.mine] uses key 'param'. Did you mean: params?" in message


def test_wrong_types_name_the_file_and_the_key(tmp_path: Path) -> None:
    assert error(tmp_path, MINIMAL + 'eps = ["0.1"]\n') == "grid.eps must be a list of numbers, got ['0.1']"
    assert error(tmp_path, MINIMAL + "seed = [true]\n") == "grid.seed must be a list of integers, got [True]"
    assert error(tmp_path, "name = 3\n" + MINIMAL) == "name must be a string, got 3"
    assert error(tmp_path, MINIMAL + '[evaluation]\nn_samples = "many"\n') == (
        "[evaluation] n_samples must be an integer, got 'many'"
    )
    assert error(tmp_path, MINIMAL.replace('["baseline"]', "[{ eps = 0.1 }]")).startswith(
        "grid.defense: the table {'eps': 0.1} needs a `name` string"
    )
    assert error(tmp_path, 'grid = "all"\n') == "grid must be a table ([grid]), got 'all'"
    assert error(tmp_path, MINIMAL + 'exclude = [{ seed = "0" }]\n') == "grid.exclude: seed must be an integer, got '0'"
    assert error(tmp_path, MINIMAL + "[defenses]\nbaseline = 3\n").startswith("[defenses] holds one table per plugin")


def test_the_sample_order_is_an_evaluation_key_checked_before_compute(tmp_path: Path) -> None:
    path = tmp_path / "first.toml"
    path.write_text(MINIMAL + '[evaluation]\nsample_order = "first"\n')
    first = load_benchmark(path)
    assert first.sample_order == "first" and first.to_json()["sample_order"] == "first"  # in the manifest
    path.write_text(MINIMAL)
    assert "sample_order" not in load_benchmark(path).to_json()  # random: earlier runs' hashes unchanged
    assert load_benchmark(path).config_hash() != first.config_hash()
    assert error(tmp_path, MINIMAL + '[evaluation]\nsample_order = "frist"\n') == (
        "unknown sample order 'frist'. Did you mean: first? Use one of random, first"
    )
    assert error(tmp_path, MINIMAL + "[evaluation]\nsample_order = 1\n") == (
        "[evaluation] sample_order must be a string, got 1"
    )


def test_invalid_toml_and_benchmark_errors_name_the_file(tmp_path: Path) -> None:
    assert error(tmp_path, "[grid\n").startswith("not valid TOML: ")
    assert error(tmp_path, '[grid]\ndefense = ["baseline"]\n').startswith("a benchmark needs at least one defense")
    assert error(tmp_path, 'preset = "huge"\n' + MINIMAL).startswith("unknown preset 'huge'")
    with pytest.raises(ConfigError, match=r"benchmark file .*nowhere\.toml not found"):
        load_benchmark(tmp_path / "nowhere.toml")


def test_a_parameter_table_for_an_unlisted_plugin_is_an_error(tmp_path: Path) -> None:
    message = error(tmp_path, MINIMAL + "[defenses.basline]\nepochs = 1\n")
    assert (
        message == "[defenses.basline] is not used: grid.defense does not list 'basline'. Did you mean: baseline?"
        " grid.defense = ['baseline']"
    )
    assert "[attacks.fgsm] is not used" in error(tmp_path, MINIMAL + "[attacks.fgsm]\nsteps = 1\n")


def test_exclude_errors_at_plan_time(tmp_path: Path, registries: Registries) -> None:
    typo = load(tmp_path, MINIMAL + 'exclude = [{ defense = "basline" }]\n')
    with pytest.raises(ConfigError, match=r'exclude entry \{ defense = "basline" \} matches no cell'):
        plan(typo, registries)
    everything = load(tmp_path, MINIMAL + 'exclude = [{ defense = "baseline" }]\n')
    with pytest.raises(ConfigError, match="remove every cell"):
        plan(everything, registries)


def test_plugin_names_and_parameters_are_checked_by_plan(tmp_path: Path, registries: Registries) -> None:
    with pytest.raises(ConfigError, match="unknown parameter"):
        plan(load(tmp_path, MINIMAL + "[attacks.pgd]\nstepz = 3\n"), registries)
    inline = '[protocols.whitebox-pgd]\nuses = [{ attack = "pgd" }]\n'
    clash = load(tmp_path, MINIMAL.replace('attack = ["pgd"]', 'protocol = ["whitebox-pgd"]') + inline)
    with pytest.raises(ConfigError, match="has the name of a registered protocol"):
        plan(clash, registries)


@pytest.mark.parametrize("name", ["eio-fashion-smoke", "eio-paper"])
def test_the_shipped_benchmarks_parse(name: str) -> None:
    b = load_benchmark(ROOT / "benchmarks" / f"{name}.toml")
    assert b.name == name and {p.name for p in b.protocols} == {"whitebox-pgd", "blackbox-dverge"}
    assert b.seeds == (0,) and b.defenses[0] == PluginSpec.of("baseline")
    assert "eio" in {d.name for d in b.defenses}


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_benchmark_plans(path: Path) -> None:
    cells = plan(load_benchmark(path), Registries.collect(get_plugin_manager()))
    assert cells and len({c.id for c in cells}) == len(cells)


def test_the_advft_reproduction_names_the_papers_rows() -> None:
    cells = plan(load_benchmark(ROOT / "benchmarks" / "advft-fashion.toml"), Registries.collect(get_plugin_manager()))
    variants = {c.variant for c in cells}
    assert variants == {
        "model",
        "f_std+AFT",
        "P(f_std)",
        "P(f_std)+SFT",
        "P(f_std)+AFT",
        "Q(f_std)",
        "Q(f_std)+SFT",
        "Q(f_std)+AFT",
    }
    assert {c.eps for c in cells} == {0.05, 0.1}, "the paper's effective and stated eps, pixel units"


# -- the command line ------------------------------------------------------------------


def test_plan_prints_the_cells_of_a_file(tmp_path: Path, shell: Shell) -> None:
    path = write(tmp_path, FULL)
    code, printed = shell(["plan", str(path)])
    lines = printed.splitlines()
    assert code == 0 and lines[-1] == "100 cell(s)" and len(lines) == 101
    assert lines[0] == "fashion-mnist/cnn8/baseline/model/pgd[steps=20]/linf/eps=0.02/seed=0"
    code, printed = shell(["plan", str(path), "-k", "my-transfer", "--batch-size", "7"])
    lines = printed.splitlines()
    assert code == 0 and lines[-1] == "16 cell(s)" and all("/my-transfer/" in line for line in lines[:-1])


def test_grid_flags_cannot_be_given_with_a_file(tmp_path: Path, shell: Shell) -> None:
    path = write(tmp_path, MINIMAL)
    code, printed = shell(["plan", str(path), "--eps", "0.1", "-D", "epochs=1"])
    assert code == 2 and "Traceback" not in printed
    assert f"error: --defense-param, --eps cannot be combined with a benchmark file ({path})" in printed
    code, printed = shell(["run", str(path), "--defense", "advt", "--out", str(tmp_path / "x")])
    assert code == 2 and "--defense cannot be combined with a benchmark file" in printed
    assert not (tmp_path / "x").exists()


def test_batch_size_overrides_the_file() -> None:
    path = ROOT / "benchmarks" / "eio-paper.toml"
    assert benchfile.benchmark_for_command(path, [], None).batch_size == 250
    assert benchfile.benchmark_for_command(path, [], 64, exhaustive=True).batch_size == 64


# -- a real run --------------------------------------------------------------------------


def test_a_loaded_file_runs_and_a_rerun_skips_everything(tiny_pm: pluggy.PluginManager, tmp_path: Path) -> None:
    benchmark = load(tmp_path, TINY)
    first = run(benchmark, pm=tiny_pm, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu")
    table = RunStore(first.run_dir).read_cells()
    prefix = "tiny/tinynet/baseline[epochs=2,lr=0.05,momentum=0.9]/model"
    assert sorted(table["cell_id"]) == [
        f"{prefix}/fgsm/linf/eps=0.2/seed=0",
        f"{prefix}/pgd[restarts=2,steps=5]/linf/eps=0.2/seed=0",
        f"{prefix}/pgd[restarts=2,steps=5]/linf/eps=0.23/seed=0",
    ]
    assert (table["status"] == "ok").all() and (table["n"] == 40).all() and first.skipped == 0
    again = run(benchmark, pm=tiny_pm, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device="cpu")
    assert again.skipped == 3 and len(RunStore(again.run_dir).read_cells()) == 3


def test_the_documented_example_parses_and_plans(tmp_path: Path, registries: Registries) -> None:
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    cells = plan(load_benchmark(write(tmp_path, example, "eio-fashion-smoke.toml")), registries)
    assert len(cells) == 3 * 3 * 3 - 3  # defenses x (pgd, whitebox-pgd, my-transfer) x eps, minus the exclude
