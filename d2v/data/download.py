"""Checksummed, resumable downloads into a content-addressed cache.

An `Artifact` pins a file by its sha256 (or, where the publisher only gives one, md5). `fetch` looks for it in
the cache first, then tries each mirror in turn: a partial download is kept as `<name>.part` and resumed with
an HTTP Range request after a cut connection, and the file only appears under its final name once its digest
matches. A mismatch deletes the partial file and tries the next mirror (a mirror that answers 200 with an error
page is the common case); when none serves the pinned file, `ChecksumError` names each URL and both digests.
Processes fetching the same artifact take turns (a lock file beside it): one downloads, the others find it cached.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "d2v-prepare/0.1 (+https://github.com/d2v)"


class DownloadError(RuntimeError):
    """Every mirror failed, or the server answered with an error."""


class ChecksumError(DownloadError):
    """A file's digest differs from the pinned one."""


@dataclass(frozen=True)
class Artifact:
    """A remote file pinned by digest. `urls` are mirrors, tried in order."""

    name: str
    urls: tuple[str, ...]
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    unpinned: bool = False  # the publisher gives no digest: content is checked by the source instead
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if not (self.sha256 or self.md5 or self.unpinned):
            raise ValueError(f"artifact {self.name!r}: pin a sha256 or md5 (or mark it unpinned)")

    @property
    def algorithm(self) -> str:
        return "md5" if self.md5 and not self.sha256 else "sha256"

    @property
    def digest(self) -> str | None:
        return (self.sha256 or self.md5 or "").lower() or None


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_path(artifact: Artifact, cache_dir: str | Path) -> Path:
    """Content-addressed location: two artifacts with the same digest share one file."""
    if artifact.digest is None:
        return Path(cache_dir) / "unpinned" / artifact.name
    return Path(cache_dir) / artifact.algorithm / artifact.digest[:2] / artifact.digest / artifact.name


def verify(path: Path, artifact: Artifact, source: str) -> None:
    if artifact.digest is None:
        return
    got = file_digest(path, artifact.algorithm)
    if got != artifact.digest:
        raise ChecksumError(f"{artifact.name}: {artifact.algorithm} mismatch for {source}: "
                            f"expected {artifact.digest}, got {got}")


def fetch(artifact: Artifact, cache_dir: str | Path, *, attempts: int = 4, timeout: float = 60.0,
          backoff: float = 1.0) -> Path:
    """Return the cached path of `artifact`, downloading (and resuming) it when needed."""
    final = cache_path(artifact, cache_dir)
    if _cached(final, artifact):  # no lock needed to read: a shared cache may be read-only
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(final.with_name(final.name + ".lock")):
        if _cached(final, artifact):  # fetched by another process while this one waited
            return final
        part = final.with_name(final.name + ".part")
        errors, mismatched = [], False
        for url in artifact.urls:
            try:
                _download(url, part, artifact.size, attempts=attempts, timeout=timeout, backoff=backoff)
                verify(part, artifact, url)
            except DownloadError as err:  # ChecksumError included: another mirror may serve the pinned file
                if isinstance(err, ChecksumError):
                    part.unlink(missing_ok=True)  # a resume would extend the wrong bytes
                    mismatched = True
                errors.append(f"{url}: {err}")
                log.warning("%s: %s", artifact.name, err)
                continue
            os.replace(part, final)
            return final
    failed = ChecksumError if mismatched else DownloadError
    raise failed(f"{artifact.name}: every mirror failed:\n  " + "\n  ".join(errors))


def _cached(final: Path, artifact: Artifact) -> bool:
    if not final.exists():
        return False
    verify(final, artifact, f"{final} (the cached copy; delete it to download it again)")
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an advisory lock on `lock_path` (blocking) for the block: concurrent fetches of one artifact, from
    processes or threads, would otherwise append to the same .part file."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(url: str, part: Path, size: int | None, *, attempts: int, timeout: float, backoff: float) -> None:
    """Fill `part` from `url`, resuming from its current length after each failure."""
    if url.startswith("file://") or "://" not in url:
        src = Path(url.removeprefix("file://"))
        if not src.is_file():
            raise DownloadError(f"no such file {src}")
        shutil.copyfile(src, part)
        return
    last = None
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            return
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                resumed = response.status == 206
                if have and not resumed:
                    log.info("%s: server ignored the Range request; restarting", url)
                expected = _expected_length(response, have if resumed else 0)
                with open(part, "ab" if resumed else "wb") as out:
                    shutil.copyfileobj(response, out, CHUNK)
            got = part.stat().st_size
            if expected is not None and got < expected:
                raise http.client.IncompleteRead(b"", expected - got)
            return
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # asked past the end: the part file is already complete
                return
            if 400 <= err.code < 500:
                raise DownloadError(f"HTTP {err.code} {err.reason}") from err
            last = err
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            last = err
        log.warning("%s: attempt %d/%d failed (%s); resuming", url, attempt + 1, attempts, last)
        time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"gave up after {attempts} attempts: {last}")


def _expected_length(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None
