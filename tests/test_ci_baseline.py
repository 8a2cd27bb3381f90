"""The committed CI baseline stays usable: its run folder and the models its gate evaluates.

.ci/run evaluates ``benchmarks/ci.toml`` on the models stored in ``results/baselines/ci/models``
(``robench run --models``); a change that moves a model key (a defense parameter, its
revision) without regenerating them would fail CI only at its end. This fails first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.modelcache import ModelCache, data_fingerprint
from robench.plan.benchfile import load_benchmark
from robench.plan.grid import plan
from robench.results.storage import RunStore

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "results" / "baselines" / "ci"


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_every_model_of_the_ci_grid_is_stored_with_the_baseline(tmp_path: Path) -> None:
    registries = Registries.collect(get_plugin_manager())
    cells = plan(load_benchmark(ROOT / "benchmarks" / "ci.toml"), registries)
    train = registries.datasets.get("fashion-mnist").create().load("train")
    cache = ModelCache(tmp_path, frozen=BASELINE / "models")
    for key in {c.model for c in cells}:
        cache.require(key, data_fingerprint(train))
    stored = RunStore(BASELINE).read_cells()
    assert set(stored["cell_key"]) == {c.key for c in cells}, "the baseline holds exactly the grid's cells"
    assert set(stored["cpu_capability"].dropna()), "the baseline records the CPU it came from"
