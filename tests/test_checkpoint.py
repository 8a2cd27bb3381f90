"""The ``checkpoint`` defense: a model loaded from a local file (state dict, TorchScript, torch.export)."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pluggy
import pytest
import torch
from torch import nn

import robench
from robench.architecture import Normalize
from robench.discover.manager import get_plugin_manager
from robench.execute.runner import Summary, run
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.plugins import checkpoint
from robench.plugins.checkpoint import Checkpoint
from robench.results.storage import RunStore
from robench.testing import CONFORMANCE_SHAPE, TINY_SHAPE, TinyPlugin, check_defense, tiny_context, tiny_model

X = tiny_context(Path("/nonexistent")).train.batch(torch.arange(32))[0]


def save_state_dict(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def save_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model.eval(), X[:2]), str(path))
    return path


def save_export(model: nn.Module, path: Path, dynamic: bool = True) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (X[:3],), dynamic_shapes=shapes), str(path))
    return path


def save_nested(model: nn.Module, path: Path) -> Path:
    torch.save({"epoch": 7, "model_state_dict": model.state_dict(), "optimizer": {"lr": 0.1}}, path)
    return path


def save_dataparallel(model: nn.Module, path: Path) -> Path:
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def save_legacy(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def save_safetensors(model: nn.Module, path: Path) -> Path:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


SAVERS: dict[str, Callable[[nn.Module, Path], Path]] = {
    "state_dict": save_state_dict,
    "nested": save_nested,
    "dataparallel": save_dataparallel,
    "legacy": save_legacy,
    "safetensors": save_safetensors,
    "torchscript": save_torchscript,
    "export": save_export,
}
FILE_FORMATS = ("state_dict", "torchscript", "export")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(path: Path, ctx: robench.Context | None = None, **params: Any) -> nn.Module:
    defense = Checkpoint.create({"path": str(path), **params})
    return defense.fit(ctx or tiny_context(path.parent))["model"]


def config_error(path: Path, ctx: robench.Context | None = None, **params: Any) -> str:
    with pytest.raises(robench.ConfigError) as info:
        load(path, ctx, **params)
    return str(info.value)


# -- Formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", SAVERS)
def test_each_format_round_trips(fmt: str, tmp_path: Path) -> None:
    original = tiny_model(seed=3)
    path = SAVERS[fmt](original, tmp_path / f"net.{fmt}")
    loaded = load(path)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), original(X), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(X[:1]), original(X[:1]), rtol=0, atol=1e-6)  # any batch size


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_gradients_reach_the_input(fmt: str, tmp_path: Path) -> None:
    original = tiny_model(seed=3)
    loaded = load(SAVERS[fmt](original, tmp_path / "net"))
    grads = []
    for model in (original, loaded):
        x = X.clone().requires_grad_()
        nn.functional.cross_entropy(model(x), torch.arange(32) % 4).backward()
        assert x.grad is not None
        grads.append(x.grad)
    assert float(grads[1].abs().sum()) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_conforms_like_every_defense(fmt: str, tmp_path: Path) -> None:
    """check_defense (fit, skeletons, model checks) on each format; the registry's own
    conformance test (test_builtins) gives it a state dict."""
    path = SAVERS[fmt](tiny_model(seed=3), tmp_path / "net")
    checks = check_defense(Checkpoint, {"path": str(path)})
    assert set(checks) == {"model"}


def test_the_format_is_told_by_content_not_by_name(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    files = {
        "torchscript": save_torchscript(model, tmp_path / "a.pt2"),
        "export": save_export(model, tmp_path / "b.pt"),
        "torch.save": save_state_dict(model, tmp_path / "c.ts"),
    }
    for kind, path in files.items():
        assert checkpoint.detect_format(path.read_bytes(), path) == kind
        torch.testing.assert_close(load(path)(X), model(X))


def test_a_bare_network_with_the_dataset_normalisation_or_none(tmp_path: Path) -> None:
    full = tiny_model(seed=3)
    bare = save_state_dict(full[1], tmp_path / "bare.pt")
    with torch.no_grad():
        torch.testing.assert_close(load(bare, normalization="dataset")(X), full(X))
        torch.testing.assert_close(load(bare, normalization="none")(X), full[1](X))  # [0, 1] in, as trained
        archive = save_torchscript(full[1], tmp_path / "bare.ts")
        torch.testing.assert_close(load(archive, normalization="dataset")(X), full(X))
        torch.testing.assert_close(load(archive, normalization="none")(X), full[1](X))


# -- Through the runner ------------------------------------------------------------------


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = get_plugin_manager()
    manager.register(TinyPlugin(), name="tiny")
    return manager


def run_checkpoint(pm: pluggy.PluginManager, tmp: Path, path: Path, name: str = "run", **params: Any) -> Summary:
    benchmark = Benchmark(
        name="ckpt",
        datasets=("tiny",),
        archs=("tinynet",),
        defenses=(PluginSpec.of("checkpoint", {"path": str(path), **params}),),
        attacks=(PluginSpec.of("pgd", {"steps": 3}),),
        eps=(0.1,),
        n_samples=32,
        batch_size=16,
    )
    return run(benchmark, pm=pm, run_dir=tmp / name, cache_dir=tmp / "cache", device="cpu")


def rows(summary: Summary) -> pd.DataFrame:
    return RunStore(summary.run_dir).read_cells()


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_runner_evaluates_the_file_and_records_its_sha256(fmt: str, pm: pluggy.PluginManager, tmp_path: Path) -> None:
    path = SAVERS[fmt](tiny_model(seed=3), tmp_path / "net")
    summary = run_checkpoint(pm, tmp_path, path)
    row = rows(summary).iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["checks"] == "ok"
    assert row["weights_sha256"] == sha256(path)
    assert json.loads(row["defense_params"])["sha256"] == sha256(path)
    assert row["clean_acc"] >= row["robust_acc"]
    # the network evaluated: --arch for a state dict; the archive's own, named by format and file, for an archive
    network = {
        "state_dict": "tinynet",
        "torchscript": f"torchscript:{path.name}",
        "export": f"torch.export:{path.name}",
    }
    assert row["arch"] == network[fmt] and row["cell_id"].startswith(f"tiny/{network[fmt]}/checkpoint[")


def test_an_overwritten_file_is_a_new_model_never_the_cached_copy(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    save_state_dict(tiny_model(seed=3), path)
    first = rows(run_checkpoint(pm, tmp_path, path)).iloc[0]
    save_state_dict(tiny_model(seed=4), path)  # same path, same size, other weights
    second_summary = run_checkpoint(pm, tmp_path, path)
    second = rows(second_summary)
    assert second_summary.skipped == 0 and len(second) == 2  # a new cell, beside the old one
    new = second[second["weights_sha256"] == sha256(path)].iloc[0]
    assert new["model_hash"] != first["model_hash"] and new["status"] == "ok"
    assert run_checkpoint(pm, tmp_path, path).skipped == 1  # unchanged file: the cell is finished
    fresh = rows(run_checkpoint(pm, tmp_path, path, "fresh")).iloc[0]  # another run folder: the model is cached
    assert fresh["build_seconds"] == 0.0 and fresh["model_hash"] == new["model_hash"]
    assert fresh["weights_sha256"] == sha256(path) and fresh["clean_acc"] == new["clean_acc"]


def test_a_file_changed_after_planning_is_refused_not_cached(tmp_path: Path) -> None:
    path = save_state_dict(tiny_model(seed=3), tmp_path / "net.pt")
    defense = Checkpoint.create({"path": str(path)})  # planned
    save_state_dict(tiny_model(seed=4), path)
    with pytest.raises(robench.ConfigError, match="changed since the benchmark was planned"):
        defense.fit(tiny_context(tmp_path))


def test_the_hash_is_computed_once_per_file_version(tmp_path: Path) -> None:
    path = save_state_dict(tiny_model(seed=3), tmp_path / "net.pt")
    checkpoint._sha256.cache_clear()
    for _ in range(3):
        Checkpoint.create({"path": str(path)})
    assert checkpoint._sha256.cache_info().misses == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    Checkpoint.create({"path": str(path)})
    assert checkpoint._sha256.cache_info().misses == 2


def test_a_missing_file_fails_at_planning_before_any_compute(pm: pluggy.PluginManager, tmp_path: Path) -> None:
    with pytest.raises(robench.ConfigError, match=re.escape(f"no model file at {tmp_path / 'missing.pt'}")):
        run_checkpoint(pm, tmp_path, tmp_path / "missing.pt")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_the_command_line_names_the_absolute_path(
    shell: Callable[[list[str]], tuple[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = shell(["plan", "--defense", "checkpoint", "-D", "path=models/mynet.pt", "--attack", "pgd"])
    assert code != 0
    assert f"no model file at {tmp_path / 'models' / 'mynet.pt'}" in out
    assert f"relative to the working directory {tmp_path}" in out


# -- Errors ------------------------------------------------------------------------------


def test_parameter_errors(tmp_path: Path) -> None:
    path = save_state_dict(tiny_model(seed=3), tmp_path / "net.pt")
    with pytest.raises(robench.ConfigError, match="needs the model file: -D path="):
        Checkpoint.create({})
    with pytest.raises(robench.ConfigError, match=re.escape(f"{tmp_path} is not a file")):
        Checkpoint.create({"path": str(tmp_path)})
    with pytest.raises(robench.ConfigError, match="64 hexadecimal digits"):
        Checkpoint.create({"path": str(path), "sha256": "abc"})
    with pytest.raises(robench.ConfigError, match=f"has sha256 {sha256(path)}, not the sha256=0+ given"):
        Checkpoint.create({"path": str(path), "sha256": "0" * 64})
    assert Checkpoint.create({"path": str(path), "sha256": sha256(path).upper()}).sha256 == sha256(path)
    with pytest.raises(robench.ConfigError, match="must be one of"):
        Checkpoint.create({"path": str(path), "normalization": "yes"})


class _Payload:
    """Unpickling this creates a file: proof that nothing ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.marker), "w"))


def test_pickles_of_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(tiny_model(), whole)
    message = config_error(whole)
    assert (
        "is a pickle of Python objects, not only weights (it holds a torch.nn.modules.container.Sequential)" in message
    )
    assert "torch.save(model.state_dict(), path)" in message and "torch.jit.save" in message
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"weights": _Payload(marker)}, evil)
    assert "never an arbitrary unpickle" in config_error(evil)
    assert not marker.exists()


def test_files_that_hold_no_state_dict(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    assert "holds a dict with keys epoch, lr, not a state dict" in config_error(tmp_path / "meta.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holds Tensor, not a state dict" in config_error(tmp_path / "tensor.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a model at all")
    assert "is not a model file robench reads" in config_error(tmp_path / "junk.bin")
    good = save_state_dict(tiny_model(), tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    assert "damaged" in config_error(tmp_path / "cut.pt")


def test_a_bare_state_dict_suggests_the_normalization_setting(tmp_path: Path) -> None:
    bare = save_state_dict(tiny_model()[1], tmp_path / "bare.pt")
    message = config_error(bare)
    assert "6 missing key(s): 0.mean, 0.std, 1.0.weight, 1.0.bias, 1.4.weight, ...;" in message
    assert "4 unexpected key(s): 0.weight, 0.bias, 4.weight, 4.bias." in message
    assert "bare network's state dict" in message and "-D normalization=dataset" in message
    full = save_state_dict(tiny_model(), tmp_path / "full.pt")
    assert "use -D normalization=included (the default)" in config_error(full, normalization="dataset")


def test_another_architecture_lists_mismatches_and_names_the_file_s_arch(tmp_path: Path) -> None:
    path = save_state_dict(tiny_model(), tmp_path / "tiny.pt")

    def other_arch() -> nn.Module:
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 144, 4))
        return nn.Sequential(Normalize(TINY_SHAPE.mean, TINY_SHAPE.std), net)

    ctx = dataclasses.replace(tiny_context(tmp_path), new_model=other_arch, dataset="tiny")
    message = config_error(path, ctx)
    assert "does not fit the cell's architecture (--arch) on dataset 'tiny'" in message
    assert "1.0.weight (file [8, 1, 3, 3], model [16, 1, 3, 3])" in message
    assert "missing key(s): 1.3.weight, 1.3.bias" in message
    assert "The file fits --arch tinynet." in message


def test_another_class_count_is_named(tmp_path: Path) -> None:
    ten = dataclasses.replace(TINY_SHAPE, num_classes=10)
    ctx = dataclasses.replace(tiny_context(tmp_path), dataset="tiny")
    message = config_error(save_state_dict(tiny_model(ten), tmp_path / "ten.pt"), ctx)
    assert "1.4.weight (file [10, 128], model [4, 128])" in message
    assert "classifier has 10 outputs, but dataset 'tiny' has 4 classes" in message
    assert "The file has the layers of --arch tinynet" in message
    archive = save_torchscript(tiny_model(ten), tmp_path / "ten.ts")
    assert "returns 10 outputs per image, but dataset 'tiny' has 4 classes" in config_error(archive, ctx)


def test_an_archive_for_other_images_fails_on_load(tmp_path: Path) -> None:
    ctx = tiny_context(tmp_path, shape=CONFORMANCE_SHAPE)  # 16x16 images; the archive was made for 12x12
    message = config_error(save_torchscript(tiny_model(), tmp_path / "net.ts"), ctx)
    assert "the model fails on a batch of 1 image(s) of the cell's dataset (1x16x16;" in message


def test_an_export_with_a_fixed_batch_size_is_refused(tmp_path: Path) -> None:
    path = save_export(tiny_model(), tmp_path / "static.pt2", dynamic=False)
    assert "exported with a fixed batch size of 3" in config_error(path)
    assert "torch.export.Dim('batch')" in config_error(path)


def dropout_model() -> nn.Module:
    model = tiny_model()
    return nn.Sequential(model[0], nn.Sequential(*model[1][:4], nn.Dropout(0.5), model[1][4]))


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_an_archive_made_in_training_mode_is_refused(fmt: str, tmp_path: Path) -> None:
    model = dropout_model()
    path = tmp_path / "train"
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model.train(), X[:2], check_trace=False), str(path))
    else:
        torch.export.save(
            torch.export.export(model.train(), (X[:3],), dynamic_shapes=({0: torch.export.Dim("b")},)), path
        )
    message = config_error(path)
    assert "was made in training mode: its graph runs aten::dropout with training=True" in message
    assert "call model.eval() before" in message
    assert load(SAVERS[fmt](dropout_model(), tmp_path / "eval"))  # in eval mode: fine


def rewrite_zip(
    source: Path, target: Path, change: Callable[[str, bytes], bytes | None], add: dict[str, bytes]
) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        prefix = old.namelist()[0].split("/", 1)[0]
        for name in old.namelist():
            data = change(name.split("/", 1)[1], old.read(name))
            if data is not None:
                new.writestr(name, data)
        for name, data in add.items():
            new.writestr(f"{prefix}/{name}", data)
    return target


def test_export_archives_that_torch_would_unpickle_freely_are_refused(tmp_path: Path) -> None:
    exported = save_export(tiny_model(), tmp_path / "net.pt2")
    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save((_Payload(marker),), payload)

    def keep(name: str, data: bytes) -> bytes:
        return data

    aoti = rewrite_zip(exported, tmp_path / "aoti.pt2", keep, {"data/aotinductor/model/model.so": b"\x7fELF"})
    assert "unexpected members: data/aotinductor/model/model.so" in config_error(aoti)

    def pickle_weights(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            config["config"]["1.0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    pickled = rewrite_zip(exported, tmp_path / "pickled.pt2", pickle_weights, {})
    assert "stores 1.0.weight as pickled objects" in config_error(pickled)

    def evil_inputs(name: str, data: bytes) -> bytes:
        return payload.getvalue() if name.startswith("data/sample_inputs/") else data

    def drop_program(name: str, data: bytes) -> bytes | None:
        return None if name.startswith("models/") else data

    no_program = rewrite_zip(exported, tmp_path / "none.pt2", drop_program, {})
    assert "is not a plain torch.export archive (no models/*.json)" in config_error(no_program)

    sample = rewrite_zip(exported, tmp_path / "sample.pt2", evil_inputs, {})
    assert "its sample inputs are not plain tensors" in config_error(sample)
    assert not marker.exists()


def test_an_unknown_zip_archive(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    assert "is a zip archive but not one torch writes (members: notes/readme.txt)" in config_error(path)
