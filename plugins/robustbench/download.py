"""Downloading RobustBench's weights files, as robustbench does it, but never leaving a partial file.

robustbench 1.1.1's ``load_model`` downloads a missing file with ``gdown.download(id=...,
output=path)`` (gdown 5.1.0), from the Google Drive ids of its model-zoo tables (a list of
ids for an ensemble, one file per member). robench calls the same downloader with the same
ids, with two differences:

* the file is downloaded under a hidden temporary name (``.{file}.part``) and renamed into
  place only once it is complete: gdown leaves its own temporary file behind when a transfer
  fails, and it does not compare the bytes received with the size announced, so a transfer
  cut short can end "successfully". A complete download must open as a torch checkpoint (a
  zip archive with its central directory, or a legacy file that unpickles to its end with
  ``weights_only=True``), and must not be a web page (Drive's quota or permission pages);
* any failure (offline, refused by Drive, cut short) gives one error that names every
  missing file, its Drive id and the folder to put it in, so the files can be fetched
  elsewhere (``robench zoo fetch``) and copied over.

On a terminal, gdown draws its progress bar; off a terminal (a CI log), robench prints one
line when each file starts and one when it is complete.
"""

from __future__ import annotations

import pickle
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import robench

DRIVE_URL = "https://drive.google.com/uc?id={}"
STALL_SECONDS = 60.0
"""A connection that sends nothing for this long fails the download instead of hanging the run."""


@dataclass(frozen=True)
class Remote:
    """One weights file of a model and its Google Drive id."""

    file: str
    gdrive_id: str


class DownloadFailed(Exception):
    """One file's download failed; the message says why, in a few words."""


def fetch(key: str, folder: Path, remotes: Sequence[Remote], log: Callable[[str], None]) -> list[Path]:
    """Download every file of ``remotes`` that ``folder`` lacks; return the files downloaded.

    :param key: the model's ``dataset/threat_model/name``, for messages
    :raises robench.DataNotFoundError: a download failed; names every file still missing,
        its Drive id, and ``folder``
    """
    missing = [r for r in remotes if not (folder / r.file).is_file()]
    done: list[Path] = []
    for remote in missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            done.append(download(remote, folder, log))
        except (DownloadFailed, OSError) as exc:
            still = [r for r in remotes if not (folder / r.file).is_file()]
            raise robench.DataNotFoundError(not_downloaded(key, folder, still, str(exc))) from exc
    return done


def not_downloaded(key: str, folder: Path, remotes: Sequence[Remote], why: str) -> str:
    """The one message for files that are missing and could not be downloaded."""
    dataset, threat_model, _ = key.split("/")
    listed = "".join(f"  {r.file}: Google Drive id {r.gdrive_id} ({DRIVE_URL.format(r.gdrive_id)})\n" for r in remotes)
    return (
        f"robustbench model {key}: {len(remotes)} weights file(s) are not in {folder} and could not be downloaded "
        f"({why}):\n{listed}"
        f"Put them in {folder}: on a machine with internet, `robench zoo fetch {key} --model-dir DIR`, then copy "
        f"DIR/{dataset}/{threat_model}/ to {folder} (or download each id above in a browser), and run again."
    )


def download(remote: Remote, folder: Path, log: Callable[[str], None]) -> Path:
    """Download one file into ``folder`` with gdown, via a temporary name; return its path.

    :raises DownloadFailed: offline, refused by Google Drive, or an incomplete file
    """
    target, part = folder / remote.file, folder / f".{remote.file}.part"
    _remove_parts(folder, remote.file)  # a failed earlier attempt's leftovers
    log(f"robustbench: downloading {remote.file} (Google Drive id {remote.gdrive_id}) into {folder}")
    start = time.monotonic()
    try:
        import gdown  # robustbench's own downloader (it pins gdown 5.1.0)

        written = _without_stalls(
            lambda: gdown.download(id=remote.gdrive_id, output=str(part), quiet=not sys.stderr.isatty()),
            folder,
            remote.file,
        )
        if written is None or not part.is_file():
            raise DownloadFailed("gdown wrote no file")
        problem = incomplete(part)
        if problem:
            raise DownloadFailed(problem)
        part.replace(target)
    except DownloadFailed:
        _remove_parts(folder, remote.file)
        raise
    except Exception as exc:  # gdown's and requests' errors, whatever they are: never a partial file
        _remove_parts(folder, remote.file)
        raise DownloadFailed(_why(exc)) from exc
    size = target.stat().st_size
    log(f"robustbench: {target} complete, {size / 1e6:.1f} MB in {time.monotonic() - start:.0f} s")
    return target


def _without_stalls(call: Callable[[], str | None], folder: Path, file: str) -> str | None:
    """``call()``, abandoned with :class:`DownloadFailed` once ``file``'s temporary files in
    ``folder`` have not grown for :data:`STALL_SECONDS`.

    gdown takes no timeout and calls requests without one, so a connection that stops
    answering (a firewall that drops packets) would hang the run in its build. Written here
    because nothing in gdown or requests bounds it from outside: the call runs in a daemon
    thread, and the bytes it writes are the sign of progress. An abandoned thread ends with
    the process; the caller removes what it wrote.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["written"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"download {file}", daemon=True)
    thread.start()
    size, since = -1, time.monotonic()
    while thread.is_alive():
        thread.join(min(1.0, STALL_SECONDS / 4))
        now = sum(p.stat().st_size for p in folder.glob(f".{file}.part*") if p.is_file())
        if now != size:
            size, since = now, time.monotonic()
        elif thread.is_alive() and time.monotonic() - since > STALL_SECONDS:
            raise DownloadFailed(f"Google Drive sent nothing for {STALL_SECONDS:g} s, the connection stalled")
    if "error" in outcome:
        raise cast(BaseException, outcome["error"])
    return cast("str | None", outcome.get("written"))


def incomplete(path: Path) -> str:
    """Why ``path`` is not a whole torch checkpoint (a web page, a cut transfer), or "" if it is one.

    A file that is whole but holds more than plain weights is not this function's concern:
    loading it with ``weights_only=True`` refuses it with a message of its own.
    """
    import torch

    with path.open("rb") as f:
        head = f.read(64)
    size = path.stat().st_size
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return f"Google Drive sent a web page ({size} bytes), not the file: its quota or sharing refused it"
    try:  # a zip archive is opened through its directory, at the end: cheap, and a cut one has none
        torch.load(path, map_location="cpu", weights_only=True, mmap=head[:4] == b"PK\x03\x04")
    except (RuntimeError, EOFError) as exc:
        return f"the file is cut short or damaged ({size} bytes; torch.load: {_first_line(exc)})"
    except pickle.UnpicklingError:
        return ""
    return ""


def _why(exc: BaseException) -> str:
    """A download failure in a few words: offline, refused by Drive, or interrupted."""
    import requests
    from gdown.exceptions import FileURLRetrievalError

    if isinstance(exc, FileURLRetrievalError):
        return f"Google Drive refused it (download quota exceeded, or not shared): {_first_line(exc)}"
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        reason = getattr(exc.args[0], "reason", exc) if exc.args else exc  # urllib3's MaxRetryError holds the cause
        return f"no connection to Google Drive, offline? {type(exc).__name__}: {_first_line(reason)}"
    return f"the transfer failed: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: object) -> str:
    """The first line of an error's text, without urllib3's ``<... object at 0x...>:`` prefixes."""
    lines = [re.sub(r"<[^<>]* at 0x[0-9a-f]+>: ", "", line.strip()) for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _remove_parts(folder: Path, file: str) -> None:
    """Remove robench's and gdown's temporary files of ``file`` (gdown names its own ``.{file}.part*``)."""
    for leftover in folder.glob(f".{file}.part*") if folder.is_dir() else ():
        leftover.unlink(missing_ok=True)
