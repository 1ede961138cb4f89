"""Fetch files over HTTP from a list of mirrors: retried, md5-verified, renamed into place.

Per file, mirrors are tried in order. A failure that may pass (refused connection, timeout,
HTTP 5xx, a body cut short) is retried on the same mirror with exponential backoff; one the
mirror would repeat (HTTP 4xx, a wrong md5) moves on to the next. `Patience` bounds every
wait, every try is one line on stderr, and a mirror whose last try got no answer, or whose
name does not resolve (no network), is not asked again in this run. The bytes stream into
`files.atomic_write`'s temp file, renamed only once the md5 matches.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from tinymnist.data.files import atomic_write

CHUNK_BYTES = 1 << 16  # stream, hash and write in 64 KiB pieces
# The bytes as stored: with gzip transfer encoding, Content-Length counts compressed bytes while requests
# hands over uncompressed ones, and a short body could not be told from a whole one.
AS_STORED = {"Accept-Encoding": "identity"}
# A file's only answer once every mirror is out of the run: said once in the error, not per mirror and file.
NO_MIRROR_LEFT = "not asked: no mirror answered for an earlier file"


@dataclass(frozen=True)
class Patience:
    """How long to wait for a mirror, and how often to ask it again."""

    connect_timeout: float = 10.0  # covers three lost SYNs: Linux resends after 1, 2 and 4 s (RFC 6298)
    read_timeout: float = 15.0  # seconds a server may send nothing, before the reply or mid-body: pip's default
    attempts: int = 3  # tries per mirror for a failure that may pass
    backoff: float = 1.0  # seconds before the second try; doubled before each later one
    deadline: float = 300.0  # per file, all tries: MNIST's largest file (9.9 MB) arrives within it at 33 KB/s

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")


def fetch_files(
    folder: Path, md5s: Mapping[str, str], mirrors: Sequence[str], *, progress: bool | None, patience: Patience
) -> dict[str, list[str]]:
    """Fetch `folder/NAME` from `MIRROR/NAME` for each NAME of `md5s`; return, per file no mirror
    delivered, what each answered (`"URL: HTTP 503 (3 tries)"`). progress None: a bar only on a terminal."""
    console = Console(stderr=True)  # stdout stays clean for what the command prints
    show = console.is_terminal if progress is None else progress
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    failures = {}
    with requests.Session() as session, Progress(*columns, console=console, disable=not show) as bar:
        fetcher = _Fetcher(mirrors, session, bar, patience)
        for name, md5 in md5s.items():
            if answers := fetcher.fetch(name, folder / name, md5):
                failures[name] = answers
    return failures


class _TryAgain(Exception):
    """A failure that may pass: HTTP 5xx, a refused connection, a timeout, a cut-off body."""


class _NoAnswer(_TryAgain):
    """A timeout: no connection, or the server fell silent before or during the body."""


class _NextMirror(Exception):
    """A failure this mirror will repeat (HTTP 4xx, wrong bytes): go to the next one."""


class _Dead(_NextMirror):
    """The last try got no answer: this mirror is not asked again in this run."""


class _OutOfTime(Exception):
    """The file's deadline has passed: no more tries, on any mirror."""


@dataclass(frozen=True)
class _Fetcher:
    """Fetches files from mirrors in order with one HTTP session, progress bar and patience."""

    mirrors: Sequence[str]
    session: requests.Session
    bar: Progress
    patience: Patience
    dead: dict[str, str] = field(default_factory=dict)  # mirror -> why ("no answer within 15 s (3 tries) on NAME")

    def fetch(self, name: str, destination: Path, md5: str) -> list[str]:
        """Try each mirror in turn: [] once one delivers, else what every mirror answered."""
        if self.mirrors and all(base in self.dead for base in self.mirrors):
            return [NO_MIRROR_LEFT]  # offline: the first file's lines said why
        task = self.bar.add_task(name, total=None)
        give_up_at = time.monotonic() + self.patience.deadline
        answers = []
        for number, base in enumerate(self.mirrors, start=1):
            url = base.rstrip("/") + "/" + name
            then = "next mirror" if number < len(self.mirrors) else "no mirror left"
            if base in self.dead:
                answers.append(f"{url}: not asked: {self.dead[base]}")
                _say(f"{url}: not asked: {self.dead[base]}; {then}")
                continue
            _say(f"downloading {url}")
            try:
                self._fetch_with_retries(url, destination, md5, task, give_up_at)
                return []
            except _NextMirror as e:
                answers.append(f"{url}: {e}")
                _say(f"{url}: {e}; {then}")
                if isinstance(e, _Dead):
                    self.dead[base] = f"{e} on {name}"
            except _OutOfTime as e:
                answers.append(f"{url}: {e}")
                _say(f"{url}: {e}; giving up on {name}")
                break
        return answers or ["no mirrors to try"]

    def _fetch_with_retries(self, url: str, destination: Path, md5: str, task: TaskID, give_up_at: float) -> None:
        attempts = self.patience.attempts
        for attempt in range(1, attempts + 1):
            try:
                return self._fetch_once(url, destination, md5, task, give_up_at)
            except _TryAgain as e:  # noqa: PERF203 (a retry loop: the exception is the point)
                tries = f"{attempt} {'try' if attempt == 1 else 'tries'}"
                if attempt == attempts:  # the last try decides whether the mirror is dead
                    raise (_Dead if isinstance(e, _NoAnswer) else _NextMirror)(f"{e} ({tries})") from None
                pause = self.patience.backoff * 2 ** (attempt - 1)  # exponential backoff: 1x, 2x, 4x, ...
                if time.monotonic() + pause >= give_up_at:
                    raise _OutOfTime(f"{e} ({tries}); the {self.patience.deadline:g} s deadline has passed") from None
                _say(f"{url}: {e}; try {attempt + 1} of {attempts} in {pause:g} s")
                time.sleep(pause)

    def _fetch_once(self, url: str, destination: Path, md5: str, task: TaskID, give_up_at: float) -> None:
        left = give_up_at - time.monotonic()
        if left <= 0:
            raise _OutOfTime(f"the {self.patience.deadline:g} s deadline has passed")
        # No single wait may outlast the deadline: a server that stalls cannot stretch it.
        connect, read = min(self.patience.connect_timeout, left), min(self.patience.read_timeout, left)
        try:
            with self.session.get(url, stream=True, timeout=(connect, read), headers=AS_STORED) as response:
                if response.status_code >= 500:
                    raise _TryAgain(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise _NextMirror(f"HTTP {response.status_code}")
                self._save_verified(response, destination, md5, task, give_up_at)
        except requests.ConnectTimeout:
            raise _NoAnswer(f"no connection within {connect:g} s") from None
        except requests.Timeout:
            raise _NoAnswer(f"no answer within {read:g} s") from None
        except requests.ConnectionError as e:  # also a read timeout in the middle of the body
            if _UNRESOLVED.search(str(e)):  # no network or a wrong host name: seconds of retries would not help
                raise _Dead(f"{_reason(e)} (no network, or a wrong mirror name)") from None
            raise (_NoAnswer if _READ_TIMED_OUT in str(e) else _TryAgain)(_reason(e)) from None
        except requests.RequestException as e:  # a malformed mirror URL, too many redirects, ...
            raise _NextMirror(_reason(e)) from None

    def _save_verified(
        self, response: requests.Response, destination: Path, md5: str, task: TaskID, give_up_at: float
    ) -> None:
        """Stream the body into a temp file that becomes `destination` only if whole and md5-correct."""
        length = response.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        self.bar.reset(task, total=expected)
        digest, received = hashlib.md5(), 0
        with atomic_write(destination) as file:  # any exception below deletes the temp file
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    self.bar.advance(task, len(chunk))
                    if time.monotonic() > give_up_at:  # a trickle that never trips the read timeout
                        deadline = self.patience.deadline
                        raise _OutOfTime(f"the {deadline:g} s deadline passed after {received} bytes")
            except requests.exceptions.ChunkedEncodingError:  # closed before Content-Length bytes
                pass  # reported just below, with the byte counts
            if expected is not None and received != expected:
                raise _TryAgain(f"body cut off after {received} of {expected} bytes")
            if digest.hexdigest() != md5:
                raise _NextMirror(f"md5 mismatch (got {digest.hexdigest()}, expected {md5})")


def _say(line: str) -> None:
    """One line on stderr, flushed: seen at once in a terminal, a pipe or a log file alike."""
    print(line, file=sys.stderr, flush=True)  # rich shows it above the live progress bar


# How urllib3 words a read timeout: mid-body, requests raises it as a plain ConnectionError.
_READ_TIMED_OUT = "Read timed out"
# A host name that does not resolve, in urllib3's words (2.x: NameResolutionError; 1.x: the resolver's).
_UNRESOLVED = re.compile(
    r"NameResolutionError|Failed to resolve|Name or service not known|nodename nor servname|getaddrinfo failed"
    r"|Temporary failure in name resolution"
)


def _reason(error: requests.RequestException) -> str:
    """`Connection refused`, not urllib3's three nested reprs."""
    if _READ_TIMED_OUT in str(error):
        return "stopped sending (read timed out)"
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    return match.group(1) if match else f"{type(error).__name__}: {error}"
