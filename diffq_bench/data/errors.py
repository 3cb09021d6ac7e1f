"""Errors raised by the dataset readers (and by tasks about their data).

Kept at the bottom of the dependency graph: every reader and every task imports them from here.
"""


class DataMissingError(FileNotFoundError):
    """A dataset is not where the config says: the message names the path and how to prepare it."""


class DataCorruptError(ValueError):
    """A dataset file exists but is not what it should be (checksum, format, shape, encoding)."""


class DataChangedError(ValueError):
    """A run's data changed since it was trained: its result or checkpoint is not reused."""
