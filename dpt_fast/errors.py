"""Exceptions of dpt_fast that are neither bad input (``ValueError`` and friends) nor bugs,
and one that is bad input in the user's files (``ImageReadError``)."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class RunFolderBusy(RuntimeError):
    """Another process holds the output folder's lock."""


class ImageReadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""
