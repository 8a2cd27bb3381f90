"""RobustBench's weights files: the manifest of their hashes, the layout, safe loading.

RobustBench's own ``load_model`` downloads what is missing and reads each file with plain
``torch.load`` (an arbitrary unpickle). robench never calls it: it reads the files with
``weights_only=True`` and repeats the key renaming ``load_model`` does, in this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

import robench

MANIFEST = Path(__file__).with_name("manifest.json")
"""The hashes robench ships, for the models it names."""
DATASETS = {"cifar10": 10, "cifar100": 100}
"""RobustBench datasets robench evaluates on (RobustBench's name -> classes); not ImageNet."""
THREAT_MODELS = ("Linf", "L2", "corruptions")
SOFTMAX_ENSEMBLES = frozenset(
    {"Diffenderfer2021Winning_LRR_CARD_Deck", "Diffenderfer2021Winning_Binary_CARD_Deck", "Chen2020Adversarial"}
)
"""Ensembles whose robustbench 1.1.1 forward is: x -> (x - mu) / sigma -> mean of the
softmax of ``models[i]``. Other ensembles (Bai2023Improving_*, Bai2024MixedNUTS) combine
their parts in their own ways and are refused."""
CONSTANT_BUFFERS = frozenset({"mu", "sigma", "mean", "std", "normalize.mean", "normalize.std"})
"""Normalisation constants the constructors set and some released checkpoints lack (the
keys robustbench's ``_safe_load_state_dict`` tolerates as missing)."""
HEX = re.compile(r"[0-9a-f]{64}")
FILE_NAME = re.compile(r"(?P<name>.+?)\.pt(?:_m(?P<member>\d+)\.pt)?")


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (weights files are hundreds of MB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(path: Path) -> dict[str, dict[str, str | None]]:
    """``dataset/threat_model/name`` -> {file name: sha256 or None (not pinned)}."""
    try:
        models = json.loads(path.read_text())["models"]
        ok = all(
            isinstance(files, dict)
            and all(h is None or (isinstance(h, str) and HEX.fullmatch(h)) for h in files.values())
            for files in models.values()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise robench.ConfigError(f"cannot read the robustbench manifest {path}: {exc!r}") from exc
    if not ok:
        raise robench.ConfigError(f"robustbench manifest {path}: every sha256 must be 64 lowercase hex digits or null")
    return cast(dict[str, dict[str, str | None]], models)


def weight_files(name: str, count: int) -> list[str]:
    """RobustBench's file names: ``{name}.pt``, or ``{name}.pt_m{i}.pt`` per ensemble member."""
    return [f"{name}.pt"] if count == 1 else [f"{name}.pt_m{i}.pt" for i in range(count)]


def data_root() -> Path:
    """``$ROBENCH_DATA``, else ``~/.cache/robench/data`` (as for the CIFAR datasets)."""
    value = os.environ.get("ROBENCH_DATA", "")
    return Path(value).expanduser() if value else Path("~/.cache/robench/data").expanduser()


def read_weights(data: bytes, path: Path) -> dict[str, Any]:
    """A checkpoint's tensors from the file's bytes (the bytes that were hashed), with
    ``weights_only=True`` (robustbench itself unpickles freely)."""
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise robench.CacheError(
            f"{path} does not load as weights with torch.load(weights_only=True) (robench never unpickles "
            f"arbitrary objects): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(checkpoint, dict):
        raise robench.CacheError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    # robustbench's rm_substr_from_state_dict, quirk included: a key that contains the prefix
    # anywhere loses its first len(prefix) characters. Kept so that the released files load
    # into the same parameters as they do in RobustBench.
    return {(k[len(prefix) :] if prefix in k else k): v for k, v in state.items()}


def zoo_state_dict(checkpoint: Mapping[str, Any], name: str, member: bool) -> dict[str, Any]:
    """The state dict robustbench 1.1.1's ``load_model`` would pass to the architecture."""
    if not member and (name.startswith("Kireev2021Effectiveness") or name == "Andriushchenko2020Understanding"):
        checkpoint = checkpoint["last"]  # these files hold 'last' and 'best'; RobustBench takes 'last'
    state = checkpoint.get("state_dict", checkpoint)
    state = _strip(state, "module.")
    return state if member else _strip(state, "model.")


def load_into(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> list[str]:
    """Load ``state`` into ``model``; return the checkpoint keys the model has no place for.

    Stricter than robustbench's ``_safe_load_state_dict``, which falls back to
    ``strict=False`` (any key may then be missing) for a list of models: here only the
    normalisation constants the constructor sets may be missing. Extra keys (edge-popup
    ``scores`` in the Binary CARDs) do not change the model and are reported.
    """
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise robench.CacheError(f"{path} does not fit RobustBench's architecture: {exc}") from exc
    missing = [k for k in result.missing_keys if k not in CONSTANT_BUFFERS]
    if missing:
        raise robench.CacheError(
            f"{path} does not fit RobustBench's architecture: it lacks {len(missing)} of its tensors "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
        )
    return list(result.unexpected_keys)


class LogMeanSoftmax(nn.Module):
    """A softmax-averaging RobustBench ensemble, returning log(mean softmax) instead of the mean.

    ``log(1/K sum_i softmax(f_i(z)))`` computed as ``logsumexp_i log_softmax(f_i(z)) - log K``:
    exactly the log of RobustBench's average, without the ``log(0) = -inf`` that float32
    probabilities reach. ``deck`` is robustbench's own module (its ``mu``, ``sigma`` and
    ``models``), so its state dict, and the cache's copy, hold RobustBench's keys under ``deck.``.
    """

    def __init__(self, deck: nn.Module) -> None:
        super().__init__()
        self.deck = deck

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities of the ensemble."""
        mu, sigma = cast(Tensor, self.deck.mu), cast(Tensor, self.deck.sigma)
        members = cast(nn.ModuleList, self.deck.models)
        z = (x - mu) / sigma
        log_p = torch.stack([member(z).log_softmax(dim=1) for member in members])
        return torch.logsumexp(log_p, dim=0) - math.log(len(members))


SHA_BUFFER = "robench_weights_sha256"
"""A buffer of the presented model: the sha256 of each weights file it was loaded from, so
that a copy from robench's model cache still says which files its weights came from."""


def with_hashes(model: nn.Module, hashes: list[str] | int) -> nn.Module:
    """``model`` with its :data:`SHA_BUFFER` (zeros for ``count`` files when given a count: a
    skeleton the cache loads into)."""
    if isinstance(hashes, int):
        data = torch.zeros(hashes, 32, dtype=torch.uint8)
    else:
        data = torch.tensor([list(bytes.fromhex(h)) for h in hashes], dtype=torch.uint8)
    model.register_buffer(SHA_BUFFER, data)
    return model


def hashes_of(model: nn.Module) -> list[str]:
    """The sha256 of each file ``model`` was loaded from (its :data:`SHA_BUFFER`)."""
    data = cast(Tensor, getattr(model, SHA_BUFFER))
    return [bytes(row.tolist()).hex() for row in data]
