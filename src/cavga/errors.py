"""cavga's own exception types: every bad input names the file or value and the problem."""

from __future__ import annotations


class CavgaError(Exception):
    """Base class of every error cavga raises on purpose."""


class DataError(CavgaError):
    """A dataset, image or mask cannot be used as given (the message names the path and the problem)."""


class ConfigError(CavgaError, ValueError):
    """A parameter or saved configuration has a value cavga cannot use (the message names it)."""


class ModelFileError(CavgaError):
    """A saved model directory or weights file is missing, incomplete or does not match its config."""
