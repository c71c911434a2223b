"""Errors that mean the user gave vglaw something it cannot use.

Every command reports a `UserError` as one line naming the file, field, id or value and what
to do, and exits with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave: a file, a field, an id, a value."""


class UsageError(UserError, ValueError):
    """A value or combination of settings vglaw cannot use."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user must provide is not there."""


class UnsafeFileError(UserError, ValueError):
    """A file that could only be opened by running code from it, or that is not what it claims."""


class ModelOutputError(UserError, RuntimeError):
    """A model whose outputs are not numbers (NaN or infinity): its results are never written."""


class OutputError(UserError, OSError):
    """An output could not be written (a full disk, a vanished or read-only folder); the message
    says where the work done so far is, when it was kept."""
