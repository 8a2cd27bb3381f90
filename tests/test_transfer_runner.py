"""Transfer protocols through the runner: surrogates, the shared transfer cache, verdicts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pluggy
import pytest
import torch
from test_runner import MEASURED, cells, pm, robust_samples, run_tiny  # noqa: F401  (pm is a fixture)

from robench.plugin import PluginSpec
from robench.protocol import AttackUse, Protocol, Surrogate

SURROGATE = Surrogate("base2", PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}), (100, 101))
PROTOCOL = Protocol(
    name="tiny-transfer",
    uses=(
        AttackUse(PluginSpec.of("pgd", {"steps": 5, "restarts": 2, "stop_on_success": False}), "base2"),
        AttackUse(PluginSpec.of("mifgsm", {"steps": 5, "restarts": 1}), "base2"),
        AttackUse(PluginSpec.of("pgd", {"steps": 5, "restarts": 2})),  # and one white-box use
    ),
    surrogates=(SURROGATE,),
)
TARGETS = (
    PluginSpec.of("baseline", {"epochs": 3, "lr": 0.05, "momentum": 0.9}),
    PluginSpec.of("baseline", {"epochs": 2, "lr": 0.05, "momentum": 0.9}),
)


def run_transfer(pm: pluggy.PluginManager, tmp: Path, name: str, **overrides: object) -> pd.DataFrame:  # noqa: F811
    values: dict[str, object] = {"defenses": TARGETS, "attacks": (), "inline_protocols": (PROTOCOL,), **overrides}
    return cells(run_tiny(pm, tmp, name, **values))


def test_transfer_sets_are_generated_once_and_shared(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    table = run_transfer(pm, tmp_path, "a")
    assert (table["status"] == "ok").all() and table["transfer"].all() and (table["n_versions"] == 5).all()
    files = sorted((tmp_path / "cache" / "transfer").glob("*.pt"))
    assert len(files) == 2 * 3  # 2 eps x 3 transfer versions, whatever the number of targets
    # both targets of an eps used the very same sets
    used = table.groupby("eps")["transfer_sets"].nunique()
    assert (used == 1).all()
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run_transfer(pm, tmp_path, "b")  # a new run: everything comes from the cache
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    pd.testing.assert_frame_equal(table[MEASURED], again[MEASURED])


def test_transfer_early_exit_is_exact(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    fast = run_transfer(pm, tmp_path, "fast")
    full = run_transfer(pm, tmp_path, "full", exhaustive=True)
    pd.testing.assert_frame_equal(fast[MEASURED], full[MEASURED])
    assert (fast["robust_acc"] < fast["clean_acc"]).any()  # the transfer versions did something


def test_a_corrupt_transfer_set_is_regenerated(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    first = run_transfer(pm, tmp_path, "a", eps=(0.2,))
    for path in (tmp_path / "cache" / "transfer").glob("*.pt"):
        stored = torch.load(path, weights_only=True)
        stored["x_adv"] = (stored["x_adv"] + 0.5).clamp(0, 1)  # outside the eps-ball now
        torch.save(stored, path)
    second = run_transfer(pm, tmp_path, "b", eps=(0.2,))
    pd.testing.assert_frame_equal(first[MEASURED], second[MEASURED])
    for path in (tmp_path / "cache" / "transfer").glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])  # truncated (a full disk): unreadable, not a crash
    third = run_transfer(pm, tmp_path, "c", eps=(0.2,))
    pd.testing.assert_frame_equal(first[MEASURED], third[MEASURED])
    assert third["transfer_generated"].sum() == 3  # each of the 3 sets produced again, once


def test_an_undeclared_surrogate_fails_at_plan_time(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    from robench.errors import ConfigError

    bad = Protocol(name="bad", uses=(AttackUse(PluginSpec.of("pgd"), "nobody"),))
    with pytest.raises(ConfigError, match="undeclared surrogate"):
        run_transfer(pm, tmp_path, "bad", inline_protocols=(bad,))
    assert not (tmp_path / "cache").exists()


def test_sanity_flag_whitebox_above_transfer(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    from robench.results.flags import compute_flags

    table = run_transfer(pm, tmp_path, "a", eps=(0.2,), attacks=(PluginSpec.of("fgsm"),))
    flagged = compute_flags(table)
    white = flagged[~flagged["transfer"]]
    transfer = flagged[flagged["transfer"]].set_index("defense_params")["robust_acc"]
    expected = white["robust_acc"].to_numpy() > transfer.loc[white["defense_params"]].to_numpy() + 1.5 / 80
    assert list(white["flag_whitebox_above_transfer"]) == list(expected)
