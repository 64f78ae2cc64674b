"""How well anchors fit boxes: small pure tensor functions.

All sizes are widths and heights in pixels at the training image size. ``wh`` is a float tensor of
shape ``(N, 2)`` (one row per box), ``anchors`` a float tensor of shape ``(K, 2)``.

Two match rules are supported, selected by ``metric``:

``"ratio"`` (YOLOv5/v7, the default)
    A box matches an anchor when both ``w / a_w`` and ``h / a_h`` lie within ``[1/thr, thr]``.
    The match quality is ``min(r, 1/r)`` of the worse of the two ratios, in ``(0, 1]``;
    ``thr`` is YOLOv5's ``anchor_t`` (default 4.0) and a box matches when quality ``> 1/thr``.
``"iou"`` (heads that assign targets by IoU: RetinaNet, Faster R-CNN, YOLOv3/darknet)
    The match quality is the IoU of box and anchor centred on each other (width/height IoU);
    ``thr`` is an IoU in ``[0, 1)`` (default 0.5) and a box matches when quality ``> thr``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_autoanchor.augment import SCORE_MAX_MASS, SCORE_STEP, log_scale_kernel
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.settings import AnchorSettings, Metric

__all__ = [
    "AnchorScores",
    "anchor_fitness",
    "anchors_above_threshold",
    "average_iou",
    "best_possible_recall",
    "match_cut",
    "match_quality",
    "ratio_metric",
    "score_anchors",
    "wh_iou",
]


def match_cut(metric: Metric = "ratio", thr: float | None = None) -> float:
    """The match-quality threshold in ``[0, 1)`` that ``thr`` means for ``metric``.

    A box matches an anchor when its quality is strictly above the returned value: ``1 / thr`` for
    ``"ratio"``, ``thr`` itself for ``"iou"``. ``thr=None`` takes the metric's default; both are
    validated as :class:`~lightning_autoanchor.settings.AnchorSettings` validates them.
    """
    return AnchorSettings(metric=metric, thr=thr).match_cut


def ratio_metric(wh: Tensor, anchors: Tensor) -> Tensor:
    """YOLOv5's ratio match quality of every box with every anchor.

    Args:
        wh: ``(N, 2)`` box widths and heights (pixels).
        anchors: ``(K, 2)`` anchor widths and heights (same units).

    Returns:
        ``(N, K)`` tensor: ``min(w/a_w, a_w/w, h/a_h, a_h/h)``, in ``(0, 1]``; 1 is a perfect fit.
    """
    r = wh[:, None, :] / anchors[None, :, :]
    return torch.minimum(r, r.reciprocal()).amin(dim=2)


def wh_iou(wh: Tensor, anchors: Tensor) -> Tensor:
    """IoU of every box with every anchor, both centred at the same point.

    Args:
        wh: ``(N, 2)`` box widths and heights (pixels).
        anchors: ``(K, 2)`` anchor widths and heights (same units).

    Returns:
        ``(N, K)`` tensor of IoUs in ``(0, 1]``.
    """
    inter = torch.minimum(wh[:, None, :], anchors[None, :, :]).prod(dim=2)
    union = wh.prod(dim=1)[:, None] + anchors.prod(dim=1)[None, :] - inter
    return inter / union


def match_quality(wh: Tensor, anchors: Tensor, metric: Metric = "ratio") -> Tensor:
    """``(N, K)`` match quality of every box with every anchor under ``metric`` (see module doc)."""
    match_cut(metric)  # validates the name
    return ratio_metric(wh, anchors) if metric == "ratio" else wh_iou(wh, anchors)


def best_possible_recall(wh: Tensor, anchors: Tensor, thr: float | None = None,
                         metric: Metric = "ratio") -> Tensor:
    """Share of boxes that match at least one anchor: 0-dim tensor in ``[0, 1]``."""
    best = match_quality(wh, anchors, metric).amax(dim=1)
    return (best > match_cut(metric, thr)).float().mean()


def anchors_above_threshold(wh: Tensor, anchors: Tensor, thr: float | None = None,
                            metric: Metric = "ratio") -> Tensor:
    """Mean number of anchors each box matches: 0-dim tensor in ``[0, K]``."""
    quality = match_quality(wh, anchors, metric)
    return (quality > match_cut(metric, thr)).float().sum(dim=1).mean()


def anchor_fitness(wh: Tensor, anchors: Tensor, thr: float | None = None,
                   metric: Metric = "ratio") -> Tensor:
    """YOLOv5's anchor fitness: mean over boxes of the best match quality, counting 0 where no anchor
    matches. 0-dim tensor in ``[0, 1]``."""
    best = match_quality(wh, anchors, metric).amax(dim=1)
    return (best * (best > match_cut(metric, thr))).mean()


def average_iou(wh: Tensor, anchors: Tensor) -> Tensor:
    """YOLOv2's "Avg IOU": mean over boxes of the best width/height IoU with any anchor (0-dim)."""
    return wh_iou(wh, anchors).amax(dim=1).mean()


@dataclass(frozen=True)
class AnchorScores:
    """Fit of a set of anchors to a box set, computed exactly on every box.

    Attributes:
        bpr: best possible recall, share of boxes matched by at least one anchor.
        aat: anchors above threshold, mean number of matching anchors per box.
        fitness: YOLOv5's fitness, mean best match quality (0 for unmatched boxes).
        avg_iou: YOLOv2's average best width/height IoU.
        n_boxes: number of boxes scored.
    """

    bpr: float
    aat: float
    fitness: float
    avg_iou: float
    n_boxes: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score_anchors(wh: Tensor, anchors: Tensor, thr: float | None = None, metric: Metric = "ratio",
                  chunk_size: int = 1 << 16, scale_aug: float = 0.0) -> AnchorScores:
    """BPR, anchors per box, fitness and average IoU of ``anchors`` on all boxes, in one pass.

    Works in chunks of ``chunk_size`` boxes, so memory stays bounded for any ``N``; sums are kept
    in float64 so results do not drift with ``N``.

    Args:
        wh: ``(N, 2)`` box widths and heights (pixels), ``N >= 1``.
        anchors: ``(K, 2)`` anchor widths and heights (pixels).
        thr: match threshold of ``metric`` (``None``: 4.0 for ratio, 0.5 for iou).
        metric: ``"ratio"`` or ``"iou"``.
        scale_aug: the training's scale augmentation ``a`` in ``[0, 1)``: every score is the expectation
            over a factor uniform on ``[1 - a, 1 + a]`` applied to each box, integrated for every box by
            the quadrature of :func:`~lightning_autoanchor.augment.log_scale_kernel` (cells of
            :data:`~lightning_autoanchor.augment.SCORE_STEP` and :data:`~lightning_autoanchor.augment.SCORE_MAX_MASS`;
            its error is stated there). 0: the boxes as given.
    """
    cut = match_cut(metric, thr)
    if wh.ndim != 2 or wh.shape[1] != 2 or anchors.ndim != 2 or anchors.shape[1] != 2:
        raise ConfigError(f"wh and anchors must have shape (N, 2) and (K, 2), got {tuple(wh.shape)} "
                          f"and {tuple(anchors.shape)}")
    n = wh.shape[0]
    if n == 0:
        raise ConfigError("cannot score anchors on an empty box set")
    shifts, kernel = log_scale_kernel(scale_aug, SCORE_STEP, SCORE_MAX_MASS)
    factors = shifts.exp().to(device=wh.device, dtype=torch.float32)
    kernel = kernel.to(wh.device)
    per_chunk = max(1, chunk_size // len(factors))
    anchors = anchors.to(device=wh.device, dtype=torch.float32)
    anchor_w, anchor_h = anchors[:, 0], anchors[:, 1]
    anchor_area = anchor_w * anchor_h
    totals = torch.zeros(4, dtype=torch.float64, device=wh.device)
    for start in range(0, n, per_chunk):
        chunk = wh[start:start + per_chunk].to(torch.float32)
        weights = None
        if scale_aug:  # every box at every node: (chunk * m, 2), weighted by the nodes' probabilities
            chunk = (chunk[:, None, :] * factors[:, None]).reshape(-1, 2)
            weights = kernel.repeat(len(chunk) // len(factors))
        w, h = chunk[:, 0:1], chunk[:, 1:2]
        # Same results as ratio_metric / wh_iou, on contiguous (chunk, K) planes and sharing the minima.
        min_w, min_h = torch.minimum(w, anchor_w), torch.minimum(h, anchor_h)
        inter = min_w * min_h
        iou = inter / (w * h + anchor_area - inter)
        if metric == "iou":
            quality = iou
        else:
            quality = torch.minimum(min_w / torch.maximum(w, anchor_w), min_h / torch.maximum(h, anchor_h))
        best = quality.amax(dim=1)
        matched = best > cut
        totals += torch.stack([
            _weighted_sum(matched, weights),
            _weighted_sum((quality > cut).sum(dim=1), weights),
            _weighted_sum(best * matched, weights),
            _weighted_sum(iou.amax(dim=1), weights),
        ])
    bpr, aat, fitness, avg_iou = (totals / n).tolist()
    return AnchorScores(bpr=bpr, aat=aat, fitness=fitness, avg_iou=avg_iou, n_boxes=n)


def _weighted_sum(values: Tensor, weights: Tensor | None) -> Tensor:
    """Float64 sum of ``(R,)`` values, each times its weight when ``weights`` is given."""
    return values.sum(dtype=torch.float64) if weights is None else values.to(torch.float64) @ weights
