"""On-disk cache of built models, keyed by a content hash of everything that determines them.

``<root>/models/<hash>/`` holds one state dict per variant (loaded with
``weights_only=True``, never an arbitrary unpickle) and ``meta.json`` with the key, the
sha256 of every weight file and the build time. A folder is renamed into place only once
complete, so an interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from robench.architecture import Architecture, make_model
from robench.cell import ModelKey
from robench.context import Context, DataShape, ImageData
from robench.defense import Defense
from robench.errors import CacheError
from robench.execute.locks import CacheLocks

FORMAT_VERSION = 1


def data_fingerprint(data: ImageData) -> str:
    """A cheap hash of a split: labels in full, every 97th image."""
    h = hashlib.sha256()
    h.update(data.labels.numpy().tobytes())
    h.update(data.images[::97].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ModelFactory:
    """Builds fresh models whose initialisation depends only on the seed and the call count,
    never on whatever else used the global generator before (``Context.new_model``)."""

    def __init__(self, arch: Architecture, shape: DataShape, seed: int) -> None:
        self.arch, self.shape, self.seed, self.calls = arch, shape, seed, 0

    def __call__(self) -> nn.Module:
        """The next fresh model."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.calls)
            self.calls += 1
            return make_model(self.arch, self.shape)


class ModelCache:
    """Builds each model key once; later calls load it from disk.

    With ``frozen`` (a ``models/`` folder of another cache, e.g. one committed beside a
    baseline run), models are only ever loaded from there, never built: a model that is not
    there raises :class:`CacheError`. That evaluates exactly the stored models, whatever the
    CPU would have trained.
    """

    def __init__(self, root: Path, frozen: Path | None = None) -> None:
        self.root = Path(root)
        self.frozen = None if frozen is None else Path(frozen)
        self.locks = CacheLocks(self.root)

    def folder(self, key: ModelKey, fingerprint: str) -> Path:
        """Where the models of ``key`` trained on data ``fingerprint`` live."""
        digest = hashlib.sha256(f"{key.digest()}:{fingerprint}:{FORMAT_VERSION}".encode()).hexdigest()[:16]
        return (self.frozen if self.frozen is not None else self.root / "models") / digest

    def require(self, key: ModelKey, fingerprint: str) -> None:
        """With ``frozen``: raise :class:`CacheError` unless ``key``'s models are stored there."""
        folder = self.folder(key, fingerprint)
        if self.frozen is not None and not (folder / "meta.json").is_file():
            raise CacheError(
                f"model {key.dataset}/{key.arch}/{key.defense_label}/seed={key.seed} is not in {self.frozen} "
                f"(looked for {folder.name}/); the stored models were built for another grid or another "
                "robench: regenerate them (README, 'Regression checks'), or run without --models to build it"
            )

    def get(
        self, key: ModelKey, defense: Defense, context: Callable[[], Context], fingerprint: str
    ) -> tuple[dict[str, nn.Module], float, str]:
        """(variant -> model, build seconds (0 if loaded), cache folder name).

        ``context`` makes a fresh build context: loading and building each get their own,
        so a failed load (which made skeletons) leaves no trace in the build.
        """
        folder = self.folder(key, fingerprint)
        cached = self._cached(folder, defense, context)
        if cached is not None:
            return cached, 0.0, folder.name
        self.require(key, fingerprint)
        log = context().progress.log
        what = f"model {key.dataset}/{key.arch}/{key.defense_label}/seed={key.seed}"
        with self.locks.hold(folder.name, what, log):  # another task may be building it: wait, then load
            cached = self._cached(folder, defense, context)
            if cached is not None:
                return cached, 0.0, folder.name
            return self._build(folder, key, defense, context(), fingerprint)

    def _cached(self, folder: Path, defense: Defense, context: Callable[[], Context]) -> dict[str, nn.Module] | None:
        """The stored models of ``folder``, or None (a corrupt folder is removed)."""
        if not (folder / "meta.json").exists():
            return None
        ctx = context()
        models = self._load(folder, defense, ctx)
        if models is not None:
            return models
        if self.frozen is not None:
            raise CacheError(f"stored model {folder} does not load (damaged, or saved by other code)")
        ctx.progress.log(f"model cache {folder} is corrupt; rebuilding it")
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def _build(
        self, folder: Path, key: ModelKey, defense: Defense, ctx: Context, fingerprint: str
    ) -> tuple[dict[str, nn.Module], float, str]:
        start = time.perf_counter()
        work = ctx.cache_dir
        work.mkdir(parents=True, exist_ok=True)
        with seeded_global_rng(key):
            models = defense.fit(ctx)
        seconds = time.perf_counter() - start
        self._save(folder, key, fingerprint, models, seconds)
        shutil.rmtree(work, ignore_errors=True)  # the build's scratch space; the models are saved
        return models, seconds, folder.name

    def _load(self, folder: Path, defense: Defense, ctx: Context) -> dict[str, nn.Module] | None:
        meta = json.loads((folder / "meta.json").read_text())
        skeletons = defense.skeletons(ctx)
        if set(skeletons) != set(meta["files"]):
            return None
        for name, model in skeletons.items():
            path = folder / f"{name}.pt"
            if not path.exists() or _sha256(path) != meta["files"][name]:
                return None
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            model.eval()
        return skeletons

    def _save(
        self, folder: Path, key: ModelKey, fingerprint: str, models: dict[str, nn.Module], seconds: float
    ) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            files = {}
            for name, model in models.items():
                path = tmp / f"{name}.pt"
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
                files[name] = _sha256(path)
            meta = {
                "key": asdict(key),
                "data": fingerprint,
                "files": files,
                "build_seconds": seconds,
                "format": FORMAT_VERSION,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if folder.exists():  # another writer finished first; theirs is as good
                return
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def seeded_global_rng(key: ModelKey) -> Iterator[None]:
    """Run a build with torch's global generator seeded from ``key`` and restored afterwards.

    Defenses draw from explicit generators (``Context.generator``), but library code
    (torchattacks' random starts, dropout, ``nn.init``) draws from the global one. Seeding
    it from the key makes such draws a function of the key, whatever ran before in the
    process (another build, an attack, a failed cache load); restoring it keeps a build
    from shifting the draws of whatever runs after it. A nested build (a defense that
    starts from another defense's model) forks again, so its being cached or not does not
    change the outer build either.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(key.digest(), 16) % 2**63)
        yield


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
