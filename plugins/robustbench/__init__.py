"""``robustbench``: any model of RobustBench's zoo, by name, from local weights files.

    robench run --dataset cifar10 --defense robustbench \\
        -D model_name=Diffenderfer2021Winning_LRR -D threat_model=corruptions --attack pgd

The architectures are RobustBench's own constructors (``robustbench.model_zoo``, package
``robustbench==1.1.1``, imported only when a model is built: compat.py); the weights come
from a local folder in RobustBench's layout, ``{model_dir}/{dataset}/{threat_model}/{name}.pt``,
and ``{name}.pt_m{i}.pt`` for member ``i`` of an ensemble (the CARD decks have 6).
``model_dir`` defaults to ``$ROBENCH_DATA/robustbench`` (``~/.cache/robench/data/robustbench``
when ``$ROBENCH_DATA`` is unset), beside the CIFAR data. A run never downloads: on a machine
with internet, ``python -m robench.plugins.robustbench download NAME DATASET THREAT_MODEL DIR``
fetches the files with RobustBench's downloader (without loading them); copy ``DIR`` over.

**Hashes.** ``manifest.json`` (in this package) maps ``dataset/threat_model/name`` to the
sha256 of each of the model's files; ``null`` means not pinned yet. The expected hashes are
settled when the defense is created (at planning, before any compute) and stored in
``sha256``, so they are part of the model cache key and of ``defense_params``: the cache
can only ever serve the weights a row's ``weights_sha256`` names, and new weights are a new
key. A file is hashed when it is read (a fresh build), and a wrong hash stops the build. A
model the manifest does not pin is refused, with the hash of the file found, until the
user vouches for it (``-D sha256=...``, comma-separated for an ensemble's members) or pins
it: accepting any file would give rows whose weights nobody checked, and a hash computed
only at fit time could not be part of the key. To pin, with the files at hand:
``python -m robench.plugins.robustbench pin DIR`` (``--manifest FILE`` for a manifest of
your own, given to the defense as ``-D manifest=FILE``), then commit the manifest.

**Outputs.** Ensembles that average their members' softmax (the CARD decks,
``Chen2020Adversarial``) are presented as the log of that average
(:class:`~robench.plugins.robustbench.weights.LogMeanSoftmax`): RobustBench's prediction,
as scores attacks can treat as logits, so the row is not flagged ``probability_outputs``.
Other models return their logits.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, cast

from torch import nn

import robench
from robench.plugins.robustbench.compat import zoo_entry
from robench.plugins.robustbench.weights import (
    DATASETS,
    HEX,
    MANIFEST,
    SOFTMAX_ENSEMBLES,
    LogMeanSoftmax,
    data_root,
    how_to_get,
    load_into,
    read_manifest,
    read_weights,
    sha256_file,
    weight_files,
    zoo_state_dict,
)


@dataclass(frozen=True, kw_only=True)
class RobustBenchModel(robench.Defense):
    """A RobustBench model zoo entry, loaded from local weights files checked by sha256.

    Args:
        model_name: RobustBench's model name, e.g. ``Diffenderfer2021Winning_LRR_CARD_Deck``.
        threat_model: RobustBench's zoo: ``Linf`` (its default), ``L2`` or ``corruptions``.
        dataset: the dataset the model was trained for (``cifar10``, ``cifar100``); the
            presets set it to the cell's dataset. Give it to evaluate on a dataset of your own
            with the same images and classes (e.g. a local CIFAR-10-C plugin).
        sha256: the expected sha256 of the weights file (comma-separated, in member order, for
            an ensemble); empty: the manifest's. Filled in at creation, so it is in the model
            key and in ``defense_params``.
        model_dir: RobustBench's ``model_dir``; empty: ``$ROBENCH_DATA/robustbench``
            (``~/.cache/robench/data/robustbench`` when ``$ROBENCH_DATA`` is unset).
        manifest: a manifest JSON file of your own; empty: the one robench ships.
    """

    name: ClassVar[str] = "robustbench"
    # Not hyperparameters: the cell's dataset, set at planning so that each dataset of a grid
    # gets its own model and pinned hash (see __post_init__); any other dataset needs -D dataset.
    presets: ClassVar[dict[str, dict[str, object]]] = {
        "smoke": {},
        "paper": {},
        **{f"{preset}:{d}": {"dataset": d} for preset in ("smoke", "paper") for d in DATASETS},
    }
    model_name: str = ""
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"
    dataset: str = ""
    sha256: str = ""
    model_dir: str = ""
    manifest: str = ""

    def __post_init__(self) -> None:
        """Check the names and settle the expected hashes, at planning, before any compute."""
        if not self.model_name:
            raise robench.ConfigError(
                "the robustbench defense needs -D model_name=MODEL, e.g. Diffenderfer2021Winning_LRR"
            )
        if self.dataset not in DATASETS:
            got = f"dataset={self.dataset!r}" if self.dataset else "this cell's dataset"
            raise robench.ConfigError(
                f"robustbench: {got} is not one robench evaluates RobustBench models on (cifar10, cifar100). "
                "Run with --dataset cifar10 or cifar100, or give -D dataset=... for a dataset of the same shape."
            )
        object.__setattr__(self, "sha256", ",".join(self._expected()))

    @property
    def key(self) -> str:
        """``dataset/threat_model/model_name``: the manifest's key and RobustBench's folder."""
        return f"{self.dataset}/{self.threat_model}/{self.model_name}"

    def folder(self) -> Path:
        """Where the weights files are: ``{model_dir}/{dataset}/{threat_model}``."""
        root = Path(self.model_dir).expanduser() if self.model_dir else data_root() / "robustbench"
        return root / self.dataset / self.threat_model

    def _how_to_get(self) -> str:
        return how_to_get(self.model_name, self.dataset, self.threat_model, self.folder())

    def hashes(self) -> list[str]:
        """The expected sha256 of each weights file, in member order."""
        return self.sha256.split(",")

    def _expected(self) -> list[str]:
        manifest = Path(self.manifest).expanduser() if self.manifest else MANIFEST
        entries = read_manifest(manifest)
        given = [h.strip().lower() for h in self.sha256.split(",")] if self.sha256.strip() else []
        if any(not HEX.fullmatch(h) for h in given):
            raise robench.ConfigError(f"robustbench: sha256 must be 64 hex digits per file, got {self.sha256!r}")
        entry = entries.get(self.key)
        if entry is None:
            if given:
                return given
            close = difflib.get_close_matches(self.key, list(entries), n=3, cutoff=0.6)
            hint = f" Close entries: {', '.join(close)}." if close else ""
            raise robench.ConfigError(
                f"robustbench model {self.key} is not in the manifest {manifest}.{hint} For another RobustBench "
                f"model, pass the sha256 of its file(s) (-D sha256=...), having checked them:\n{self._found(1)}"
            )
        files = weight_files(self.model_name, len(entry))
        if sorted(entry) != sorted(files):
            raise robench.ConfigError(f"manifest {manifest}: {self.key} lists {sorted(entry)}, expected {files}")
        pinned = [entry[f] for f in files]
        contradicted = any(p is not None and p != g for p, g in zip(pinned, given, strict=False))
        if contradicted or (given and all(pinned) and len(given) != len(pinned)):
            raise robench.ConfigError(
                f"robustbench model {self.key}: sha256={self.sha256} is not the manifest's "
                f"{','.join(map(str, pinned))} ({manifest}); for other weights, pin them in a manifest of your "
                "own (-D manifest=FILE)"
            )
        if all(pinned):
            return cast(list[str], pinned)
        if len(given) != len(files):
            raise robench.ConfigError(
                f"robustbench model {self.key}: the manifest {manifest} does not pin its sha256 yet, so robench "
                f"cannot tell the file(s) are RobustBench's release.\n{self._found(len(files))}\nIf you trust them, "
                f"pass -D sha256=<{len(files)} hash(es), comma-separated, in this order> (it goes into the model key "
                f"and every row), or pin them: python -m robench.plugins.robustbench pin {self.folder().parents[1]}"
            )
        return given

    def _found(self, count: int) -> str:
        """Each file the model would load, with its sha256 (or how to get it, when absent)."""
        paths = [self.folder() / f for f in weight_files(self.model_name, count)]
        found = "\n".join(f"  {p}: " + (f"sha256 {sha256_file(p)}" if p.is_file() else "not there") for p in paths)
        if all(p.is_file() for p in paths):
            return found
        return f"{found}\nTo get the file(s): {self._how_to_get()}"

    def _check_data(self, ctx: robench.Context) -> None:
        if ctx.dataset in DATASETS and ctx.dataset != self.dataset:
            raise robench.ConfigError(
                f"robustbench model {self.key} is a {self.dataset} model, but the cell's dataset is {ctx.dataset}: "
                f"use --dataset {self.dataset}, or the {ctx.dataset} model (-D dataset={ctx.dataset})"
            )
        s, classes = ctx.shape, DATASETS[self.dataset]
        if (s.channels, s.height, s.width, s.num_classes) != (3, 32, 32, classes):
            raise robench.ConfigError(
                f"robustbench model {self.key} takes 3x32x32 images in {classes} classes; dataset "
                f"{ctx.dataset or '?'} has {s.channels}x{s.height}x{s.width} images in {s.num_classes}"
            )

    def _architecture(self) -> tuple[Callable[[], nn.Module], list[str]]:
        """RobustBench's constructor for the model, and the file of each part it loads."""
        entry = zoo_entry(self.dataset, self.threat_model, self.model_name)
        ids = entry["gdrive_id"]
        if ids is None or (isinstance(ids, list) and self.model_name not in SOFTMAX_ENSEMBLES):
            raise robench.ConfigError(
                f"robustbench model {self.key} is not supported: robench loads single models kept as weights "
                f"files, and the ensembles that average softmax ({', '.join(sorted(SOFTMAX_ENSEMBLES))})"
            )
        files = weight_files(self.model_name, len(ids) if isinstance(ids, list) else 1)
        if len(files) != len(self.hashes()):
            raise robench.ConfigError(
                f"robustbench model {self.key} has {len(files)} weights file(s) ({', '.join(files)}), "
                f"but {len(self.hashes())} sha256 value(s) were given"
            )
        return entry["model"], files

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Build RobustBench's architecture and load the checked weights files into it."""
        self._check_data(ctx)
        make, files = self._architecture()
        paths = [self.folder() / f for f in files]
        missing = [(p, h) for p, h in zip(paths, self.hashes(), strict=True) if not p.is_file()]
        if missing:
            raise robench.DataNotFoundError(
                f"robustbench model {self.key}: weights file(s) not found:\n"
                + "".join(f"  {p} (expected sha256 {h})\n" for p, h in missing)
                + self._how_to_get()
            )
        model = make()
        parts = list(cast(nn.ModuleList, model.models)) if len(paths) > 1 else [model]
        for part, path, expected in zip(parts, paths, self.hashes(), strict=True):
            found = sha256_file(path)
            if found != expected:
                raise robench.CacheError(
                    f"robustbench weights file {path} has the wrong sha256: expected {expected}, found {found}. "
                    f"It is not the file pinned for {self.key} (a partial download, another release or another "
                    f"model); {self._how_to_get()}"
                )
            state = zoo_state_dict(read_weights(path), self.model_name, member=len(paths) > 1)
            ignored = load_into(part, state, path)
            shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            extra = f"; ignored {len(ignored)} extra tensors ({shown})" if ignored else ""
            ctx.progress.log(f"robustbench: {path} (sha256 {found[:12]}){extra}")
        return {"model": self._present(model)}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """RobustBench's architecture as :meth:`fit` presents it, to load cached weights into."""
        self._check_data(ctx)
        return {"model": self._present(self._architecture()[0]())}

    def _present(self, model: nn.Module) -> nn.Module:
        return (LogMeanSoftmax(model) if self.model_name in SOFTMAX_ENSEMBLES else model).eval()

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """The model with the sha256 of its weights file(s), for the row."""
        return robench.Variant(name=name, model=model, weights_sha256=self.sha256)


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """robustbench."""
    return [RobustBenchModel]
