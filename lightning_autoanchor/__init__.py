"""lightning-autoanchor: fit detection anchors to your dataset, at fit start or from the command line.

Import what you need from here; heavy modules (torch, Lightning) load on first use, so the
command-line tool and worker processes start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AutoAnchor": "lightning_autoanchor.callback",
    "BoxSet": "lightning_autoanchor.boxes",
    "AnchorResult": "lightning_autoanchor.optimizer",
    "fit_anchors": "lightning_autoanchor.optimizer",
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

__all__ = [
    "AnchorFitError",
    "AnchorResult",
    "AnchorScores",
    "AutoAnchor",
    "AutoAnchorError",
    "BoxSet",
    "ConfigError",
    "DataError",
    "DataWarning",
    "HeadError",
    "anchor_fitness",
    "anchors_above_threshold",
    "average_iou",
    "best_possible_recall",
    "fit_anchors",
    "load_boxes",
    "ratio_metric",
    "score_anchors",
    "wh_iou",
]

if TYPE_CHECKING:
    from lightning_autoanchor.boxes import BoxSet
    from lightning_autoanchor.callback import AutoAnchor
    from lightning_autoanchor.errors import AnchorFitError, AutoAnchorError, ConfigError, DataError, HeadError
    from lightning_autoanchor.metrics import (
        AnchorScores,
        anchor_fitness,
        anchors_above_threshold,
        average_iou,
        best_possible_recall,
        ratio_metric,
        score_anchors,
        wh_iou,
    )
    from lightning_autoanchor.optimizer import AnchorResult, fit_anchors
    from lightning_autoanchor.sources import DataWarning, load_boxes


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_autoanchor' has no attribute {name!r}")
