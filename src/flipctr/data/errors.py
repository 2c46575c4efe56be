"""Errors raised by the data stage: one clear message naming the file/column/row at fault."""


class DataError(ValueError):
    """Bad or missing input data (a raw file, a schema, a split)."""


class SourceError(RuntimeError):
    """A data source could not be reached or gave files that fail verification."""
