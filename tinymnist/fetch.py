"""Fetch files over HTTP from a list of mirrors: retried, md5-verified, renamed into place.

`fetch_files` knows nothing about MNIST: `data.download` decides which files are
missing and which mirrors to ask, and turns the failures it returns into a message.

Per file, mirrors are tried in order. Failures that may pass (a refused connection, a
timeout, an HTTP 5xx, a body cut off before its Content-Length) are retried on the same
mirror with exponential backoff; failures the mirror would repeat (an HTTP 4xx, bytes
whose md5 is wrong) move on to the next mirror at once. The bytes stream into a hidden
temp file beside the destination that is renamed only once the md5 matches, so a failed
or interrupted (Ctrl-C) download never leaves a partial file under the final name.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from tinymnist.idx import atomic_writer

CHUNK_BYTES = 1 << 16  # stream, hash and write in 64 KiB pieces
# Ask for the bytes as stored. requests accepts gzip by default, and a server that takes
# the offer sends a Content-Length of the compressed bytes while requests hands us them
# uncompressed: the two would never agree, and a short body could not be told from a whole one.
AS_STORED = {"Accept-Encoding": "identity"}


def fetch_files(
    folder: Path,
    md5s: Mapping[str, str],
    mirrors: Sequence[str],
    *,
    progress: bool | None,
    timeout: float,
    attempts: int,
    backoff: float,
) -> dict[str, list[str]]:
    """Fetch `folder/NAME` from `MIRROR/NAME` for each NAME of `md5s`.

    Returns, for each file no mirror delivered, what every mirror answered
    (`"URL: HTTP 503 (3 tries)"`); an empty dict when all arrived. Files that arrived stay.
    progress: a byte-count bar on stderr; None shows it only on a terminal.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    failures = {}
    with requests.Session() as session, _progress_bar(progress) as bar:
        fetcher = _Fetcher(mirrors, session, bar, timeout, attempts, backoff)
        for name, md5 in md5s.items():
            if answers := fetcher.fetch(name, folder / name, md5):
                failures[name] = answers
    return failures


class _TryAgain(Exception):
    """A failure that may pass: HTTP 5xx, a refused connection, a timeout, a cut-off body."""


class _NextMirror(Exception):
    """A failure this mirror will repeat (HTTP 4xx, wrong bytes): go to the next one."""


@dataclass(frozen=True)
class _Fetcher:
    """Fetches files from mirrors in order with one HTTP session, progress bar and retry policy."""

    mirrors: Sequence[str]
    session: requests.Session
    bar: Progress
    timeout: float
    attempts: int
    backoff: float

    def fetch(self, name: str, destination: Path, md5: str) -> list[str]:
        """Try each mirror in turn: [] once one delivers, else what every mirror answered."""
        task = self.bar.add_task(name, total=None)
        answers = []
        for base in self.mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                self._fetch_with_retries(url, destination, md5, task)
                return []
            except _NextMirror as e:
                answers.append(f"{url}: {e}")
        return answers or ["no mirrors to try"]

    def _fetch_with_retries(self, url: str, destination: Path, md5: str, task: TaskID) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                return self._fetch_once(url, destination, md5, task)
            except _TryAgain as e:  # noqa: PERF203 (a retry loop: the exception is the point)
                if attempt == self.attempts:
                    raise _NextMirror(f"{e} ({attempt} {'try' if attempt == 1 else 'tries'})") from None
                time.sleep(self.backoff * 2 ** (attempt - 1))  # exponential backoff: 1x, 2x, 4x, ...

    def _fetch_once(self, url: str, destination: Path, md5: str, task: TaskID) -> None:
        try:
            with self.session.get(url, stream=True, timeout=self.timeout, headers=AS_STORED) as response:
                if response.status_code >= 500:
                    raise _TryAgain(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise _NextMirror(f"HTTP {response.status_code}")
                self._save_verified(response, destination, md5, task)
        except requests.Timeout:
            raise _TryAgain(f"no answer within {self.timeout:g} s") from None
        except requests.ConnectionError as e:  # also a read timeout in the middle of the body
            raise _TryAgain(_reason(e)) from None
        except requests.RequestException as e:  # a malformed mirror URL, too many redirects, ...
            raise _NextMirror(_reason(e)) from None

    def _save_verified(self, response: requests.Response, destination: Path, md5: str, task: TaskID) -> None:
        """Stream the body into a temp file that becomes `destination` only if whole and md5-correct."""
        length = response.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        self.bar.reset(task, total=expected)
        digest, received = hashlib.md5(), 0
        with atomic_writer(destination) as file:  # any exception below deletes the temp file
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    self.bar.advance(task, len(chunk))
            except requests.exceptions.ChunkedEncodingError:  # closed before Content-Length bytes
                pass  # reported just below, with the byte counts
            if expected is not None and received != expected:
                raise _TryAgain(f"body cut off after {received} of {expected} bytes")
            if digest.hexdigest() != md5:
                raise _NextMirror(f"md5 mismatch (got {digest.hexdigest()}, expected {md5})")


def _progress_bar(enabled: bool | None) -> Progress:
    console = Console(stderr=True)  # stdout stays clean for what the command prints
    show = console.is_terminal if enabled is None else enabled
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    return Progress(*columns, console=console, disable=not show)


def _reason(error: requests.RequestException) -> str:
    """`Connection refused`, not urllib3's three nested reprs."""
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return match.group(1) if match else f"{type(error).__name__}: {error}"
