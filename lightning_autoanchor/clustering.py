"""k-means initialisations of anchors from box widths and heights.

Three flavours, all weighted (so they run on :func:`~lightning_autoanchor.boxes.log_bins` summaries as
well as on raw boxes) and all seeded by a private :class:`torch.Generator`:

- :func:`kmeans_log`: Euclidean k-means on ``(log w, log h)`` with k-means++ seeding. Anchor metrics
  depend on log-size differences only, so this is the natural start for the optimiser (default).
- :func:`kmeans_iou`: the YOLOv2/darknet k-means with distance ``1 - IoU(box, centroid)``,
  k-means++ seeding and a mean or median update.
- :func:`kmeans_whitened`: YOLOv5's k-means: Euclidean on ``(w, h)`` divided by their standard
  deviations, several random starts, the codebook of lowest mean distance kept (as
  ``scipy.cluster.vq.kmeans``).

Every function takes ``wh`` of shape ``(N, 2)`` (pixels) and returns ``(k, 2)`` centroids in pixels.
When the boxes have fewer distinct sizes than ``k``, the surplus centroids repeat existing sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_autoanchor.errors import AnchorFitError
from lightning_autoanchor.metrics import wh_iou

__all__ = ["KMeansInit", "initial_anchors", "kmeans_iou", "kmeans_log", "kmeans_whitened"]

KMeansInit = Literal["log", "iou", "euclidean"]


def _check(wh: Tensor, weights: Tensor | None, k: int) -> Tensor:
    if k < 1:
        raise AnchorFitError(f"the number of anchors must be at least 1, got {k}")
    if wh.ndim != 2 or wh.shape[1] != 2 or len(wh) == 0:
        raise AnchorFitError(f"k-means needs a non-empty (N, 2) tensor of box sizes, got shape {tuple(wh.shape)}")
    if weights is None:
        return torch.ones(len(wh), dtype=wh.dtype, device=wh.device)
    if weights.shape != (len(wh),) or not bool((weights > 0).all()):
        raise AnchorFitError("k-means weights must be positive, one per box")
    return weights.to(wh.dtype)


def _plus_plus(x: Tensor, weights: Tensor, k: int, distance: Callable[[Tensor, Tensor], Tensor],
               generator: torch.Generator, starts: int = 1) -> Tensor:
    """k-means++ seeding, ``starts`` times at once: ``(starts, k, 2)`` centres drawn from ``x``.

    Each new centre is drawn with probability ∝ weight * squared distance to the nearest centre so far.
    With fewer distinct points than centres, the surplus is drawn by weight alone (repeating a point).
    """
    picks = [torch.multinomial(weights.expand(starts, -1), 1, generator=generator)[:, 0]]
    nearest = distance(x, x[picks[0]]).T  # (S, N)
    for _ in range(k - 1):
        p = weights * nearest.square()
        p = torch.where(p.sum(dim=1, keepdim=True) > 0, p, weights)
        picks.append(torch.multinomial(p, 1, generator=generator)[:, 0])
        nearest = torch.minimum(nearest, distance(x, x[picks[-1]]).T)
    return x[torch.stack(picks, dim=1)]


def _weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Per-column weighted median of ``values`` ``(n, d)`` with ``weights`` ``(n,)``."""
    out = []
    for column in values.T:
        order = column.argsort()
        cum = weights[order].cumsum(0)
        out.append(column[order][torch.searchsorted(cum, cum[-1] / 2)])
    return torch.stack(out)


def _lloyd(x: Tensor, weights: Tensor, centres: Tensor, distance: Callable[[Tensor, Tensor], Tensor],
           update: Literal["mean", "median"], max_iter: int) -> tuple[Tensor, Tensor]:
    """Weighted Lloyd iterations until assignments stop changing. Returns centres and assignment."""
    assign = distance(x, centres).argmin(dim=1)
    for _ in range(max_iter):
        new = centres.clone()
        if update == "mean":
            mass = torch.zeros(len(centres), dtype=x.dtype, device=x.device).index_add_(0, assign, weights)
            sums = torch.zeros_like(centres).index_add_(0, assign, x * weights[:, None])
            filled = mass > 0
            new[filled] = sums[filled] / mass[filled, None]
        else:
            for j in range(len(centres)):
                members = assign == j
                if bool(members.any()):
                    new[j] = _weighted_median(x[members], weights[members])
        centres = new
        new_assign = distance(x, centres).argmin(dim=1)
        if bool((new_assign == assign).all()):
            break
        assign = new_assign
    return centres, assign


def _sq_euclidean(x: Tensor, c: Tensor) -> Tensor:
    return (x[:, None, :] - c[None, :, :]).square().sum(dim=2)


def _euclidean(x: Tensor, c: Tensor) -> Tensor:
    return _sq_euclidean(x, c).sqrt()


def _one_minus_iou(x: Tensor, c: Tensor) -> Tensor:
    return 1.0 - wh_iou(x, c)


def kmeans_log(wh: Tensor, k: int, *, weights: Tensor | None = None, generator: torch.Generator,
               max_iter: int = 30) -> Tensor:
    """k-means on ``(log w, log h)`` with k-means++ seeding; returns ``(k, 2)`` centroids in pixels."""
    return _kmeans_log_starts(wh, k, 1, weights=weights, generator=generator, max_iter=max_iter)[0]


def _kmeans_log_starts(wh: Tensor, k: int, starts: int, *, weights: Tensor | None, generator: torch.Generator,
                       max_iter: int = 30) -> Tensor:
    """``starts`` independent runs of :func:`kmeans_log` in one batch: ``(starts, k, 2)`` pixels."""
    weights = _check(wh, weights, k)
    x = wh.log()
    centres = _plus_plus(x, weights, k, _euclidean, generator, starts)  # (S, k, 2)
    flat = torch.arange(starts, device=x.device)[:, None] * k
    assign = None
    for _ in range(max_iter):
        new_assign = (x[None, :, None, :] - centres[:, None, :, :]).square().sum(dim=3).argmin(dim=2)  # (S, B)
        if assign is not None and bool((new_assign == assign).all()):
            break
        assign = new_assign
        slot = (flat + assign).flatten()
        mass = torch.zeros(starts * k, dtype=x.dtype, device=x.device).index_add_(0, slot, weights.repeat(starts))
        sums = torch.zeros(starts * k, 2, dtype=x.dtype, device=x.device).index_add_(
            0, slot, (x * weights[:, None]).repeat(starts, 1))
        filled = mass > 0
        centres = centres.reshape(-1, 2).clone()
        centres[filled] = sums[filled] / mass[filled, None]
        centres = centres.reshape(starts, k, 2)
    return centres.exp()


def kmeans_iou(wh: Tensor, k: int, *, weights: Tensor | None = None, update: Literal["mean", "median"] = "median",
               generator: torch.Generator, max_iter: int = 300) -> Tensor:
    """YOLOv2/darknet k-means: distance ``1 - IoU``, k-means++ seeding, ``"mean"`` or ``"median"`` update.

    Returns ``(k, 2)`` centroids in pixels.
    """
    weights = _check(wh, weights, k)
    if update not in ("mean", "median"):
        raise AnchorFitError(f"update must be 'mean' or 'median', got {update!r}")
    centres = _plus_plus(wh, weights, k, _one_minus_iou, generator)[0]
    centres, _ = _lloyd(wh, weights, centres, _one_minus_iou, update, max_iter)
    return centres


def kmeans_whitened(wh: Tensor, k: int, *, weights: Tensor | None = None, generator: torch.Generator,
                    restarts: int = 30, max_iter: int = 100) -> Tensor:
    """YOLOv5's k-means: Euclidean on whitened ``(w, h)``, best of ``restarts`` random starts.

    Each start picks ``k`` distinct boxes at random; the codebook with the lowest weighted mean
    distance is kept. Returns ``(k, 2)`` centroids in pixels.
    """
    weights = _check(wh, weights, k)
    scale = wh.std(dim=0).clamp_min(torch.finfo(wh.dtype).eps) if len(wh) > 1 else wh.new_ones(2)
    x = wh / scale
    best, best_distortion = None, float("inf")
    for _ in range(max(1, restarts)):
        pick = torch.randperm(len(x), generator=generator)[:k]
        start = x[pick]
        if len(start) < k:  # fewer boxes than centres
            start = start[torch.arange(k) % len(start)]
        centres, assign = _lloyd(x, weights, start, _sq_euclidean, "mean", max_iter)
        distortion = float((_euclidean(x, centres).gather(1, assign[:, None])[:, 0] * weights).sum())
        if distortion < best_distortion:
            best, best_distortion = centres, distortion
    assert best is not None
    return best * scale


def initial_anchors(wh: Tensor, k: int, init: KMeansInit = "log", *, weights: Tensor | None = None,
                    generator: torch.Generator, starts: int = 1) -> Tensor:
    """``starts`` independent k-means solutions of the flavour ``init``: ``(starts, k, 2)`` pixels.

    ``init`` is ``"log"`` (:func:`kmeans_log`), ``"iou"`` (:func:`kmeans_iou`) or ``"euclidean"``
    (:func:`kmeans_whitened`).
    """
    if init == "log":
        return _kmeans_log_starts(wh, k, starts, weights=weights, generator=generator)
    if init == "iou":
        return torch.stack([kmeans_iou(wh, k, weights=weights, generator=generator) for _ in range(starts)])
    if init == "euclidean":
        return torch.stack([kmeans_whitened(wh, k, weights=weights, generator=generator) for _ in range(starts)])
    raise AnchorFitError(f"init must be 'log', 'iou' or 'euclidean', got {init!r}")
