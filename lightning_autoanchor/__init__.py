"""lightning-autoanchor: fit detection anchors to your dataset, at fit start or from the command line.

Import what you need from here; each name loads its module (and torch, Lightning) on first use, so
the command-line tool and reader worker processes start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AutoAnchor": "lightning_autoanchor.callback",
    "AnchorSettings": "lightning_autoanchor.settings",
    "BoxSet": "lightning_autoanchor.boxes",
    "AnchorResult": "lightning_autoanchor.optimizer",
    "fit_anchors": "lightning_autoanchor.optimizer",
    "AnchorUpdate": "lightning_autoanchor.refit",
    "refit_anchors": "lightning_autoanchor.refit",
    "restore_anchors": "lightning_autoanchor.restore",
    "AnchorScores": "lightning_autoanchor.metrics",
    "score_anchors": "lightning_autoanchor.metrics",
    "ratio_metric": "lightning_autoanchor.metrics",
    "wh_iou": "lightning_autoanchor.metrics",
    "best_possible_recall": "lightning_autoanchor.metrics",
    "anchors_above_threshold": "lightning_autoanchor.metrics",
    "anchor_fitness": "lightning_autoanchor.metrics",
    "average_iou": "lightning_autoanchor.metrics",
    "load_boxes": "lightning_autoanchor.sources",
    "DataWarning": "lightning_autoanchor.sources",
    "AutoAnchorError": "lightning_autoanchor.errors",
    "DataError": "lightning_autoanchor.errors",
    "AnchorFitError": "lightning_autoanchor.errors",
    "HeadError": "lightning_autoanchor.errors",
    "ConfigError": "lightning_autoanchor.errors",
}
"""Each public name and the module that defines it: the package's whole surface, listed once."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_autoanchor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
