"""Boxes from a training setup: a datamodule or dataset that describes its own boxes.

Two protocols are understood, tried in this order on each object:

1. a method ``autoanchor_boxes()`` returning a :class:`~lightning_autoanchor.boxes.BoxSet` of the
   training boxes (build it with :meth:`BoxSet.from_normalized` from image sizes and normalised
   box sizes, or with ``BoxSet(...)`` from pixel sizes);
2. YOLOv5-style dataset attributes: ``shapes``, an ``(M, 2)`` array of image widths and heights in
   pixels, and ``labels``, a list of ``M`` arrays ``(n, 5)`` of ``class, x, y, w, h`` normalised.

A ``torch.utils.data.ConcatDataset`` is searched part by part.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError


def boxes_from_yolov5_dataset(dataset: Any) -> BoxSet:
    """A :class:`BoxSet` from a dataset with YOLOv5's ``shapes`` and ``labels`` attributes."""
    name = type(dataset).__name__
    shapes = np.asarray(dataset.shapes, dtype=np.float64)
    labels = list(dataset.labels)
    if shapes.ndim != 2 or shapes.shape[1] != 2 or len(labels) != len(shapes):
        raise DataError(f"{name}: 'shapes' must be (images, 2) and 'labels' one array per image; got shapes "
                        f"{shapes.shape} and {len(labels)} label arrays")
    xywh, index = [], []
    for i, label in enumerate(labels):
        label = np.asarray(label, dtype=np.float64)
        if label.size == 0:
            label = label.reshape(0, 5)
        if label.ndim != 2 or label.shape[1] < 5:
            raise DataError(f"{name}: labels[{i}] has shape {label.shape}; expected (n, 5): class, x, y, w, h")
        xywh.append(label[:, 1:5])
        index.append(np.full(len(label), i))
    names = tuple(str(f) for f in getattr(dataset, "im_files", ())) or ()
    rows = np.concatenate(xywh) if xywh else np.zeros((0, 4))
    return BoxSet.from_normalized(shapes, rows[:, 2:], np.concatenate(index) if index else np.zeros(0, np.int64),
                                  xy_normalized=rows[:, :2],
                                  image_names=names if len(names) == len(shapes) else (), source=name)


def _datasets(obj: Any) -> Iterable[Any]:
    """``obj``, and for a ConcatDataset its parts."""
    parts = getattr(obj, "datasets", None)
    if isinstance(parts, list | tuple) and type(obj).__name__ == "ConcatDataset":
        for part in parts:
            yield from _datasets(part)
    else:
        yield obj


def boxes_of(obj: Any) -> BoxSet | None:
    """The boxes ``obj`` (datamodule or dataset) describes by one of the protocols, or ``None``."""
    sets = []
    for part in _datasets(obj):
        describe = getattr(part, "autoanchor_boxes", None)
        if callable(describe):
            boxes = describe()
            if not isinstance(boxes, BoxSet):
                raise DataError(f"{type(part).__name__}.autoanchor_boxes() must return a BoxSet, got "
                                f"{type(boxes).__name__}")
            sets.append(boxes)
        elif hasattr(part, "shapes") and hasattr(part, "labels"):
            sets.append(boxes_from_yolov5_dataset(part))
        else:
            return None
    if not sets:
        return None
    return sets[0] if len(sets) == 1 else BoxSet.concat(sets)
