"""Telling a model file's format from its content, and reading the state-dict formats safely.

A ``torch.save`` file is only ever read with ``torch.load(weights_only=True)``: any other
pickle could run code from the file. TorchScript and torch.export archives are whole models,
loaded in ``archives.py``.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import TypeGuard

import torch
from torch import Tensor

from robench.plugins.checkpoint.messages import config_error, first_line, listing

NESTED_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys of a checkpoint dict under which a state dict is looked for, in this order."""
SAVE_INSTEAD = (
    "save the weights with torch.save(model.state_dict(), path), or the whole model with "
    "torch.jit.save(torch.jit.trace(model.eval(), x), path) or torch.export.save(torch.export.export("
    "model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), path)"
)


def detect_format(data: bytes, file: Path) -> str:
    """``torchscript``, ``export``, ``torch.save`` or ``safetensors``, from the content."""
    if data[:4] == b"PK\x03\x04":  # a zip archive: torch.save, torch.jit.save and torch.export.save all write one
        try:
            members = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile as exc:
            raise config_error(f"{file} is a damaged zip archive: {exc}") from exc
        kind = _zip_kind(members)
        if kind is not None:
            return kind
        raise config_error(
            f"{file} is a zip archive but not one torch writes (members: {listing(members)}); {SAVE_INSTEAD}"
        )
    if data[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return "torch.save"
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if 2 <= header <= len(data) - 8 and data[8:9] == b"{":
        return "safetensors"
    raise config_error(f"{file} is not a model file robench reads (it starts with {data[:8]!r}); {SAVE_INSTEAD}")


def _zip_kind(members: list[str]) -> str | None:
    """``torchscript``, ``export`` or ``torch.save`` from a torch zip archive's member names."""
    inner = {m.split("/", 1)[1] for m in members if "/" in m}
    if "constants.pkl" in inner and any(m.startswith("code/") for m in inner):
        return "torchscript"
    if "archive_format" in inner:
        return "export"
    return "torch.save" if "data.pkl" in inner else None


def archive_kind(file: Path) -> str | None:
    """``torchscript`` or ``export`` if ``file`` is an archive holding a whole model, else None.
    Reads the zip directory only (cheap enough for planning); anything unreadable is left to
    :func:`detect_format`, which explains it when the model is loaded."""
    try:
        with zipfile.ZipFile(file) as archive:
            kind = _zip_kind(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return None
    return kind if kind in ("torchscript", "export") else None


def state_dict_of(data: bytes, kind: str, file: Path) -> dict[str, Tensor]:
    """The state dict a torch.save or safetensors file holds, without any arbitrary unpickle."""
    obj = load_safetensors(data, file) if kind == "safetensors" else load_weights(data, file)
    state = obj if _is_state_dict(obj) else None
    if state is None and isinstance(obj, dict):
        state = next((obj[k] for k in NESTED_KEYS if _is_state_dict(obj.get(k))), None)
    if state is None:
        what = f"a dict with keys {listing(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__
        raise config_error(
            f"{file} holds {what}, not a state dict: robench takes a dict of tensors, or a checkpoint dict "
            f"with one under {', '.join(map(repr, NESTED_KEYS))}; {SAVE_INSTEAD}"
        )
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(data: bytes, file: Path) -> object:
    """``torch.load(weights_only=True)``: tensors and plain containers only."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None and "Weights only load failed" not in str(exc):
            raise config_error(f"{file} could not be read by torch.load (damaged?): {first_line(exc)}") from exc
        raise config_error(
            f"{file} is a pickle of Python objects, not only weights{f' (it holds a {found[1]})' if found else ''}. "
            "robench loads only with torch.load(weights_only=True), never an arbitrary unpickle, which could run "
            f"code from the file; {SAVE_INSTEAD}"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError and others on damaged files
        raise config_error(f"{file} could not be read by torch.load (damaged?): {first_line(exc)}") from exc


def load_safetensors(data: bytes, file: Path) -> object:
    """A safetensors file's tensors (with the optional ``safetensors`` package)."""
    try:
        from safetensors.torch import load
    except ImportError as exc:
        raise config_error(f"{file} is a safetensors file: pip install safetensors to load it") from exc
    try:
        return load(data)
    except Exception as exc:
        raise config_error(f"{file} could not be read as safetensors: {first_line(exc)}") from exc


def _is_state_dict(obj: object) -> TypeGuard[dict[str, Tensor]]:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )
