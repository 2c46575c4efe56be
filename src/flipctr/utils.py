"""Small helpers shared by every stage: atomic writes, checksums, where data lives."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _temp_prefix(path: Path) -> str:
    """A temporary sibling's name prefix naming its host and process, so that one left by a
    killed process can be told from one still being written (:func:`_sweep_stale`)."""
    return f".{path.name}.{platform.node()}.{os.getpid()}."


def _sweep_stale(path: Path) -> None:
    """Remove the temporary siblings of ``path`` that processes of this host, now dead, left."""
    host = platform.node()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}.*.tmp"):
        pid = stale.name[len(f".{path.name}.{host}."):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _naming_write_errors(path: Path) -> Iterator[None]:
    """A file system error while ``path`` is written (a full disk often surfaces as a short
    write, without errno) names ``path`` and the space left on its disk."""
    try:
        yield
    except OSError as err:
        free = shutil.disk_usage(path.parent).free / 2**20
        message = f"writing {path} failed ({err}); {free:.1f} MiB free on its disk; nothing was written there"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming_write_errors(path):
            yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.
    ``replace=False`` (a cache whose name is its content's key): when another process finished
    the same folder first, that one stays (a reader may be using it) and this one is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        with _naming_write_errors(path):
            yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)  # fails if another process made ``path`` meanwhile
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def data_home() -> Path:
    """Where raw data and caches live: ``$FLIPCTR_DATA`` or ``~/.cache/flipctr/data``."""
    return Path(os.environ.get("FLIPCTR_DATA", Path.home() / ".cache" / "flipctr" / "data")).expanduser()
