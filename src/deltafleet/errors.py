"""Errors that name the offending file, field or rule.

Every error deltafleet raises for bad input is a subclass of `ValueError`, so callers that already catch
`ValueError` keep working, and its message names what was wrong and where.
"""

from __future__ import annotations

from pathlib import Path


class DeltafleetError(ValueError):
    """Base class of deltafleet's input errors."""


class ArtifactError(DeltafleetError):
    """A file on disk (checkpoint, adapter, manifest) is malformed, truncated, unsafe or inconsistent."""

    def __init__(self, path: str | Path, rule: str):
        self.path = str(path)
        self.rule = rule
        super().__init__(f"{self.path}: {rule}")


class UnsupportedModelError(DeltafleetError):
    """A checkpoint that is not of the Llama family deltafleet implements."""
