"""Exceptions raised by lightning-autoanchor.

Every error says which file, image, box, module or value is at fault and what to do about it.
"""

from __future__ import annotations

__all__ = ["AnchorFitError", "AutoAnchorError", "ConfigError", "DataError", "HeadError"]


class AutoAnchorError(Exception):
    """Base class of every error this library raises on purpose."""


class DataError(AutoAnchorError, ValueError):
    """An annotation file, folder or box set cannot be used (names the file and line at fault)."""


class AnchorFitError(AutoAnchorError, ValueError):
    """Anchors cannot be fitted to the given boxes (e.g. an empty box set)."""


class HeadError(AutoAnchorError, ValueError):
    """The detection head or its anchors cannot be found, read or written."""


class ConfigError(AutoAnchorError, ValueError):
    """An argument of the callback, the optimiser or the CLI is out of range."""
