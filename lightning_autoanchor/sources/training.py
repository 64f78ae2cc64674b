"""What a training setup says about its boxes: the box set, the training image size, the train dataset.

The callback asks here, in this order: ``AutoAnchor(annotations=...)``, the datamodule, the train
dataset. Two protocols are understood, tried in this order on each datamodule or dataset:

1. a method ``autoanchor_boxes()`` returning a :class:`~lightning_autoanchor.boxes.BoxSet` of the
   training boxes (build it with :meth:`BoxSet.from_normalized` from image sizes and normalised
   box sizes, or with ``BoxSet(...)`` from pixel sizes);
2. YOLOv5-style dataset attributes: ``shapes``, an ``(M, 2)`` array of image widths and heights in
   pixels, and ``labels``, a list of ``M`` arrays ``(n, 5)`` of ``class, x, y, w, h`` normalised.

A ``torch.utils.data.ConcatDataset`` is searched part by part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import ConfigError, DataError

__all__ = ["boxes_from_yolov5_dataset", "boxes_of", "train_dataset", "training_boxes", "training_img_size"]


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


def train_dataset(trainer: Any) -> Any:
    """The dataset of the trainer's training dataloader, asking the datamodule or module for it; ``None``
    when it cannot be had yet.

    Version-fragile: Lightning has no public way to reach the train dataloader before the fit loop
    builds it, so this uses ``trainer.fit_loop._data_source`` (Lightning 2.x), and gives ``None`` where
    that attribute is missing or the dataloader hook cannot run yet.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    try:
        loaders = source.dataloader() if source is not None and source.is_defined() else None
    except Exception:  # a dataloader hook that cannot run yet: the other sources still apply
        return None
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


def training_boxes(trainer: Any, read_annotations: Callable[[], BoxSet] | None = None) -> BoxSet:
    """The training boxes: ``read_annotations()`` when given, else what the datamodule, then the train
    dataset, describe (see module doc); the dataset is asked for only when the datamodule says nothing."""
    if read_annotations is not None:
        return read_annotations()
    for source in (lambda: trainer.datamodule, lambda: train_dataset(trainer)):
        found = source()
        boxes = boxes_of(found) if found is not None else None
        if boxes is not None:
            return boxes
    raise DataError("AutoAnchor found no training boxes: it looked for AutoAnchor(annotations=...), a datamodule "
                    "method autoanchor_boxes(), and a train dataset with autoanchor_boxes() or YOLOv5-style "
                    "'shapes' and 'labels' attributes. Add one of these (see the README).")


def training_img_size(trainer: Any, configured: float | tuple[float, float] | None,
                      warn: Callable[[str], Any]) -> float | tuple[float, float]:
    """The training image size: ``configured`` (the callback's setting), else the datamodule's
    ``img_size`` attribute; ``warn`` is told when both are given and differ. A configured ``(width, height)``
    pair is returned as it is."""
    if isinstance(configured, tuple):
        return configured
    declared = getattr(trainer.datamodule, "img_size", None)
    if isinstance(declared, bool) or not isinstance(declared, int | float):
        declared = None
    if configured is None and declared is None:
        raise ConfigError("AutoAnchor needs the training image size: set AutoAnchor(img_size=...) or give the "
                          "datamodule an 'img_size' attribute")
    if configured is not None and declared is not None and not math.isclose(configured, declared):
        warn(f"AutoAnchor(img_size={configured:g}) differs from the datamodule's img_size {declared:g}: "
             f"anchors are fitted for {configured:g} px images; they must match the size the model trains at.")
    return float(configured if configured is not None else declared)
