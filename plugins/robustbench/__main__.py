"""``python -m robench.plugins.robustbench pin | download``: pin the manifest, fetch the files.

python -m robench.plugins.robustbench download Diffenderfer2021Winning_LRR_CARD_Deck cifar10 corruptions DIR
python -m robench.plugins.robustbench pin DIR            # writes the hashes into robench's manifest
python -m robench.plugins.robustbench pin DIR --manifest my-manifest.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import robench
from robench.plugins.robustbench.compat import zoo_entry
from robench.plugins.robustbench.weights import DATASETS, FILE_NAME, MANIFEST, THREAT_MODELS, sha256_file, weight_files


def pin(model_dir: Path, manifest: Path = MANIFEST) -> int:
    """Write the sha256 of every weights file under ``model_dir`` (RobustBench's layout) into
    ``manifest``, adding entries it lacks; a file that contradicts a pinned hash is reported
    and left pinned as it was. Returns the exit status (1 on a contradiction)."""
    data = json.loads(manifest.read_text()) if manifest.is_file() else {"models": {}}
    status = 0
    for path in sorted(model_dir.glob("*/*/*.pt")):
        match = FILE_NAME.fullmatch(path.name)
        dataset, threat_model = path.parent.parent.name, path.parent.name
        if match is None or dataset not in DATASETS or threat_model not in THREAT_MODELS:
            continue
        entry = data["models"].setdefault(f"{dataset}/{threat_model}/{match['name']}", {})
        found, pinned = sha256_file(path), entry.get(path.name)
        if pinned not in (None, found):
            print(f"{path}: sha256 {found}, but the manifest pins {pinned}: left as it was", file=sys.stderr)
            status = 1
            continue
        entry[path.name] = found
        print(f"{dataset}/{threat_model}/{path.name} {found}")
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    return status


def download(model_name: str, dataset: str, threat_model: str, model_dir: Path) -> None:
    """Fetch a model's files with robustbench's Google-Drive downloader (needs internet); they
    are written, never loaded: load them with the defense, after pinning their hashes."""
    ids = zoo_entry(dataset, threat_model, model_name)["gdrive_id"]
    if ids is None:
        raise robench.ConfigError(f"RobustBench keeps no weights file for {model_name} (it comes from timm)")
    ids = ids if isinstance(ids, list) else [ids]
    folder = model_dir / dataset / threat_model
    folder.mkdir(parents=True, exist_ok=True)
    for gdrive_id, file in zip(ids, weight_files(model_name, len(ids)), strict=True):
        if not (folder / file).is_file():  # via a .part file: a cut download never looks finished
            part = folder / f"{file}.part"
            importlib.import_module("robustbench.utils").download_gdrive_new(gdrive_id, part)
            part.replace(folder / file)
        print(f"{folder / file} {sha256_file(folder / file)}")


def main(argv: Sequence[str] | None = None) -> int:
    """``pin MODEL_DIR [--manifest FILE]`` or ``download MODEL_NAME DATASET THREAT_MODEL MODEL_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m robench.plugins.robustbench", description=(__doc__ or "").split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pin", help="write the sha256 of the weights files under MODEL_DIR into a manifest")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--manifest", type=Path, default=MANIFEST, help="default: the manifest robench ships")
    d = commands.add_parser("download", help="fetch a model's weights files with RobustBench's downloader")
    d.add_argument("model_name")
    d.add_argument("dataset", choices=sorted(DATASETS))
    d.add_argument("threat_model", choices=THREAT_MODELS)
    d.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "pin":
            return pin(args.model_dir, args.manifest)
        download(args.model_name, args.dataset, args.threat_model, args.model_dir)
    except robench.RobenchError as exc:  # a message that says what to do, as the robench CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
