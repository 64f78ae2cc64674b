"""The placed measure: how well anchors match boxes where an IoU-matching detector really puts them.

Heads that assign targets by IoU (torchvision's RetinaNet, Faster R-CNN's RPN, SSD) lay every cell
anchor of a level at every point of that level's grid: anchor centres at ``(i + offset) * stride``
for ``i = 0 .. grid - 1`` along each axis (``offset`` 0 for torchvision's ``AnchorGenerator``, 0.5 for
SSD's ``DefaultBoxGenerator``). A box is a foreground target when its IoU with some anchor reaches
the matcher's threshold (torchvision's ``Matcher``: ``IoU >= high_threshold``); a box whose best IoU
is below it is matched only by the low-quality fallback (``allow_low_quality_matches``), to its best
anchor whatever the IoU (when above 0).

**Exact best IoU in (boxes x cell anchors).** Fix a box (centre ``c``, size ``w x h``) and a cell
anchor (size ``a_w x a_h``) centred at ``c + (dx, dy)``. The overlap along x is
``I_x = clamp(min(w, a_w, (w + a_w) / 2 - |dx|), 0)``, a non-increasing function of ``|dx|`` alone;
likewise ``I_y`` of ``|dy|``. The IoU is ``I / (w h + a_w a_h - I)`` with ``I = I_x I_y``, increasing in
``I`` (the areas are fixed), so it is separable in the two axes and non-increasing in ``|dx|`` and in
``|dy|``. The grid points are a product of one set of x positions and one set of y positions, so
the anchor position that maximises the IoU is the grid position nearest to the box centre along x
together with the one nearest along y (clamped to the grid; ties between two equally near points
give equal IoUs). That position does not depend on the anchor, so each box needs one offset
``(|dx|, |dy|)`` per level, and its best IoU over every anchor the model generates is the best over
the cell anchors at those offsets: ``(boxes x cell anchors)`` work instead of ``(boxes x all anchors)``.

The nearest grid point lies within half a stride of the centre, so boxes much smaller than the
stride may not reach the threshold with any anchor shape: a level cannot serve boxes far below its
stride, which the centred (width/height) measure cannot see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_autoanchor.boxes import MIN_FIT_SIZE, BoxSet
from lightning_autoanchor.detector_resize import DetectorResize, ResizedBoxes
from lightning_autoanchor.errors import ConfigError

__all__ = [
    "Layout",
    "PlacedBoxes",
    "PlacedScores",
    "best_placed_iou",
    "check_iou_threshold",
    "nearest_offsets",
    "place_boxes",
    "placed_iou",
    "placed_scores",
]

Layout = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``padded_wh (P, 2) int -> (grids (P, L, 2) int, strides (P, L, 2) float)``: for each padded input size
(width, height in pixels), the grid size (cells along x, y) and the stride (pixels along x, y) of
every level, as the model computes them."""

_CHUNK = 1 << 16


def check_iou_threshold(thr: float) -> float:
    """``thr`` as a float, or :class:`ConfigError` unless it is an IoU in ``(0, 1]``."""
    if not (isinstance(thr, int | float) and 0.0 < float(thr) <= 1.0):
        raise ConfigError(f"the IoU threshold must be in (0, 1] (RetinaNet and SSD use 0.5, Faster R-CNN's RPN "
                          f"0.7), got {thr!r}")
    return float(thr)


def nearest_offsets(xy: Tensor, grids: Tensor, strides: Tensor, offsets: Tensor) -> Tensor:
    """Distance from each box centre to the nearest anchor centre of each level, along each axis.

    Args:
        xy: ``(N, 2)`` box centres in pixels of the network input.
        grids: ``(N, L, 2)`` grid size of each level (cells along x, y) for the image of each box.
        strides: ``(N, L, 2)`` stride of each level (pixels along x, y) for the image of each box.
        offsets: ``(L,)`` position of the first anchor centre of each level, as a fraction of the stride.

    Returns:
        ``(N, L, 2)`` float32 ``|dx|, |dy|`` in pixels.
    """
    xy = xy.to(torch.float64)[:, None, :]
    strides = strides.to(torch.float64)
    offsets = offsets.to(torch.float64)[None, :, None]
    cell = torch.round(xy / strides - offsets)
    cell = torch.minimum(cell.clamp(min=0), grids.to(torch.float64) - 1)
    return (xy - (cell + offsets) * strides).abs().to(torch.float32)


def placed_iou(wh: Tensor, dxy: Tensor, anchors: Tensor) -> Tensor:
    """IoU of each box with each anchor whose centre is ``dxy`` away from the box's centre.

    Args:
        wh: ``(N, 2)`` box widths and heights (pixels).
        dxy: ``(N, 2)`` ``|dx|, |dy|`` from each box's centre to the anchors' centre (pixels).
        anchors: ``(A, 2)`` anchor widths and heights (pixels).

    Returns:
        ``(N, A)`` IoUs in ``[0, 1]``.
    """
    w, h = wh[:, 0:1], wh[:, 1:2]
    aw, ah = anchors[:, 0], anchors[:, 1]
    ix = torch.minimum(torch.minimum(w, aw), (w + aw) / 2 - dxy[:, 0:1]).clamp(min=0)
    iy = torch.minimum(torch.minimum(h, ah), (h + ah) / 2 - dxy[:, 1:2]).clamp(min=0)
    inter = ix * iy
    return inter / (w * h + aw * ah - inter)


def best_placed_iou(wh: Tensor, dxy: Tensor, cell_anchors: Sequence[Tensor]) -> Tensor:
    """Best IoU of each box with any anchor on any level's grid.

    Args:
        wh: ``(N, 2)`` box widths and heights at the network input (pixels).
        dxy: ``(N, L, 2)`` offsets to the nearest anchor centre of each level (:func:`nearest_offsets`).
        cell_anchors: ``L`` tensors ``(A_l, 2)``: widths and heights of each level's cell anchors (pixels),
            exactly as the model generates them.

    Returns:
        ``(N,)`` float32 best IoUs; work in chunks of boxes, so memory stays bounded.
    """
    if dxy.ndim != 3 or dxy.shape[1] != len(cell_anchors):
        raise ConfigError(f"{len(cell_anchors)} levels of cell anchors for box offsets of shape {tuple(dxy.shape)}")
    anchors = [a.to(torch.float32) for a in cell_anchors]
    best = torch.zeros(len(wh), dtype=torch.float32)
    for start in range(0, len(wh), _CHUNK):
        part = slice(start, start + _CHUNK)
        for level, a in enumerate(anchors):
            if len(a):
                best[part] = torch.maximum(best[part], placed_iou(wh[part], dxy[part, level], a).amax(dim=1))
    return best


@dataclass(frozen=True)
class PlacedScores:
    """Anchors scored where the model places them (see module doc), exactly on every box.

    Attributes:
        recall: weighted share of boxes whose best IoU with any generated anchor is ``>= thr``.
        mean_best_iou: weighted mean of that best IoU.
        low_quality: weighted share of boxes matched only by the low-quality fallback (``0 < best < thr``).
        n_boxes: number of boxes scored.
        thr: the foreground IoU threshold.
    """

    recall: float
    mean_best_iou: float
    low_quality: float
    n_boxes: int
    thr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def beats(self, other: PlacedScores) -> bool:
        """Strictly better: higher recall, or equal recall and higher mean best IoU."""
        return (self.recall, self.mean_best_iou) > (other.recall, other.mean_best_iou)


def placed_scores(best: Tensor, weight: Tensor, thr: float, n_boxes: int | None = None) -> PlacedScores:
    """:class:`PlacedScores` from ``(N,)`` best IoUs and ``(N,)`` box weights (sums in float64).

    ``n_boxes`` defaults to the sum of the weights, rounded.
    """
    thr = check_iou_threshold(thr)
    weight = weight.to(torch.float64)
    total = float(weight.sum())
    if total <= 0:
        raise ConfigError("cannot score anchors on an empty box set")
    best = best.to(torch.float64)
    matched = best >= thr
    return PlacedScores(
        recall=float((weight * matched).sum()) / total,
        mean_best_iou=float((weight * best).sum()) / total,
        low_quality=float((weight * (~matched & (best > 0))).sum()) / total,
        n_boxes=round(total) if n_boxes is None else n_boxes,
        thr=thr,
    )


@dataclass(frozen=True, eq=False)
class PlacedBoxes:
    """Boxes at the network input with their offsets to the nearest anchor centre of every level.

    Attributes:
        wh: ``(K, 2)`` float32 box widths and heights in pixels of the network input.
        dxy: ``(K, L, 2)`` float32 ``|dx|, |dy|`` from each box's centre to the nearest anchor centre of each
            level (pixels).
        weight: ``(K,)`` float32 weight of each row (a box at one ``min_size`` of a tuple weighs
            ``1 / len(min_size)``).
        n_boxes: number of distinct boxes scored.
        n_dropped: boxes left out for being under :data:`~lightning_autoanchor.boxes.MIN_FIT_SIZE` px on both
            sides at the network input.
    """

    wh: Tensor
    dxy: Tensor
    weight: Tensor
    n_boxes: int
    n_dropped: int = 0

    @property
    def num_levels(self) -> int:
        return int(self.dxy.shape[1])

    def best_iou(self, cell_anchors: Sequence[Tensor]) -> Tensor:
        """``(K,)`` best IoU of every row with the anchors (see :func:`best_placed_iou`)."""
        return best_placed_iou(self.wh, self.dxy, cell_anchors)

    def score(self, cell_anchors: Sequence[Tensor], thr: float) -> PlacedScores:
        """Placed recall at ``thr``, mean best IoU and low-quality share of ``L`` levels of cell anchors."""
        return placed_scores(self.best_iou(cell_anchors), self.weight, thr, self.n_boxes)

    def rows(self, index: Tensor) -> PlacedBoxes:
        """The rows ``index`` (e.g. a subsample), keeping their weights."""
        return PlacedBoxes(self.wh[index], self.dxy[index], self.weight[index], len(index), 0)


def place_boxes(box_set: BoxSet, resize: DetectorResize, layout: Layout, offsets: float | Sequence[float] = 0.0,
                training: bool = True) -> PlacedBoxes:
    """Resize a box set as a torchvision detector does and find each box's nearest anchor centres.

    Args:
        box_set: boxes with centres (``box_set.xy``).
        resize: the detector's resize settings (:class:`~lightning_autoanchor.detector_resize.DetectorResize`).
        layout: grid sizes and strides of every level for padded input sizes (:data:`Layout`); it is
            called once, with every distinct padded size.
        offsets: first anchor centre of each level as a fraction of its stride (one value for all levels,
            or one per level): 0 for ``AnchorGenerator``, 0.5 for ``DefaultBoxGenerator``.
        training: resize with every ``min_size`` of a tuple, each equally weighted (else the last only).

    Returns:
        the boxes at least :data:`~lightning_autoanchor.boxes.MIN_FIT_SIZE` px on one side at the input.

    Raises:
        DataError: the box set has no centres.
        ConfigError: ``layout`` returned arrays of the wrong shape, or non-positive grids or strides.
    """
    resized = ResizedBoxes.of(box_set, resize, training)
    padded, which = np.unique(resized.padded, axis=0, return_inverse=True)
    grids, strides = (np.asarray(a) for a in layout(padded))
    if grids.ndim != 3 or grids.shape[0] != len(padded) or grids.shape[2] != 2 or strides.shape != grids.shape:
        raise ConfigError(f"the layout must return grids and strides of shape (sizes, levels, 2) for {len(padded)} "
                          f"padded sizes, got {grids.shape} and {strides.shape}")
    if not ((grids >= 1).all() and np.isfinite(strides).all() and (strides > 0).all()):
        raise ConfigError(f"the layout returned grid sizes or strides that are not positive: grids "
                          f"{grids[0].tolist()}, strides {strides[0].tolist()} for padded size {padded[0].tolist()}")
    levels = grids.shape[1]
    offset = np.asarray(offsets, dtype=np.float64).reshape(-1)
    if offset.shape == (1,):
        offset = np.repeat(offset, levels)
    if offset.shape != (levels,):
        raise ConfigError(f"give one centre offset, or one per level ({levels}), got {offset.tolist()}")
    keep = np.flatnonzero((resized.wh >= MIN_FIT_SIZE).any(axis=1))
    layout_row = torch.from_numpy(which.reshape(-1)[resized.image[keep]])
    xy = torch.from_numpy(resized.xy[keep])
    grid_t, stride_t, offset_t = (torch.from_numpy(a) for a in (grids.astype(np.int64), strides.astype(np.float64),
                                                                offset))
    dxy = torch.empty((len(keep), levels, 2), dtype=torch.float32)
    for start in range(0, len(keep), _CHUNK):  # per-box grids and strides in chunks: bounded memory
        part = slice(start, start + _CHUNK)
        rows = layout_row[part]
        dxy[part] = nearest_offsets(xy[part], grid_t[rows], stride_t[rows], offset_t)
    kept_boxes = len(np.unique(resized.box[keep]))
    return PlacedBoxes(
        wh=torch.from_numpy(resized.wh[keep].astype(np.float32)),
        dxy=dxy,
        weight=torch.from_numpy(resized.weight[keep].astype(np.float32)),
        n_boxes=kept_boxes,
        n_dropped=len(box_set) - kept_boxes,
    )
