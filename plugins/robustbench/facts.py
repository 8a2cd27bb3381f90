"""RobustBench's published numbers for the models robench ships facts for (``leaderboard.json``).

``leaderboard.json`` is package data, copied from RobustBench's ``model_info`` at a named
commit (its ``source``): per ``dataset/threat_model/name``, the published clean and robust
(AutoAttack) or mean-corruption accuracy, the architecture, and RobustBench's Google Drive
ids and file names. It is read without importing robustbench or torch, so planning,
``robench zoo`` and the rows' reference columns stay cheap.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import robench

LEADERBOARD = Path(__file__).with_name("leaderboard.json")
STANDARD_EPS: dict[str, tuple[robench.Norm, float, str]] = {
    "Linf": ("linf", 8 / 255, "8/255"),
    "L2": ("l2", 0.5, "0.5"),
}
"""RobustBench's leaderboard threat per threat model: (robench norm, eps, as printed)."""


@dataclass(frozen=True)
class ModelFacts:
    """What RobustBench publishes about one model; accuracies in percent, as published."""

    dataset: str
    threat_model: str
    name: str
    clean_acc: float
    robust_acc: float | None
    """AutoAttack's robust accuracy (Linf, L2) or the mean corruption accuracy (corruptions)."""
    architecture: str
    gdrive_ids: tuple[str, ...]
    files: tuple[str, ...]
    external_acc: float | None = None
    """The leaderboard's number when it comes from another evaluation than AutoAttack."""
    note: str = ""

    @property
    def network(self) -> str:
        """The architecture, with the member count of an ensemble (``WideResNet-18-2 x6``)."""
        return self.architecture if len(self.files) == 1 else f"{self.architecture} x{len(self.files)}"

    @property
    def key(self) -> str:
        """``dataset/threat_model/name``, RobustBench's folder layout and the manifest's key."""
        return f"{self.dataset}/{self.threat_model}/{self.name}"

    def reference(self) -> robench.Reference | None:
        """The published evaluation as a :class:`robench.Reference` for the rows; None without a robust number."""
        if self.robust_acc is None:
            return None
        # imported here: the protocols' modules are the protocols' business, not the facts'
        from robench.plugins.corruptions import Corruptions
        from robench.plugins.robustbench.protocol import RobustBenchProtocol

        meta = leaderboard_meta()
        where = f"RobustBench model_info {self.key} @{meta['commit'][:8]} ({meta['date']})"
        first = f"first {meta['n_examples']} {self.dataset.upper().replace('CIFAR', 'CIFAR-')} test images"
        if self.threat_model == "corruptions":
            spec = Corruptions().build("paper").canonical()
            text = f"{where}: mean accuracy over 15 corruptions x severities 1-5, {first}"
            return robench.Reference(
                self.clean_acc / 100, self.robust_acc / 100, text, "corruptions", "corruption", 0.0, spec
            )
        norm, eps, shown = STANDARD_EPS[self.threat_model]
        text = f"{where}: AutoAttack standard, {self.threat_model} eps {shown}, {first}"
        if self.external_acc is not None:
            text += f"; the leaderboard shows {self.external_acc:.2f} ({self.note or 'another evaluation'})"
        spec = RobustBenchProtocol().build("paper").canonical()
        return robench.Reference(self.clean_acc / 100, self.robust_acc / 100, text, "robustbench", norm, eps, spec)


@functools.cache
def _load() -> tuple[dict[str, Any], dict[str, ModelFacts]]:
    data = json.loads(LEADERBOARD.read_text())
    models = {}
    for key, m in data["models"].items():
        dataset, threat_model, name = key.split("/")
        ids = m["gdrive_id"] if isinstance(m["gdrive_id"], list) else [m["gdrive_id"]]
        robust = m.get("corruptions_acc") if threat_model == "corruptions" else m.get("autoattack_acc")
        models[key] = ModelFacts(
            dataset,
            threat_model,
            name,
            float(m["clean_acc"]),
            None if robust is None else float(robust),
            m["architecture"],
            tuple(ids),
            tuple(m["weight_files"]),
            m.get("external_acc"),
            m.get("note", ""),
        )
    meta = {k: v for k, v in data.items() if k != "models"}
    return meta, models


def leaderboard() -> dict[str, ModelFacts]:
    """Every model robench has published facts for, by ``dataset/threat_model/name``."""
    return _load()[1]


def leaderboard_meta() -> dict[str, Any]:
    """Where the facts come from: ``source``, ``commit``, ``date``, ``n_examples``."""
    return _load()[0]


def find(name: str, dataset: str | None = None, threat_model: str | None = None) -> list[ModelFacts]:
    """The models called ``name`` (or with key ``name``), optionally of one dataset and threat model."""
    if name.count("/") == 2:
        found = leaderboard().get(name)
        return [found] if found else []
    return [
        m
        for m in leaderboard().values()
        if m.name == name and dataset in (None, m.dataset) and threat_model in (None, m.threat_model)
    ]


def near(name: str) -> list[str]:
    """Keys of models whose name or key is close to ``name``, for messages."""
    keys = list(leaderboard())
    names = {m.name for m in leaderboard().values()}
    close = difflib.get_close_matches(name, [*keys, *names], n=3, cutoff=0.6)
    return sorted({k for c in close for k in keys if c in (k, k.rsplit("/", 1)[1])})
