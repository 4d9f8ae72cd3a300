"""Atomic file output: write to a temp file in the same folder, then rename, so no reader sees a partial file; the
commit a result was made at; and text files cut into lines as file formats define them."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def text_lines(text: str) -> list[str]:
    """`text` cut at its line ends only (\\n, \\r\\n, \\r), as csv and pandas read a file. `str.splitlines`
    also cuts at U+0085, U+2028, form feeds and other separators, which real corpora hold inside a sentence (a
    cp1252 ellipsis read as latin-1 is U+0085): a TSV row would fall in two and a paragraph gain a false end."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and not lines[-1] else lines  # like splitlines: no empty line after the last end


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _umask() -> int:
    """The process umask. Linux reports it (/proc/self/status, kernel 4.7+); elsewhere it is read by setting it and
    setting it back, and a thread creating a file in between (a shard writer's pool) would get a world-writable one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode `open()` would give a new file under the current umask (mkstemp's temp files are 0600, which would
    leave results and checkpoints unreadable to the rest of a group)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode `mkdir` would give a new folder under the current umask (mkdtemp's are 0700)."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """`torch.save` that never leaves a truncated checkpoint behind (a killed run keeps the previous file)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | Path, expected: str, raw: bytes | None = None) -> Any:
    """A JSON file we wrote (or its bytes `raw`, already read), parsed; one that does not parse is a ValueError naming
    it and what it should hold."""
    try:
        return json.loads(Path(path).read_bytes() if raw is None else raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected {expected}") from err


def not_a_file(path: str | Path) -> str:
    """Why `path`, expected to be a checkpoint file, is none: it does not exist, or it is a run folder (naming the
    checkpoints inside)."""
    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    inside = [str(path / name) for name in ("final.pt", "best.pt") if (path / name).is_file()]
    return f"is a folder (holding {' and '.join(inside)})" if inside else "is a folder"


def read_torch(path: str | Path, advice: str = "") -> Any:
    """`torch.load` of a file we or fairseq pickled (configs included, hence not weights-only), on the CPU. A file
    that does not unpickle (truncated, not a checkpoint, a class from a package not installed) is a ValueError that
    names it, with `advice` on what to do."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise ValueError(f"{path}: unpickling needs the `{err.name}` package (pip install {err.name})") from err
    except Exception as err:  # zip/pickle errors of every kind: EOFError, UnpicklingError, RuntimeError...
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err}){advice}") from err


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write` on a temp file next to `path`, flush it to disk, then rename it over `path`; on any failure the
    temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_commit(package: str | Path) -> str:
    """HEAD of the checkout holding `package`, with "-dirty" when tracked files under it differ from HEAD (the
    results would not be reproducible from the commit alone); "unknown" when git does not track the package (not a
    checkout, or an installed copy inside some other repository's untracked venv). Only the package's own files
    count: a pipeline run rewrites the tracked results/ and dvc.lock as it goes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, text=True, check=True,
                              cwd=package).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


# Read once, when d2v is imported: a job records the commit of the code it loaded, not the HEAD of the checkout
# when it finishes (a long benchmark may outlive several commits).
_COMMIT = read_commit(Path(__file__).resolve().parent)


def git_commit() -> str:
    """The commit of the d2v code this process runs, recorded in every result JSON."""
    return _COMMIT


def short_commit(commit: str) -> str:
    """The commit's first 10 hex digits, keeping its "-dirty" mark."""
    head, dirty, _ = commit.partition("-dirty")
    return head[:10] + dirty
