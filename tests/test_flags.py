"""Sanity flags over a run table (DESIGN.md §5), on synthetic rows with known answers."""

from __future__ import annotations

import pandas as pd

from robench.results.flags import compute_flags


def row(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "status": "ok",
        "dataset": "d",
        "arch": "a",
        "defense": "x",
        "defense_params": "{}",
        "seed": 0,
        "variant": "model",
        "protocol": "p",
        "norm": "linf",
        "eps": 0.1,
        "n": 1000,
        "robust_acc": 0.5,
        "transfer": False,
        "randomized": False,
        "eot": 0,
    }
    return {**base, **values}


def test_robust_accuracy_rising_with_eps_is_flagged() -> None:
    table = pd.DataFrame([row(eps=0.05, robust_acc=0.6), row(eps=0.1, robust_acc=0.7), row(eps=0.2, robust_acc=0.3)])
    assert list(compute_flags(table)["flag_eps_not_monotonic"]) == [False, True, False]


def test_one_sample_of_noise_is_not_a_trend() -> None:
    table = pd.DataFrame([row(eps=0.05, robust_acc=0.600), row(eps=0.1, robust_acc=0.601)])
    assert not compute_flags(table)["flag_eps_not_monotonic"].any()


def test_whitebox_above_transfer_is_flagged() -> None:
    table = pd.DataFrame(
        [
            row(protocol="white", robust_acc=0.4),
            row(protocol="black", transfer=True, robust_acc=0.3),
            row(protocol="white", eps=0.2, robust_acc=0.1),
            row(protocol="black", eps=0.2, transfer=True, robust_acc=0.3),
        ]
    )
    assert list(compute_flags(table)["flag_whitebox_above_transfer"]) == [True, False, False, False]


def test_large_eps_and_randomized_without_eot() -> None:
    table = pd.DataFrame(
        [
            row(eps=0.5, robust_acc=0.5),
            row(eps=0.5, robust_acc=0.05),
            row(randomized=True, eot=0),
            row(randomized=True, eot=10),
            row(status="error", eps=0.5, robust_acc=0.9),
        ]
    )
    flags = compute_flags(table)
    assert list(flags["flag_large_eps_survives"]) == [True, False, False, False, False]
    assert list(flags["flag_randomized_without_eot"]) == [False, False, True, False, False]
