"""Detection levels: how many anchors each level holds, its stride, size limits per level, who owns the boxes.

Anchors of a multi-level head are laid out as everywhere in this package: sorted by area, small to
large, over the levels in stride order (the finest level gets the smallest anchors). A head's
levels may hold different numbers of anchors (``levels=(3, 3, 4)``).

All sizes are pixels at the training size; ``anchors`` is a ``(K, 2)`` float tensor of widths and
heights, ``wh`` an ``(N, 2)`` one of box sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.metrics import Metric, match_quality

__all__ = [
    "Levels",
    "SizeFloor",
    "anchor_levels",
    "default_strides",
    "level_counts",
    "level_shares",
    "level_strides",
    "size_floor",
]

Levels = int | Sequence[int]
"""A number of levels holding equal shares of the anchors, or the anchor count of each level."""

_FLOOR_MARGIN = 1e-6
"""Log-size margin that keeps ``exp`` round-off from leaving an anchor a hair under its limit."""


def default_strides(levels: int) -> list[int]:
    """Strides of detection levels P3, P4, ... (8, 16, 32, ...), as in YOLO configs."""
    return [8 * 2**i for i in range(levels)]


def level_counts(n: int | None, levels: Levels | None = None) -> tuple[int, ...]:
    """Anchors per level, in the order the levels are given.

    Args:
        n: anchors in all (``None``: the sum of ``levels`` when it is a sequence).
        levels: a number of levels sharing ``n`` equally, or the count of each level;
            ``None``: 3 levels when ``n`` divides by 3, else 1 (YOLO's P3-P5 heads hold 3 x 3).

    Raises:
        ConfigError: counts that are not positive integers, or that do not add up to ``n``.
    """
    if levels is not None and not isinstance(levels, int):
        counts = tuple(levels)
        if not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise ConfigError(f"levels must be positive integers (anchors per level), got {list(counts)}")
        if n is not None and sum(counts) != n:
            raise ConfigError(f"levels {list(counts)} hold {sum(counts)} anchors, but n is {n}")
        return counts
    if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (number of anchors) must be a positive integer, got {n!r}")
    if levels is None:
        levels = 3 if n % 3 == 0 else 1
    if isinstance(levels, bool) or levels < 1:
        raise ConfigError(f"levels must be a positive number of levels or a list of counts, got {levels!r}")
    if n % levels:
        raise ConfigError(f"{n} anchors cannot be split evenly over {levels} levels: give n as a multiple of "
                          f"{levels}, or the count of each level (e.g. levels=(3, 3, 4))")
    return (n // levels,) * levels


def level_strides(counts: Sequence[int], strides: Sequence[float] | None = None) -> tuple[float, ...]:
    """The stride of each of the ``len(counts)`` levels: ``strides`` checked, or 8, 16, 32, ...

    Raises:
        ConfigError: not one positive finite stride per level.
    """
    values = tuple(float(s) for s in (strides if strides is not None else default_strides(len(counts))))
    if len(values) != len(counts):
        raise ConfigError(f"{len(counts)} levels need {len(counts)} strides, got {list(values)}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ConfigError(f"strides must be positive numbers of pixels, got {list(values)}")
    return values


def anchor_levels(counts: Sequence[int], strides: Sequence[float] | None = None) -> Tensor:
    """``(K,)`` int64 level of each anchor sorted by area (``K = sum(counts)``).

    The levels are filled in stride order (ties: as given); ``counts`` and ``strides`` (default
    8, 16, 32, ...) are in the same order, and the returned numbers index them.
    """
    order = sorted(range(len(counts)), key=level_strides(counts, strides).__getitem__)
    return torch.tensor([level for level in order for _ in range(counts[level])], dtype=torch.int64)


@dataclass(frozen=True)
class SizeFloor:
    """Smallest size ``sqrt(w * h)`` of each anchor by area rank: the per-level limits of a fit.

    Attributes:
        log_floor: ``(K,)`` float32, non-decreasing: the ``i``-th smallest anchor (by area) must
            have ``log sqrt(w h) >= log_floor[i]``.
    """

    log_floor: Tensor

    def project(self, log_anchors: Tensor) -> Tensor:
        """The nearest anchor sets within the limits, scaling up (aspect ratio kept) those under theirs.

        ``log_anchors``: ``(..., K, 2)`` log widths and heights, in any order; returned in the same
        order. Scaling an anchor up to its rank's limit keeps every anchor's area rank (the limits
        grow with the rank), so the result is within the limits.
        """
        size = log_anchors.mean(dim=-1)  # log sqrt(w h)
        order = size.argsort(dim=-1, stable=True)
        lift = (self.log_floor - size.gather(-1, order)).clamp(min=0)
        return log_anchors + torch.zeros_like(size).scatter(-1, order, lift)[..., None]

    def allows(self, log_anchors: Tensor) -> Tensor:
        """``(...,)`` bool: whether each ``(..., K, 2)`` set of log anchor sizes is within the limits."""
        size = log_anchors.mean(dim=-1).sort(dim=-1).values
        return (size >= self.log_floor - 1e-5).all(dim=-1)


def size_floor(counts: Sequence[int], min_stride_ratio: float, strides: Sequence[float] | None = None) -> SizeFloor:
    """Limits keeping each anchor's ``sqrt(w * h)`` at or above ``min_stride_ratio`` times its level's stride.

    Args:
        counts: anchors per level, in the order of ``strides``.
        min_stride_ratio: the smallest anchor size as a multiple of its level's stride (1.0: no
            anchor under 8 px on the stride-8 level, under 16 px on the stride-16 level, ...).
        strides: pixels per cell of each level (default 8, 16, 32, ...).
    """
    strides_t = torch.tensor(level_strides(counts, strides), dtype=torch.float64)
    if not (math.isfinite(min_stride_ratio) and min_stride_ratio > 0):
        raise ConfigError(f"min_stride_ratio must be a positive number (e.g. 1.0), got {min_stride_ratio}")
    bound = strides_t[anchor_levels(counts, strides)] * min_stride_ratio
    return SizeFloor((bound.log() + _FLOOR_MARGIN).to(torch.float32))


def level_shares(wh: Tensor, anchors: Tensor, anchor_level: Tensor, metric: Metric = "ratio") -> Tensor:
    """``(L,)`` share of boxes whose best anchor sits on each level (summing to 1).

    Args:
        wh: ``(N, 2)`` box widths and heights, ``N >= 1``.
        anchors: ``(K, 2)`` anchors in any order (e.g. sorted by area, or a head's levels flattened).
        anchor_level: ``(K,)`` int level of each anchor, ``0 .. L - 1`` (e.g. :func:`anchor_levels`).
        metric: which match quality picks a box's best anchor (``"ratio"`` or ``"iou"``).

    A box's best anchor is the one of highest match quality, matched or not; a level owning no box
    gets 0.
    """
    if wh.ndim != 2 or len(wh) == 0 or anchor_level.shape != (len(anchors),):
        raise ConfigError(f"level_shares needs (N >= 1, 2) boxes and one level per anchor, got {tuple(wh.shape)} "
                          f"boxes, {len(anchors)} anchors and {tuple(anchor_level.shape)} levels")
    n_levels = int(anchor_level.max()) + 1
    anchor_level = anchor_level.to(device=wh.device, dtype=torch.int64)
    anchors = anchors.to(device=wh.device, dtype=torch.float32)
    owners = torch.zeros(n_levels, dtype=torch.float64, device=wh.device)
    for chunk in wh.split(1 << 16):
        best = match_quality(chunk.to(torch.float32), anchors, metric).argmax(dim=1)
        owners += torch.bincount(anchor_level[best], minlength=n_levels).to(torch.float64)
    return (owners / len(wh)).to(device="cpu", dtype=torch.float32)
