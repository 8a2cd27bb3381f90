"""Loading TorchScript and torch.export archives safely, and checking the model they hold.

An archive is refused before it runs if it could run code from the file (torch.export
payloads outside an allow-list) or if it was traced or exported in training mode, which
``eval()`` cannot undo; once loaded, it is probed on blank batches for the dataset's logits.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

import robench
from robench.plugins.checkpoint.messages import config_error, dataset_name, first_line, listing

# Operators whose "training" argument, when a trace or export baked it in as True, keeps the
# model in training behaviour whatever eval() says (batch statistics, random dropout): index.
TRAINING_ARGUMENT = {
    "aten::batch_norm": 5,
    "aten::instance_norm": 5,
    "aten::dropout": 2,
    "aten::feature_dropout": 2,
    "aten::alpha_dropout": 2,
    "aten::feature_alpha_dropout": 2,
}
# Below its top folder, what torch 2.14.1's torch.export.save writes for a plain model.
# Anything else (AOTInductor libraries, pickled or custom objects, the pre-2.8 format) could
# make torch.export.load run code from the file: an allow-list, so new payloads are refused.
PT2_MEMBER = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/[^/]+\.json"
    r"|data/weights/([^/]+_weights_config\.json|weight_\d+)|data/constants/([^/]+_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/[^/]+\.pt|extra/[^/]+"
)


def load_torchscript(data: bytes, file: Path) -> nn.Module:
    """A TorchScript archive, refused if traced in training mode."""
    try:
        with warnings.catch_warnings():  # deprecated in favour of torch.export, but still a format people have
            warnings.simplefilter("ignore", FutureWarning)
            module = cast(torch.jit.ScriptModule, torch.jit.load(io.BytesIO(data), map_location="cpu"))  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise config_error(f"{file}: the TorchScript archive does not load: {first_line(exc)}") from exc
    constants = (
        (node.kind(), [v.toIValue() if v.node().kind() == "prim::Constant" else None for v in node.inputs()])
        for node in module.inlined_graph.nodes()
    )
    refuse_training_graph(constants, file, "torch.jit.trace")
    return Archive(module, fixed_mode=False)


def load_exported(data: bytes, file: Path) -> nn.Module:
    """A torch.export archive, once checked to hold nothing torch would unpickle freely."""
    check_pt2(data, file)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise config_error(f"{file}: the torch.export archive does not load: {first_line(exc)}") from exc
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise config_error(
            f"{file}: the exported model takes {len(inputs)} inputs; robench models take one image batch"
        )
    value = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0]).meta.get("val")
    if value is not None and isinstance(value.shape[0], int):
        raise config_error(
            f"{file} was exported with a fixed batch size of {value.shape[0]}; robench evaluates batches of "
            "any size, down to 1: export with dynamic_shapes=({0: torch.export.Dim('batch')},)"
        )
    calls = (
        (str(n.target).rsplit(".", 1)[0].replace(".", "::", 1), list(n.args))
        for n in program.graph.nodes
        if n.op == "call_function"
    )
    refuse_training_graph(calls, file, "torch.export.export")
    return Archive(program.module(), fixed_mode=True)


def check_pt2(data: bytes, file: Path) -> None:
    """Refuse a torch.export archive holding anything but JSON, raw tensors and safe sample inputs."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    members = {m.split("/", 1)[1]: m for m in archive.namelist() if "/" in m}
    odd = sorted(m for m in members if not PT2_MEMBER.fullmatch(m))
    if odd or not any(m.startswith("models/") for m in members):
        what = f"unexpected members: {listing(odd)}" if odd else "no models/*.json"
        raise config_error(
            f"{file} is not a plain torch.export archive ({what}); robench loads exported programs with raw "
            "tensor weights only (no AOTInductor package, no pickled or custom objects): re-save it with "
            "torch.export.save"
        )
    for inner, member in members.items():
        if inner.endswith("_config.json"):
            config = json.loads(archive.read(member)).get("config", {})
            pickled = sorted(k for k, v in config.items() if v.get("use_pickle") or not _raw(v.get("path_name")))
            if pickled:
                raise config_error(
                    f"{file} stores {listing(pickled)} as pickled objects, which torch.export.load unpickles "
                    "without restriction; robench does not load it: export a model with plain tensor weights"
                )
        elif inner.startswith("data/sample_inputs/"):
            try:  # torch.export.load would retry these with an unrestricted unpickle
                torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
            except Exception as exc:
                raise config_error(f"{file}: its sample inputs are not plain tensors ({first_line(exc)})") from exc


def _raw(path_name: object) -> bool:
    return isinstance(path_name, str) and re.fullmatch(r"(weight|tensor)_\d+", path_name) is not None


def refuse_training_graph(calls: Iterable[tuple[str, Sequence[object]]], file: Path, how: str) -> None:
    """Refuse a graph whose (operator, arguments) calls have a baked-in ``training=True``."""
    baked = sorted(
        {
            op
            for op, args in calls
            if op in TRAINING_ARGUMENT and len(args) > TRAINING_ARGUMENT[op] and args[TRAINING_ARGUMENT[op]] is True
        }
    )
    if baked:
        raise config_error(
            f"{file} was made in training mode: its graph runs {', '.join(baked)} with training=True, which "
            f"eval() cannot undo (batch statistics, random dropout); call model.eval() before {how}"
        )


class Archive(nn.Module):
    """A TorchScript or exported module in a plain ``nn.Module``, as robench runs models.

    robench hooks the models it attacks (``register_forward_pre_hook``, which ScriptModules
    refuse). An exported module refuses ``eval()``: its graph has the mode baked in, and
    graphs made in training mode are refused at load, so with ``fixed_mode``, ``train()``
    and ``eval()`` set the flags (which the model checks read) and nothing else.
    """

    def __init__(self, program: nn.Module, *, fixed_mode: bool) -> None:
        super().__init__()
        self.program, self.fixed_mode = program, fixed_mode

    def forward(self, x: Tensor) -> Tensor:
        """The archive's logits."""
        out: Tensor = self.program(x)
        return out

    def train(self, mode: bool = True) -> Archive:
        """Set the training mode (only the flags, for an exported module)."""
        if not self.fixed_mode:
            return super().train(mode)
        for module in self.modules():
            module.training = mode
        return self


def probe(model: nn.Module, ctx: robench.Context, file: Path) -> None:
    """Run an archive on blank batches of 1 and 2 of the dataset's images: it must return logits."""
    s = ctx.shape
    for n in (1, 2):
        try:
            with torch.no_grad():
                out = model(torch.zeros(n, s.channels, s.height, s.width))
        except Exception as exc:
            raise config_error(
                f"{file}: the model fails on a batch of {n} image(s) of {dataset_name(ctx)} "
                f"({s.channels}x{s.height}x{s.width}; robench runs batches of any size, down to 1): {first_line(exc)}"
            ) from exc
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
            got = f"shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise config_error(f"{file}: the model returns {got} for {n} image(s); expected ({n}, classes) logits")
        if out.shape[1] != s.num_classes:
            raise config_error(
                f"{file}: the model returns {out.shape[1]} outputs per image, but {dataset_name(ctx)} has "
                f"{s.num_classes} classes: a model for another dataset?"
            )
