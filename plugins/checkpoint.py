"""``checkpoint``: evaluate a model you already have, loaded from a local file.

    robench run --defense checkpoint -D path=/models/mynet.pt --attack pgd

The format is told from the content, never from the name:

* a **state dict**, read with ``torch.load(weights_only=True)`` and loaded into the cell's
  ``--arch`` (``ctx.new_model()``): a ``dict[str, Tensor]`` (``torch.save(model.state_dict(),
  path)``, zip or legacy format), or a checkpoint dict holding one under ``state_dict``,
  ``model_state_dict`` or ``model`` (other entries ignored); a ``module.`` prefix on every
  key (DataParallel) is dropped. A safetensors file too, if ``safetensors`` is installed.
* a **TorchScript** archive (``torch.jit.save``; members ``constants.pkl``, ``code/``), or
* a **torch.export** archive (``torch.export.save``; members ``archive_format`` = ``pt2``,
  ``models/*.json``), exported with a dynamic batch dimension. Either is the whole model, and
  must have been traced or exported in eval mode. ``torch.export.load`` unpickles some
  payloads without restriction, so the archive is first checked to hold only JSON, raw
  tensors and sample inputs that load with ``weights_only=True``.

Any other pickle (``torch.save(model)``, arbitrary objects) is refused, never unpickled.

``normalization``: robench's models are ``Sequential(Normalize(mean, std), network)`` (keys
``0.mean``, ``0.std``, ``1.*``), so a robench model's state dict is ``included`` (the
default). A bare network's is ``dataset`` (trained on inputs normalised with the dataset's
mean and std, which robench adds) or ``none`` (trained on [0, 1] images). For archives,
``included`` and ``none`` take the archive as it is; ``dataset`` puts the normalisation first.

The content hash is part of the model key (:meth:`Checkpoint.__post_init__`) and of every
row (``weights_sha256``). No presets: ``smoke`` and ``paper`` load the same file.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, TypeGuard, cast

import torch
from torch import Tensor, nn

import robench

Shape = tuple[int, ...]
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys of a checkpoint dict under which a state dict is looked for, in this order."""
SAVE_INSTEAD = (
    "save the weights with torch.save(model.state_dict(), path), or the whole model with "
    "torch.jit.save(torch.jit.trace(model.eval(), x), path) or torch.export.save(torch.export.export("
    "model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), path)"
)
SHOWN = 5
"""How many keys an error lists."""
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


@dataclass(frozen=True, kw_only=True)
class Checkpoint(robench.Defense):
    """Load a model from a local file: a state dict, a TorchScript or a torch.export archive.

    Args:
        path: the model file (``~`` expanded; relative to the working directory).
        normalization: what the file's network expects: ``included`` (a robench model's
            state dict, or an archive taking [0, 1] images), ``dataset`` (a bare network for
            inputs normalised with the dataset's mean and std, which robench adds) or
            ``none`` (a bare network for [0, 1] images).
        sha256: the file's expected sha256, checked; left empty, it is filled in with the
            file's hash (so that the model key follows the file's content).
    """

    name: ClassVar[str] = "checkpoint"
    presets: ClassVar[Mapping[str, Mapping[str, object]]] = {}
    path: str = ""
    normalization: Literal["included", "dataset", "none"] = "included"
    sha256: str = ""

    def __post_init__(self) -> None:
        """Check the file at planning, before any compute, and pin its content hash.

        The model cache keys what :meth:`fit` returns by :meth:`canonical`, the parameters:
        with ``path`` alone, a rerun would evaluate the cached copy of a file the user has
        since overwritten. So ``sha256`` always holds the content hash (given: checked;
        empty: filled in), and a new content is a new model key: a new build and new cells.
        The runner re-creates the defense from the planned parameters, so :meth:`fit` also
        refuses a file that changed after planning rather than caching it under the old key.
        The price: two contents of one path differ in ``defense_params``, so ``robench
        check`` does not pair their cells (they are different models).
        """
        file = locate(self.path)
        actual = file_sha256(file)
        expected = self.sha256.strip().lower()
        if expected and not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise config_error(f"sha256 must be 64 hexadecimal digits, got {self.sha256!r}")
        if expected and expected != actual:
            raise config_error(f"{file} has sha256 {actual}, not the sha256={expected} given: the file changed?")
        object.__setattr__(self, "sha256", actual)

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Load the model from the file, whose content must still have the planned hash."""
        file = locate(self.path)
        data = file.read_bytes()  # one read: the bytes hashed are the bytes loaded
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise config_error(f"{file} changed since the benchmark was planned; run again to evaluate the new file")
        kind = detect_format(data, file)
        ctx.progress.log(f"checkpoint: {file} ({kind}, sha256 {self.sha256[:12]})")
        if kind not in ("torchscript", "export"):
            return {"model": self.load_state(ctx, state_dict_of(data, kind, file), file).eval()}
        model = load_torchscript(data, file) if kind == "torchscript" else load_exported(data, file)
        if self.normalization == "dataset":
            model = nn.Sequential(split_model(ctx.new_model())[0], model)
        probe(model.eval(), ctx, file)
        return {"model": model}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """The file's model again: an archive holds code besides weights, and re-reading the
        file checks its hash, so a cached copy is only ever loaded into its own file."""
        return self.fit(ctx)

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """The loaded model, with the file's sha256 for the row."""
        return robench.Variant(name=name, model=model, weights_sha256=self.sha256)

    def load_state(self, ctx: robench.Context, state: dict[str, Tensor], file: Path) -> nn.Module:
        """``state`` loaded into the cell's architecture, as ``normalization`` says."""
        model = ctx.new_model()
        net = split_model(model)[1]
        target = model if self.normalization == "included" else net
        expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in state.items()}
        if expected != given:
            problems = mismatches(expected, given)
            hints = (
                self.normalization_hint(model, set(given)),
                classes_hint(ctx, expected, given),
                arch_hint(ctx, model, given),
            )
            raise config_error(
                f"the state dict in {file} does not fit the cell's architecture (--arch) on {dataset_name(ctx)} with "
                f"normalization={self.normalization!r}: {problems}. {' '.join(h for h in hints if h)}".strip()
            )
        target.load_state_dict(state)
        return net if self.normalization == "none" else model

    def normalization_hint(self, model: nn.Module, keys: set[str]) -> str:
        """The other ``normalization`` setting, when the keys say the file is of that kind."""
        (norm_name, norm), (_, net) = model.named_children()
        norm_keys = ", ".join(f"{norm_name}.{k}" for k in norm.state_dict())
        if self.normalization == "included" and keys == set(net.state_dict()):
            return (
                f"The file looks like a bare network's state dict (no {norm_keys}): use -D normalization=dataset "
                "if it was trained on inputs normalised with the dataset's mean and std, or -D normalization=none "
                "if on [0, 1] images."
            )
        if self.normalization != "included" and keys == set(model.state_dict()):
            return f"The file holds robench's normalisation ({norm_keys}): use -D normalization=included (the default)."
        return ""


def locate(path: str) -> Path:
    """The absolute path of the model file; a :class:`robench.ConfigError` if it is not one."""
    if not path:
        raise config_error('needs the model file: -D path=/models/mynet.pt (path = "..." in a benchmark file)')
    given = Path(path).expanduser()
    file = given.absolute()
    where = "" if given.is_absolute() else f" (path={path!r}, relative to the working directory {Path.cwd()})"
    if not file.exists():
        raise config_error(f"no model file at {file}{where}")
    if not file.is_file():
        raise config_error(f"{file} is not a file{where}")
    return file


def file_sha256(file: Path) -> str:
    """The file's sha256, computed once per process for each (path, mtime, size, inode)."""
    stat = file.stat()
    return _sha256(str(file.resolve()), stat.st_mtime_ns, stat.st_size, stat.st_ino)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, mtime_ns: int, size: int, inode: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def detect_format(data: bytes, file: Path) -> str:
    """``torchscript``, ``export``, ``torch.save`` or ``safetensors``, from the content."""
    if data[:4] == b"PK\x03\x04":  # a zip archive: torch.save, torch.jit.save and torch.export.save all write one
        try:
            members = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile as exc:
            raise config_error(f"{file} is a damaged zip archive: {exc}") from exc
        inner = {m.split("/", 1)[1] for m in members if "/" in m}
        if "constants.pkl" in inner and any(m.startswith("code/") for m in inner):
            return "torchscript"
        if "archive_format" in inner:
            return "export"
        if "data.pkl" in inner:
            return "torch.save"
        raise config_error(
            f"{file} is a zip archive but not one torch writes (members: {listing(members)}); {SAVE_INSTEAD}"
        )
    if data[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return "torch.save"
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if 2 <= header <= len(data) - 8 and data[8:9] == b"{":
        return "safetensors"
    raise config_error(f"{file} is not a model file robench reads (it starts with {data[:8]!r}); {SAVE_INSTEAD}")


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


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(normalisation, network) of ``ctx.new_model()``: ``Sequential(Normalize, network)``."""
    children = list(model.children())
    if len(children) != 2 or any(True for _ in children[0].parameters()):
        raise robench.RobenchError(
            f"defense 'checkpoint' expects ctx.new_model() to be (normalisation, network), got {type(model).__name__} "
            f"with {len(children)} children: robench's model layout changed"
        )
    return children[0], children[1]


def mismatches(expected: dict[str, Shape], given: dict[str, Shape]) -> str:
    """The missing and unexpected keys, and the shapes that differ."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} (file {list(given[k])}, model {list(v)})" for k, v in expected.items() if given.get(k, v) != v]
    named = (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes))
    return "; ".join(f"{len(keys)} {what}: {listing(keys)}" for what, keys in named if keys)


def classes_hint(ctx: robench.Context, expected: dict[str, Shape], given: dict[str, Shape]) -> str:
    """Name the class count when it is all that differs (the classifier's output rows)."""
    n = ctx.shape.num_classes
    differ = [k for k in expected if given.get(k) != expected[k]]
    if set(given) != set(expected) or not all(
        expected[k][:1] == (n,) and given[k][1:] == expected[k][1:] for k in differ
    ):
        return ""
    outputs = ", ".join(sorted({str(given[k][0]) for k in differ}))
    return (
        f"The file's classifier has {outputs} outputs, but {dataset_name(ctx)} has {n} classes: "
        "a model for another dataset?"
    )


def arch_hint(ctx: robench.Context, model: nn.Module, given: dict[str, Shape]) -> str:
    """The architectures whose network has the file's keys (and shapes, if any match)."""
    (norm_name, _), (net_name, _) = model.named_children()
    keys = given
    if all(k.startswith((f"{norm_name}.", f"{net_name}.")) for k in given):  # robench's layout: compare the network
        keys = {k.removeprefix(f"{net_name}."): v for k, v in given.items() if k.startswith(f"{net_name}.")}
    exact: list[str] = []
    layers: list[str] = []
    for cls in _architectures():
        try:
            with torch.random.fork_rng(devices=[]):
                built = {k: tuple(v.shape) for k, v in cls.create().build(ctx.shape).state_dict().items()}
        except Exception:  # a hint only: an architecture that does not build for this data is no candidate
            continue
        if built == keys:
            exact.append(cls.name)
        elif set(built) == set(keys):
            layers.append(cls.name)
    if exact:
        return f"The file fits --arch {' / --arch '.join(exact)}."
    if layers:
        return f"The file has the layers of --arch {' / --arch '.join(layers)} (other widths or class count)."
    return ""


def _architectures() -> list[type[robench.Architecture]]:
    """Every concrete architecture class imported in this process: the registered ones among them."""
    found: dict[str, type[robench.Architecture]] = {}
    todo = list(robench.Architecture.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and isinstance(getattr(cls, "name", None), str):
            found.setdefault(cls.name, cls)
    return [found[name] for name in sorted(found)]


def _is_state_dict(obj: object) -> TypeGuard[dict[str, Tensor]]:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def config_error(message: str) -> robench.ConfigError:
    """A :class:`robench.ConfigError` naming the defense."""
    return robench.ConfigError(f"defense 'checkpoint': {message}")


def dataset_name(ctx: robench.Context) -> str:
    """``dataset 'NAME'`` for messages."""
    return f"dataset {ctx.dataset!r}" if ctx.dataset else "the cell's dataset"


def listing(keys: list[str]) -> str:
    """The first few of ``keys``, for messages."""
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def first_line(exc: BaseException) -> str:
    """An exception's type and first line, for messages (the last for a TorchScript traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [""]
    text = lines[-1 if "TorchScript interpreter" in lines[0] else 0].strip()
    return text if re.match(r"\w+(Error|Exception): ", text) else f"{type(exc).__name__}: {text}"


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """checkpoint."""
    return [Checkpoint]
