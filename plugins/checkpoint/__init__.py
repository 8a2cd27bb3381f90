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

The modules: ``formats.py`` tells the format from the content and reads state dicts,
``archives.py`` loads TorchScript and torch.export archives (with the torch.export
allow-list), ``fitting.py`` fits a state dict to ``--arch`` and explains a mismatch, and
``messages.py`` words the errors.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from torch import Tensor, nn

import robench
from robench.plugins.checkpoint.archives import load_exported, load_torchscript, probe
from robench.plugins.checkpoint.fitting import arch_hint, classes_hint, mismatches, split_model
from robench.plugins.checkpoint.formats import archive_kind, detect_format, state_dict_of
from robench.plugins.checkpoint.messages import config_error, dataset_name


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

    def network(self, arch: str) -> str:
        """``--arch`` for a state dict (it is loaded into that architecture); for an archive,
        which holds its own network, where it came from: ``torchscript:FILE`` or ``torch.export:FILE``."""
        kind = archive_kind(locate(self.path))
        if kind is None:
            return arch
        return f"{'torch.export' if kind == 'export' else kind}:{Path(self.path).name}"

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


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """checkpoint."""
    return [Checkpoint]
