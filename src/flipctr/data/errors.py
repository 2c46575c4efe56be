"""Errors raised by the data stage: one clear message naming the file/column/row at fault."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data (a raw file, a schema, a split)."""


class SourceError(RuntimeError):
    """A data source could not be reached or gave files that fail verification."""


@contextlib.contextmanager
def cache_file(path: Path, folder: Path) -> Iterator[Path]:
    """Reading ``path``, a file of the cache ``folder``: a damaged or missing file (truncated,
    bad bytes, deleted) is one DataError naming it and how to rebuild the folder, never a
    half-read array."""
    try:
        yield path
    except DataError:
        raise
    except (ValueError, OSError, EOFError, KeyError) as err:
        raise DataError(f"{path}: damaged cache file ({type(err).__name__}: {err}); delete {folder} and run "
                        "the command again to rebuild it") from err
