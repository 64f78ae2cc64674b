"""Where boxes land at the input of a torchvision detector: the geometry of ``GeneralizedRCNNTransform``.

torchvision's detectors resize every image in their own ``transform`` (torchvision 0.28,
``models/detection/transform.py``):

* **scale**: ``s = min(min_size / shorter side, max_size / longer side)``; the resized image is
  ``floor(side * s)`` pixels on each side (``interpolate(scale_factor=s, recompute_scale_factor=True)``),
  computed in float64 as torchvision does, so sizes come out exactly as the model's;
* **fixed size**: with ``fixed_size=(w, h)`` (SSD: 300 x 300) every image is stretched to exactly that;
* **boxes** are scaled by ``resized / original`` along each axis (torchvision multiplies in float32; this
  module in float64: the two differ by under 1e-6 of a box's size);
* **random size in training**: ``min_size`` may be a tuple; in training each image takes one of its
  values at random, each equally likely, and in evaluation the last one. Boxes are therefore
  resized once per value of the tuple, each copy weighted ``1 / len(min_size)``;
* **padding**: images are padded on the right and bottom to a multiple of ``size_divisible`` (32 for
  the R-CNN family and RetinaNet, 1 for SSD). torchvision pads every image of a batch to the batch's
  largest size; this module pads each image on its own (a batch of one), the size a model sees for
  an image whatever its batch mates, and the anchor grid the model lays over it.

Pure NumPy (no torch): box sets are NumPy arrays, and these are cheap elementwise operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import ConfigError, DataError

__all__ = ["DetectorResize", "ResizedBoxes", "padded_sizes", "resize_boxes", "resized_sizes"]


@dataclass(frozen=True)
class DetectorResize:
    """The resize settings of a torchvision detector's ``GeneralizedRCNNTransform``.

    Attributes:
        min_size: shorter-side target(s) in pixels; in training one is drawn per image (each equally likely).
        max_size: cap on the longer side in pixels.
        size_divisible: images are padded to a multiple of this (pixels).
        fixed_size: ``(width, height)`` every image is stretched to, or ``None`` (then ``min_size`` and
            ``max_size`` apply).
    """

    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    size_divisible: int = 32
    fixed_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        min_size = tuple(self.min_size) if isinstance(self.min_size, Sequence) else (self.min_size,)
        object.__setattr__(self, "min_size", min_size)
        if not min_size or not all(_positive(v) for v in min_size):
            raise ConfigError(f"min_size must be a positive number of pixels or a non-empty tuple of them, "
                              f"got {self.min_size!r}")
        if not _positive(self.max_size):
            raise ConfigError(f"max_size must be a positive number of pixels, got {self.max_size!r}")
        if not (isinstance(self.size_divisible, int) and self.size_divisible >= 1):
            raise ConfigError(f"size_divisible must be a positive integer, got {self.size_divisible!r}")
        if self.fixed_size is not None:
            fixed = tuple(self.fixed_size)
            if len(fixed) != 2 or not all(isinstance(v, int) and v >= 1 for v in fixed):
                raise ConfigError(f"fixed_size must be (width, height) in whole pixels, got {self.fixed_size!r}")
            object.__setattr__(self, "fixed_size", fixed)

    def min_sizes(self, training: bool = True) -> tuple[int, ...]:
        """The ``min_size`` values images are resized with: all in training, the last in evaluation."""
        return self.min_size if training else self.min_size[-1:]


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def resized_sizes(image_wh: np.ndarray, min_size: float, max_size: float,
                  fixed_size: tuple[int, int] | None = None) -> np.ndarray:
    """Image sizes after torchvision's resize.

    Args:
        image_wh: ``(M, 2)`` widths and heights of the original images in pixels.
        min_size: shorter-side target (pixels).
        max_size: longer-side cap (pixels).
        fixed_size: ``(width, height)`` to stretch to instead, or ``None``.

    Returns:
        ``(M, 2)`` int64 widths and heights in pixels: ``floor(side * min(min_size / shorter,
        max_size / longer))``, or ``fixed_size`` for every image.
    """
    image_wh = np.asarray(image_wh, dtype=np.float64).reshape(-1, 2)
    if fixed_size is not None:
        return np.tile(np.asarray(fixed_size, dtype=np.int64), (len(image_wh), 1))
    scale = np.minimum(float(min_size) / image_wh.min(axis=1), float(max_size) / image_wh.max(axis=1))
    return np.floor(image_wh * scale[:, None]).astype(np.int64)


def padded_sizes(resized_wh: np.ndarray, size_divisible: int = 32) -> np.ndarray:
    """``(M, 2)`` int64 sizes of ``(M, 2)`` resized images padded up to a multiple of ``size_divisible``."""
    resized_wh = np.asarray(resized_wh, dtype=np.int64).reshape(-1, 2)
    return -(-resized_wh // size_divisible) * size_divisible


def resize_boxes(xy: np.ndarray, wh: np.ndarray, image_index: np.ndarray, image_wh: np.ndarray,
                 resized_wh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box centres and sizes in pixels of the resized images (scaled by ``resized / original`` per axis).

    Args:
        xy: ``(N, 2)`` box centres in pixels of their original image.
        wh: ``(N, 2)`` box widths and heights in the same pixels.
        image_index: ``(N,)`` the image of each box.
        image_wh: ``(M, 2)`` original image sizes in pixels.
        resized_wh: ``(M, 2)`` resized image sizes in pixels.

    Returns:
        ``(N, 2)`` float64 centres and ``(N, 2)`` float64 sizes in pixels of the resized images.
    """
    factors = (np.asarray(resized_wh, dtype=np.float64) / np.asarray(image_wh, dtype=np.float64))[image_index]
    return np.asarray(xy, dtype=np.float64) * factors, np.asarray(wh, dtype=np.float64) * factors


@dataclass(frozen=True, eq=False)
class ResizedBoxes:
    """Boxes at the input of a detector: one copy of every box per ``min_size`` value used.

    Attributes:
        xy: ``(K, 2)`` float64 box centres in pixels of the resized image.
        wh: ``(K, 2)`` float64 box widths and heights in the same pixels.
        weight: ``(K,)`` float64 weight of each copy (``1 / number of min_size values``): weights sum to
            the number of source boxes.
        box: ``(K,)`` int64 row of each copy in the source :class:`BoxSet`.
        image: ``(K,)`` int64 row of ``padded`` (an image at one ``min_size``) each copy belongs to.
        resized: ``(J, 2)`` int64 sizes of the resized images (``J``: images x min_size values).
        padded: ``(J, 2)`` int64 sizes of the resized images padded to ``size_divisible``.
    """

    xy: np.ndarray
    wh: np.ndarray
    weight: np.ndarray
    box: np.ndarray
    image: np.ndarray
    resized: np.ndarray
    padded: np.ndarray

    @classmethod
    def of(cls, box_set: BoxSet, resize: DetectorResize, training: bool = True) -> ResizedBoxes:
        """Resize ``box_set`` as the detector does (every ``min_size`` value in training, the last otherwise).

        Raises:
            DataError: the box set has no box centres.
        """
        if box_set.xy is None:
            where = f" from {box_set.source}" if box_set.source else ""
            raise DataError(f"the box set{where} has no box centres; anchors placed on a grid are measured from "
                            "the boxes' positions: read the boxes with a reader that gives them (COCO, YOLO, VOC) "
                            "or build the BoxSet with xy=...")
        sizes = resize.min_sizes(training)
        n, m = len(box_set), box_set.num_images
        parts_xy, parts_wh, resized = [], [], []
        for min_size in sizes:
            image_resized = resized_sizes(box_set.image_sizes, min_size, resize.max_size, resize.fixed_size)
            xy, wh = resize_boxes(box_set.xy, box_set.wh, box_set.image_index, box_set.image_sizes, image_resized)
            parts_xy.append(xy)
            parts_wh.append(wh)
            resized.append(image_resized)
        resized_all = np.concatenate(resized) if resized else np.zeros((0, 2), np.int64)
        return cls(
            xy=np.concatenate(parts_xy),
            wh=np.concatenate(parts_wh),
            weight=np.full(n * len(sizes), 1.0 / len(sizes)),
            box=np.tile(np.arange(n, dtype=np.int64), len(sizes)),
            image=np.concatenate([box_set.image_index + k * m for k in range(len(sizes))]),
            resized=resized_all,
            padded=padded_sizes(resized_all, resize.size_divisible),
        )
