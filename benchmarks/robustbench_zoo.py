"""How many of the 39 RobustBench models robench ships facts for build and load from weights
files in RobustBench's release format, and what hashing a weights file costs beside loading it.

No network and no real weights: for each model, RobustBench's own constructor (robustbench
1.1.1) builds it with seeded random weights, and its weights are written as RobustBench
releases them: a ``state_dict`` entry with DataParallel's ``module.`` prefix and without the
normalisation constants the constructor sets (``{"last": ...}`` for the Kireev2021 models; one
file per member, ``{name}.pt_m{i}.pt``, for an ensemble), alternately in torch's zip format and
its legacy format, as real releases come in both. The robustbench defense then builds the
model through its normal path (first-use pin in a temporary cache, sha256 of the bytes read,
``weights_only`` load, RobustBench's key renaming, strict fit) and its output on random
images must equal the constructed model's (the log of its mean softmax for softmax ensembles).

Hash cost: for the largest file, the median of 3 timings of reading it, hashing the bytes
read (sha256), and loading them (``torch.load(weights_only=True)`` + ``load_state_dict``);
the share is hash / (read + load), the price of trust on first use on every fresh build.

    python benchmarks/robustbench_zoo.py            # all 39: minutes on 2 cores, peak about 5 GB
    python benchmarks/robustbench_zoo.py --smoke    # one small model (seconds)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robench
from robench.plugins.robustbench import RobustBenchModel
from robench.plugins.robustbench.compat import zoo_entry
from robench.plugins.robustbench.facts import ModelFacts, leaderboard
from robench.plugins.robustbench.weights import CONSTANT_BUFFERS, DATASETS, SOFTMAX_ENSEMBLES, zoo_state_dict

SMOKE = ("cifar10/Linf/Wong2020Fast",)


def release(model: nn.Module, path: Path, legacy: bool, kireev: bool = False) -> None:
    """Write ``model``'s weights as RobustBench's files hold them."""
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k not in CONSTANT_BUFFERS}
    checkpoint: dict[str, Any] = {"last": {"state_dict": state}} if kireev else {"state_dict": state, "epoch": 200}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)


def context(dataset: str, cache: Path) -> robench.Context:
    classes = DATASETS[dataset]
    shape = robench.DataShape(3, 32, 32, classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = robench.ImageData(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    return robench.Context(
        data, shape, nn.Identity, torch.device("cpu"), 0, "smoke", cache / "w", dataset=dataset, cache_root=cache
    )


def check(facts: ModelFacts, root: Path, cache: Path, legacy: bool) -> dict[str, Any]:
    """Build ``facts``' model, write its release files, load them with the defense, compare outputs."""
    torch.manual_seed(0)
    reference = zoo_entry(facts.dataset, facts.threat_model, facts.name)["model"]().eval()
    folder = root / facts.dataset / facts.threat_model
    folder.mkdir(parents=True, exist_ok=True)
    parts = list(reference.models) if len(facts.files) > 1 else [reference]
    for part, file in zip(parts, facts.files, strict=True):
        release(part, folder / file, legacy, kireev=facts.name.startswith("Kireev2021Effectiveness"))
    size = sum((folder / f).stat().st_size for f in facts.files)
    params = sum(p.numel() for p in reference.parameters())
    row: dict[str, Any] = {"key": facts.key, "network": facts.network, "params": params, "bytes": size}
    row["format"] = "legacy" if legacy else "zip"
    start = time.perf_counter()
    try:
        defense = RobustBenchModel.create(
            {"model_name": facts.name, "dataset": facts.dataset, "threat_model": facts.threat_model}
            | {"model_dir": str(root)}
        )
        model = defense.fit(context(facts.dataset, cache))["model"]
        row["fit_s"] = time.perf_counter() - start
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            expected = reference(x)
            if facts.name in SOFTMAX_ENSEMBLES:
                expected = expected.log()
            got = model(x)
        row["ok"] = bool(torch.allclose(got, expected, rtol=0, atol=1e-4))
        row["error"] = "" if row["ok"] else f"outputs differ by {(got - expected).abs().max():.3g}"
    except robench.RobenchError as exc:
        row["fit_s"], row["ok"], row["error"] = time.perf_counter() - start, False, str(exc).splitlines()[0]
    finally:
        for file in facts.files:
            (folder / file).unlink(missing_ok=True)
    return row


def hash_cost(facts: ModelFacts, root: Path) -> dict[str, float]:
    """Median seconds to read, hash and load the (single) file of ``facts``' model."""
    torch.manual_seed(0)
    model = zoo_entry(facts.dataset, facts.threat_model, facts.name)["model"]().eval()
    path = root / facts.files[0]
    release(model, path, legacy=False)
    times: dict[str, list[float]] = {"read": [], "sha256": [], "load": []}
    for _ in range(3):
        start = time.perf_counter()
        data = path.read_bytes()
        times["read"].append(time.perf_counter() - start)
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        times["sha256"].append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict(zoo_state_dict(checkpoint, facts.name, member=False), strict=False)
        times["load"].append(time.perf_counter() - start)
        del data, checkpoint
        gc.collect()
    out = {k: statistics.median(v) for k, v in times.items()}
    out["bytes"] = path.stat().st_size
    path.unlink()
    return out


def main() -> None:
    """Check every model (or the smoke one), print a table, the count and the hash cost."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one small model, for a quick check of the script")
    args = parser.parse_args()
    facts = leaderboard()
    keys = SMOKE if args.smoke else sorted(facts, key=lambda k: (len(facts[k].files), k))
    work = Path(tempfile.mkdtemp(prefix="robench-rb-zoo-"))
    rows = []
    try:
        for i, key in enumerate(keys):
            row = check(facts[key], work / "models", work / "cache", legacy=i % 2 == 1)
            rows.append(row)
            status = "ok" if row["ok"] else f"FAILED: {row['error']}"
            print(
                f"{row['key']:<62} {row['network']:<20} {row['params'] / 1e6:7.1f} M  {row['bytes'] / 1e6:8.1f} MB "
                f"{row['format']:<6} fit {row['fit_s']:6.1f} s  {status}",
                flush=True,
            )
            gc.collect()
        ok = sum(r["ok"] for r in rows)
        print(f"\n{ok}/{len(rows)} models build and load from release-format files (of {len(facts)} with facts)")
        largest = max(rows, key=lambda r: r["bytes"] if len(facts[r["key"]].files) == 1 else 0)
        cost = hash_cost(facts[largest["key"]], work)
        share = cost["sha256"] / (cost["read"] + cost["load"])
        print(
            f"hash cost, {largest['key']} ({cost['bytes'] / 1e9:.2f} GB, page cache warm, median of 3): read "
            f"{cost['read']:.2f} s, sha256 {cost['sha256']:.2f} s, torch.load + load_state_dict {cost['load']:.2f} s; "
            f"sha256 = {100 * share:.0f} % of reading and loading it"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
