"""RobustBench models in one command: downloads in the build, trust on first use, the published
numbers beside robench's, and ``robench zoo``. No network: gdown's ``download`` is replaced by
a fake Google Drive that writes release-format files (test_robustbench.py's ``release``)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gdown
import pandas as pd
import pluggy
import pytest
import requests
import torch
from conftest import Shell
from gdown.exceptions import FileURLRetrievalError
from test_robustbench import (  # noqa: F401  (narrow and _private_cache are fixtures)
    CIFAR10,
    DECK,
    LRR,
    _private_cache,
    context,
    narrow,
    release,
    seeded,
    write_manifest,
    zoo,
)
from torch import nn

import robench
from robench.discover.manager import get_plugin_manager
from robench.execute.runner import run
from robench.plugins.robustbench import RobustBenchModel, download
from robench.plugins.robustbench.facts import ModelFacts, leaderboard
from robench.plugins.robustbench.pins import Pins
from robench.results.report import write_report
from robench.results.storage import RunStore
from robench.testing import TinyPlugin


class Log(robench.Progress):
    """A progress reporter that keeps the lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


class FakeDrive:
    """``gdown.download`` as Google Drive answers it here: files by id, written as gdown writes
    them (a temporary file beside the output, moved into place); ``fail`` raises after leaving
    gdown's temporary file behind, as a cut transfer does; ``cut`` ends early but "succeeds"."""

    def __init__(self, files: dict[str, bytes], fail: Exception | None = None, cut: bool = False) -> None:
        self.files, self.fail, self.cut = files, fail, cut
        self.calls: list[str] = []

    def __call__(self, url: str | None = None, output: str | None = None, quiet: bool = False, **kw: Any) -> str:
        gdrive_id = kw["id"]
        self.calls.append(gdrive_id)
        data = self.files[gdrive_id]
        tmp = Path(f"{output}x7fq2tmp")  # gdown: tempfile.mktemp(prefix=basename(output), dir=dirname(output))
        if self.fail is not None:
            tmp.write_bytes(data[: len(data) // 3])
            raise self.fail
        tmp.write_bytes(data[: len(data) // 2] if self.cut else data)
        shutil.move(tmp, str(output))
        return str(output)


def zoo_ids(name: str, threat_model: str = "corruptions") -> list[str]:
    ids = zoo("cifar10", threat_model)[name]["gdrive_id"]
    return ids if isinstance(ids, list) else [ids]


def release_bytes(model: nn.Module, tmp: Path) -> bytes:
    path = tmp / "release.pt"
    release(model, path)
    return path.read_bytes()


@pytest.fixture
def tofu(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[nn.Module, dict[str, Any]]:
    """A width-8 LRR on the fake Drive; defense params with a manifest that pins nothing."""
    request.getfixturevalue("narrow")
    reference = seeded(zoo()[LRR]["model"], 0)
    params = {"model_name": LRR, "threat_model": "corruptions", "dataset": "cifar10"}
    params |= {"model_dir": str(tmp_path / "models"), "manifest": write_manifest(tmp_path / "m.json", {})}
    return reference, params


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_missing_model_is_downloaded_by_the_build_and_pinned_at_its_first_use(
    tofu: tuple[nn.Module, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, params = tofu
    (gid,) = zoo_ids(LRR)
    drive = FakeDrive({gid: release_bytes(reference, tmp_path)})
    monkeypatch.setattr(gdown, "download", drive)
    defense = RobustBenchModel.create(params)
    assert defense.sha256 == ""  # nothing pins it: not in the model key, trusted on first use
    log, cache = Log(), tmp_path / "cache"
    model = defense.fit(_with(context(cache=cache), log))["model"]
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), reference(x)) and drive.calls == [gid]
    folder = Path(params["model_dir"]) / "cifar10" / "corruptions"
    assert leftovers(folder) == [f"{LRR}.pt"]  # renamed into place; no temporary file left
    digest = hashlib.sha256((folder / f"{LRR}.pt").read_bytes()).hexdigest()
    pins = Pins(cache)
    assert pins.get(f"cifar10/corruptions/{LRR}.pt").sha256 == digest  # type: ignore[union-attr]
    assert f"robustbench: downloading {LRR}.pt (Google Drive id {gid}) into {folder}" in log.lines
    first_use = [line for line in log.lines if line.startswith("robustbench: first use of")]
    assert first_use == [
        f"robustbench: first use of {folder / f'{LRR}.pt'}: sha256 {digest} recorded in {pins.path}; a later run "
        "refuses the file if it changes (robench zoo pin writes a manifest to commit)"
    ]
    assert defense.variant("model", model).weights_sha256 == digest
    again = Log()
    defense.fit(_with(context(cache=cache), again))  # a matching file: no download, no new pin
    assert drive.calls == [gid] and not any("first use" in line for line in again.lines)


def _with(ctx: robench.Context, log: Log) -> robench.Context:
    from dataclasses import replace

    return replace(ctx, progress=log)


def test_trust_on_first_use_refuses_a_changed_file_with_both_hashes_unless_sha256_is_given(
    tofu: tuple[nn.Module, dict[str, Any]], tmp_path: Path
) -> None:
    reference, params = tofu
    path = Path(params["model_dir"]) / "cifar10" / "corruptions" / f"{LRR}.pt"
    first = release(reference, path)
    cache = tmp_path / "cache"
    RobustBenchModel.create(params).fit(context(cache=cache))  # first use: pinned
    changed = release(seeded(zoo()[LRR]["model"], 1), path)  # another file under the same name
    with pytest.raises(robench.CacheError) as info:
        RobustBenchModel.create(params).fit(context(cache=cache))
    message = str(info.value)
    assert message.startswith(f"robustbench weights file {path} changed since its first use: its sha256 is {changed}")
    assert f"but {first} was recorded at its first use" in message and str(Pins(cache).path) in message
    assert f"-D sha256={changed}" in message
    vouched = RobustBenchModel.create({**params, "sha256": changed})  # -D sha256 overrides the pin
    assert vouched.fit(context(cache=cache)) and Pins(cache).get(f"cifar10/corruptions/{LRR}.pt").sha256 == first  # type: ignore[union-attr]
    with pytest.raises(robench.CacheError, match=f"has the wrong sha256: expected {first}, found {changed}"):
        RobustBenchModel.create({**params, "sha256": first}).fit(context(cache=cache))


def test_a_manifest_pin_decides_and_no_first_use_is_recorded(
    tofu: tuple[nn.Module, dict[str, Any]], tmp_path: Path
) -> None:
    reference, params = tofu
    path = Path(params["model_dir"]) / "cifar10" / "corruptions" / f"{LRR}.pt"
    digest = release(reference, path)
    manifest = write_manifest(tmp_path / "pinned.json", {f"cifar10/corruptions/{LRR}": {f"{LRR}.pt": digest}})
    defense = RobustBenchModel.create({**params, "manifest": manifest})
    assert defense.sha256 == digest  # pinned: part of the model key
    defense.fit(context(cache=tmp_path / "cache"))
    assert Pins(tmp_path / "cache").all() == {}


@pytest.mark.usefixtures("narrow")
def test_an_ensemble_downloads_each_missing_member_by_its_own_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deck = seeded(zoo()[DECK]["model"], 2)
    ids = zoo_ids(DECK)
    folder = tmp_path / "models" / "cifar10" / "corruptions"
    for i in (0, 1):  # two members are there already
        release(deck.models[i], folder / f"{DECK}.pt_m{i}.pt")
    drive = FakeDrive({gid: release_bytes(m, tmp_path) for gid, m in zip(ids, deck.models, strict=True)})
    monkeypatch.setattr(gdown, "download", drive)
    params = {
        "model_name": DECK,
        "threat_model": "corruptions",
        "dataset": "cifar10",
        "model_dir": str(tmp_path / "models"),
    }
    defense = RobustBenchModel.create({**params, "manifest": write_manifest(tmp_path / "m.json", {})})
    model = defense.fit(context(cache=tmp_path / "cache"))["model"]
    assert drive.calls == ids[2:] and len(ids) == 6
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(x), torch.log(deck(x)), rtol=0, atol=1e-5)
    assert len(Pins(tmp_path / "cache").all()) == 6


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (
            FileURLRetrievalError("Too many users have viewed or downloaded this file recently."),
            "Google Drive refused it",
        ),
        (requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'"), "no connection to Google Drive"),
        (requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"), "the transfer failed"),
    ],
)
@pytest.mark.usefixtures("narrow")
def test_a_failed_download_is_one_error_naming_the_files_their_ids_and_the_folder(
    failure: Exception, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deck = seeded(zoo()[DECK]["model"], 3)
    ids = zoo_ids(DECK)
    folder = tmp_path / "models" / "cifar10" / "corruptions"
    for i in range(4):
        release(deck.models[i], folder / f"{DECK}.pt_m{i}.pt")
    monkeypatch.setattr(gdown, "download", FakeDrive({gid: b"x" * 300 for gid in ids}, fail=failure))
    params = {
        "model_name": DECK,
        "threat_model": "corruptions",
        "dataset": "cifar10",
        "model_dir": str(tmp_path / "models"),
    }
    defense = RobustBenchModel.create({**params, "manifest": write_manifest(tmp_path / "m.json", {})})
    with pytest.raises(robench.DataNotFoundError) as info:
        defense.fit(context(cache=tmp_path / "cache"))
    message = str(info.value)
    assert message.startswith(
        f"robustbench model cifar10/corruptions/{DECK}: 2 weights file(s) are not in {folder} and could not be "
        f"downloaded ({why}"
    )
    for i in (4, 5):  # the missing ones only, each with its id and where to put it
        url = f"https://drive.google.com/uc?id={ids[i]}"
        assert f"\n  {DECK}.pt_m{i}.pt: Google Drive id {ids[i]} ({url})\n" in message
    assert f"{DECK}.pt_m0.pt" not in message
    assert message.endswith(
        f"Put them in {folder}: on a machine with internet, `robench zoo fetch cifar10/corruptions/{DECK} --model-dir "
        f"DIR`, then copy DIR/cifar10/corruptions/ to {folder} (or download each id above in a browser), and run again."
    )
    assert leftovers(folder) == [f"{DECK}.pt_m{i}.pt" for i in range(4)]  # gdown's temporary file is gone


@pytest.mark.usefixtures("narrow")
def test_a_stalled_connection_fails_the_download_instead_of_hanging(
    tofu: tuple[nn.Module, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a server that accepts connections and never answers, as behind a firewall that drops replies;
    # the fake asks it as gdown asks Drive: requests without a timeout, which would wait forever
    _, params = tofu
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]

    def drive(id: str, output: str, quiet: bool) -> str:
        requests.get(f"http://127.0.0.1:{port}/uc?id={id}")
        raise AssertionError("the silent server answered")

    monkeypatch.setattr(gdown, "download", drive)
    monkeypatch.setattr(download, "STALL_SECONDS", 0.5)
    with silent, pytest.raises(robench.DataNotFoundError, match=r"Google Drive sent nothing for 0\.5 s"):
        RobustBenchModel.create(params).fit(context(cache=tmp_path / "cache"))
    assert leftovers(Path(params["model_dir"]) / "cifar10" / "corruptions") == []


def test_a_transfer_cut_short_or_a_web_page_is_refused_and_leaves_no_file(
    tofu: tuple[nn.Module, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, params = tofu
    (gid,) = zoo_ids(LRR)
    folder = Path(params["model_dir"]) / "cifar10" / "corruptions"
    monkeypatch.setattr(gdown, "download", FakeDrive({gid: release_bytes(reference, tmp_path)}, cut=True))
    with pytest.raises(robench.DataNotFoundError, match=r"\(the file is cut short or damaged \(\d+ bytes; torch.load"):
        RobustBenchModel.create(params).fit(context(cache=tmp_path / "cache"))
    assert leftovers(folder) == [] and Pins(tmp_path / "cache").all() == {}  # nothing to mistake for the file
    page = b"<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>"
    monkeypatch.setattr(gdown, "download", FakeDrive({gid: page}))
    with pytest.raises(robench.DataNotFoundError, match="Google Drive sent a web page"):
        RobustBenchModel.create(params).fit(context(cache=tmp_path / "cache"))
    assert leftovers(folder) == []


def test_the_shipped_facts_have_robustbench_zoo_ids_and_files_for_all_39_models() -> None:
    facts = leaderboard()
    assert len(facts) == 39
    for key, m in facts.items():
        ids = zoo(m.dataset, m.threat_model)[m.name]["gdrive_id"]
        assert list(m.gdrive_ids) == (ids if isinstance(ids, list) else [ids]), key
        assert m.clean_acc > 0 and m.robust_acc is not None, key
    carmon = facts["cifar10/Linf/Carmon2019Unlabeled"]
    assert (carmon.clean_acc, carmon.robust_acc, carmon.network) == (89.69, 59.53, "WideResNet-28-10")
    reference = carmon.reference()
    assert reference is not None and (reference.protocol, reference.norm, reference.sample_order) == (
        "robustbench",
        "linf",
        "first",
    )
    assert reference.eps == 8 / 255 and reference.robust_acc == 0.5953


# -- the published number beside robench's: flag_above_reference --------------------------


@dataclass(frozen=True, kw_only=True)
class Agreeing(robench.Dataset):
    """CIFAR-10-shaped random images labelled by ``labeller``: clean accuracy 100 % for that model."""

    name: ClassVar[str] = "cifar-agreeing"
    shape: ClassVar[robench.DataShape] = CIFAR10
    labeller: ClassVar[nn.Module | None] = None

    def locate(self) -> str:
        return "generated in memory"

    def load(self, split: robench.Split) -> robench.ImageData:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
        assert self.labeller is not None
        with torch.no_grad():
            labels = self.labeller(images.float() / 255).argmax(1)
        return robench.ImageData(images, labels)


class _AgreeingPlugin:
    @robench.hookimpl
    def robench_datasets(self) -> list[type[robench.Dataset]]:
        return [Agreeing]


EPS = 1 / 2550  # small enough that PGD-2 flips no prediction: robust accuracy stays near clean (100 %)


def _published(robust: float) -> Any:
    def reference(self: ModelFacts) -> robench.Reference:
        return robench.Reference(0.97, robust, "a fake leaderboard", "pgd[steps=2]", "linf", EPS)

    return reference


def test_a_row_that_follows_the_published_protocol_is_flagged_only_above_the_published_number(
    tofu: tuple[nn.Module, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, params = tofu
    release(reference, Path(params["model_dir"]) / "cifar10" / "corruptions" / f"{LRR}.pt")
    monkeypatch.setattr(Agreeing, "labeller", reference)
    pm: pluggy.PluginManager = get_plugin_manager()
    pm.register(TinyPlugin(), name="tiny")
    pm.register(_AgreeingPlugin(), name="agreeing")

    def evaluate(name: str, published: float, order: str = "first") -> pd.Series:
        monkeypatch.setattr(ModelFacts, "reference", _published(published))
        benchmark = robench.Benchmark(
            name="rb",
            datasets=("cifar-agreeing",),
            defenses=(robench.PluginSpec.of("robustbench", {**params, "dataset": "cifar10"}),),
            attacks=(robench.PluginSpec.of("pgd", {"steps": 2}),),
            eps=(EPS,),
            n_samples=8,
            sample_order=order,
        )
        summary = run(benchmark, pm=pm, run_dir=tmp_path / name, cache_dir=tmp_path / "cache", device="cpu")
        return RunStore(summary.run_dir).read_cells().iloc[0]

    above = evaluate("published-above", published=1.0)
    assert above["status"] == "ok" and above["sample_order"] == "first", above["error"]
    assert above["robust_ci_low"] > 0.5  # 8 of 8 robust: the published 1.0 is inside the interval
    assert above["reference_followed"] and not above["flag_above_reference"]
    assert (above["reference_clean_acc"], above["reference_source"]) == (0.97, "a fake leaderboard")
    below = evaluate("published-below", published=above["robust_ci_low"] / 2)
    assert below["reference_followed"] and below["flag_above_reference"]
    samples = RunStore(tmp_path / "published-below").read_samples()
    assert sorted(set(samples["sample"])) == list(range(8))  # --sample-order first: indices 0..7
    random_order = evaluate("random-order", published=above["robust_ci_low"] / 2, order="random")
    assert not random_order["reference_followed"] and not random_order["flag_above_reference"]
    report = write_report(tmp_path / "published-below")[0].read_text()
    assert "## Published numbers" in report and "**above: check the evaluation**" in report
    assert "1. a weaker attack than the published evaluation's" in report
    assert "a model missing the input normalisation" in report and "another weights file" in report


# -- robench zoo --------------------------------------------------------------------------


def _zoo_rows(printed: str) -> dict[str, list[str]]:
    """``dataset/threat/model`` -> the row's columns (split on runs of two spaces or more)."""
    import re

    rows = {}
    for line in printed.splitlines()[1:]:
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) >= 7:
            rows[f"{cols[1]}/{cols[2]}/{cols[0]}"] = cols
    return rows


@pytest.mark.usefixtures("narrow")
def test_zoo_lists_the_models_with_published_numbers_and_the_state_of_their_files(tmp_path: Path, shell: Shell) -> None:
    models, cache = tmp_path / "models", tmp_path / "cache"
    code, printed = shell(["zoo", "--model-dir", str(models), "--cache-dir", str(cache)])
    assert code == 0, printed
    rows = _zoo_rows(printed)
    assert len(rows) == 39 and printed.splitlines()[0].split() == [
        "model",
        "dataset",
        "threat",
        "architecture",
        "clean",
        "robust",
        "files",
        "pinned",
    ]
    assert rows["cifar10/Linf/Carmon2019Unlabeled"] == [
        "Carmon2019Unlabeled", "cifar10", "Linf", "WideResNet-28-10", "89.69", "59.53", "no", "no"
    ]  # fmt: skip
    assert all(r[-2:] == ["no", "no"] for r in rows.values())  # an empty folder: nothing there, nothing pinned
    folder = models / "cifar10" / "corruptions"
    release(seeded(zoo()[LRR]["model"], 4), folder / f"{LRR}.pt")
    for i, member in enumerate(seeded(zoo()[DECK]["model"], 5).models[:2]):
        release(member, folder / f"{DECK}.pt_m{i}.pt")
    params = {"model_name": LRR, "threat_model": "corruptions", "dataset": "cifar10", "model_dir": str(models)}
    RobustBenchModel.create({**params, "manifest": write_manifest(tmp_path / "m.json", {})}).fit(context(cache=cache))
    code, printed = shell(
        ["zoo", "list", "--dataset", "cifar10", "--model-dir", str(models), "--cache-dir", str(cache)]
    )
    rows = _zoo_rows(printed)
    assert rows[f"cifar10/corruptions/{LRR}"][-2:] == ["yes", "first use"]
    assert rows[f"cifar10/corruptions/{DECK}"][-4:] == ["96.56", "92.78", "2/6", "no"]
    assert rows[f"cifar10/corruptions/{DECK}"][3] == "WideResNet-18-2 x6"
    assert all(key.startswith("cifar10/") for key in rows) and len(rows) == 25  # 17 corruptions, 6 Linf, 2 L2


@pytest.mark.usefixtures("narrow")
def test_zoo_pin_writes_a_manifest_and_leaves_out_a_file_that_contradicts_its_first_use(
    tmp_path: Path, shell: Shell
) -> None:
    models, cache = tmp_path / "models", tmp_path / "cache"
    folder = models / "cifar10" / "corruptions"
    single = release(seeded(zoo()[LRR]["model"], 6), folder / f"{LRR}.pt")
    members = [release(m, folder / f"{DECK}.pt_m{i}.pt") for i, m in enumerate(seeded(zoo()[DECK]["model"], 7).models)]
    manifest = tmp_path / "team.json"
    args = ["zoo", "pin", "--model-dir", str(models), "--cache-dir", str(cache), "--manifest", str(manifest)]
    code, printed = shell(args)
    assert code == 0, printed
    entries = json.loads(manifest.read_text())["models"]
    assert entries[f"cifar10/corruptions/{LRR}"] == {f"{LRR}.pt": single}
    assert list(entries[f"cifar10/corruptions/{DECK}"].values()) == members
    assert f"7 file(s) pinned in {manifest}; runs use it with -D manifest={manifest}" in printed
    defense = RobustBenchModel.create(
        {"model_name": LRR, "threat_model": "corruptions", "dataset": "cifar10", "model_dir": str(models)}
        | {"manifest": str(manifest)}
    )
    assert defense.sha256 == single  # a committed manifest pins the model key
    Pins(cache).record(f"cifar10/corruptions/{LRR}.pt", "ab" * 32, folder / f"{LRR}.pt")  # another file's first use
    code, printed = shell([*args[:-1], str(tmp_path / "other.json")])
    assert code == 1 and f"{folder / f'{LRR}.pt'}: sha256 {single}, but its first use recorded {'ab' * 32}" in printed
    other = json.loads((tmp_path / "other.json").read_text())["models"]
    assert f"cifar10/corruptions/{LRR}" not in other and list(other[f"cifar10/corruptions/{DECK}"].values()) == members


def test_zoo_fetch_downloads_ahead_of_a_run_and_names_ambiguous_models(
    tmp_path: Path, shell: Shell, monkeypatch: pytest.MonkeyPatch
) -> None:
    (gid,) = zoo_ids(LRR)
    weights = release_bytes(seeded(zoo()[LRR]["model"], 8), tmp_path)
    monkeypatch.setattr(gdown, "download", FakeDrive({gid: weights}))
    models = tmp_path / "models"
    code, printed = shell(["zoo", "fetch", f"cifar10/corruptions/{LRR}", "--model-dir", str(models)])
    path = models / "cifar10" / "corruptions" / f"{LRR}.pt"
    assert code == 0 and f"{path}  sha256 {hashlib.sha256(weights).hexdigest()}" in printed, printed
    code, printed = shell(["zoo", "fetch", "Standard", "--model-dir", str(models)])
    assert code == 2 and "Standard is the name of several models (cifar10/corruptions/Standard, " in printed
    code, printed = shell(["zoo", "fetch", "Carmon2019Unlabelled", "--model-dir", str(models)])
    assert code == 2 and "Did you mean: cifar10/Linf/Carmon2019Unlabeled?" in printed


def test_the_one_command_plans_the_leaderboard_protocol_on_robustbench_network(shell: Shell) -> None:
    args = ["plan", "--dataset", "cifar10", "--defense", "robustbench", "-D", "model_name=Carmon2019Unlabeled"]
    code, printed = shell([*args, "--protocol", "robustbench", "--sample-order", "first"])
    assert code == 0, printed
    assert printed.splitlines()[0] == (
        "cifar10/WideResNet-28-10/robustbench[model_name=Carmon2019Unlabeled]/model/robustbench/linf/eps=0.0313725/seed=0"
    )
    code, printed = shell([*args, "--protocol", "robustbench", "--sample-order", "frist"])
    assert code == 2 and "'frist' is not one of 'random', 'first'" in printed


def test_without_dataset_a_zoo_model_is_planned_on_the_dataset_it_was_published_for(shell: Shell) -> None:
    model = ["--defense", "robustbench", "-D", "model_name=Carmon2019Unlabeled", "--protocol", "robustbench"]
    code, printed = shell(["plan", *model, "--sample-order", "first"])
    assert code == 0, printed
    assert "dataset: cifar10, the one the defenses' models are made for (--dataset to choose)" in printed.splitlines()
    assert printed.startswith("cifar10/WideResNet-28-10/robustbench[model_name=Carmon2019Unlabeled]/model/robustbench/")
    # published for two datasets: the user chooses, before any compute
    code, printed = shell(
        ["plan", "--defense", "robustbench", "-D", f"model_name={LRR}", "-D", "threat_model=corruptions"]
    )
    assert code == 2 and "made for several datasets" in printed
    assert "choose with --dataset cifar10 or --dataset cifar100" in printed
    lrr = ["--defense", "robustbench", "-D", f"model_name={LRR}", "-D", "threat_model=corruptions"]
    code, printed = shell(["plan", *lrr, "-D", "dataset=cifar100", "--protocol", "corruptions"])
    assert code == 0 and printed.startswith("cifar100/"), printed
    # --dataset wins; a defense that names no dataset keeps the default
    code, printed = shell(["plan", "--dataset", "cifar10", *model])
    assert code == 0 and "dataset:" not in printed and printed.startswith("cifar10/"), printed
    code, printed = shell(["plan", "--defense", "baseline"])
    assert code == 0 and printed.startswith("fashion-mnist/cnn8/baseline/"), printed
