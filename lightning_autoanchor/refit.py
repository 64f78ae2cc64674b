"""Check a head's anchors on a box set and, when they fit badly, fit better ones: no Trainer needed.

:func:`refit_anchors` is what the callback runs at fit start (on one rank); it reads the heads but
never writes them. The returned :class:`AnchorUpdate` says what to write, and round-trips through
plain Python data (:meth:`AnchorUpdate.as_dict`) for broadcasting and checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_autoanchor.boxes import BoxSet, Resize
from lightning_autoanchor.errors import AnchorFitError, ConfigError
from lightning_autoanchor.heads import Heads, assign_to_levels, check_anchors
from lightning_autoanchor.metrics import DEFAULT_THR, AnchorScores, Metric, match_cut, score_anchors
from lightning_autoanchor.optimizer import fit_anchors, prepare_boxes


@dataclass(frozen=True, eq=False)
class AnchorUpdate:
    """The outcome of a check (and fit) of anchors.

    Attributes:
        replaced: whether ``anchors_after`` differ from ``anchors_before`` (to be written).
        fitted: whether new anchors were computed (BPR was under the threshold).
        anchors_before, anchors_after: ``(levels, per_level, 2)`` pixels at ``img_size``, in the head's
            level order; equal when not ``replaced``.
        before, after: scores of those anchors on the boxes (with the recall check's scale jitter).
        candidate: scores of the fitted anchors, kept or not (``None`` when no fit ran).
        img_size, metric, thr, seed: the settings used; ``n_images``, ``source``: the data used.
        seconds: wall time of the check and fit.
    """

    replaced: bool
    fitted: bool
    anchors_before: Tensor
    anchors_after: Tensor
    before: AnchorScores
    after: AnchorScores
    candidate: AnchorScores | None
    img_size: float
    metric: Metric
    thr: float
    seed: int
    n_images: int
    source: str
    seconds: float

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnchorUpdate) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def metrics(self) -> dict[str, float]:
        """The values logged to every logger, under ``autoanchor/``."""
        return {
            "autoanchor/bpr_before": self.before.bpr,
            "autoanchor/bpr_after": self.after.bpr,
            "autoanchor/aat_before": self.before.aat,
            "autoanchor/aat_after": self.after.aat,
            "autoanchor/fitness_before": self.before.fitness,
            "autoanchor/fitness_after": self.after.fitness,
            "autoanchor/avg_iou_after": self.after.avg_iou,
            "autoanchor/replaced": float(self.replaced),
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain Python data (lists, floats, strings): picklable, YAML- and JSON-friendly."""
        out = asdict(self)
        out["anchors_before"] = self.anchors_before.tolist()
        out["anchors_after"] = self.anchors_after.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnchorUpdate:
        fields = dict(data)
        for key in ("anchors_before", "anchors_after"):
            fields[key] = torch.tensor(fields[key], dtype=torch.float32)
        for key in ("before", "after", "candidate"):
            if fields[key] is not None:
                fields[key] = AnchorScores(**fields[key])
        return cls(**fields)


def check_img_size(img_size: float, strides: Tensor) -> None:
    """Raise :class:`ConfigError` unless ``img_size`` is a positive multiple of the largest stride."""
    largest = float(strides.max())
    if not img_size > 0 or img_size % largest:
        nearest = max(1, round(img_size / largest)) * largest
        raise ConfigError(f"img_size {img_size:g} is not a multiple of the head's largest stride {largest:g}: "
                          f"train at a size the network can tile (e.g. {nearest:g})")


def refit_anchors(heads: Heads, boxes: BoxSet, *, img_size: float, bpr_threshold: float = 0.98,
                  thr: float | None = None, metric: Metric = "ratio", resize: Resize = "letterbox",
                  scale_jitter: float = 0.1, generations: int = 1000, mutation_prob: float = 0.9, sigma: float = 0.1,
                  seed: int = 0, device: torch.device | str | None = None, progress: bool = False) -> AnchorUpdate:
    """Score the primary head's anchors on ``boxes``; if BPR is under ``bpr_threshold``, fit new ones.

    New anchors (as many as the head has) are kept only when their BPR beats the current anchors'
    (YOLOv5's rule); they are sorted by area and laid out small-to-large over the levels in stride
    order. Scores use the boxes at ``img_size`` with YOLOv5's per-image scale jitter
    (``scale_jitter``, seeded by ``seed``); the fit itself uses them without jitter. The work that
    grows with the number of boxes runs on ``device`` (e.g. the model's GPU; default CPU).

    Raises:
        HeadError: the head's anchors are not ``(levels, anchors, 2)``, finite and positive.
        ConfigError: ``img_size`` is not a multiple of the largest stride, or another setting is invalid.
        AnchorFitError: no usable boxes.
    """
    started = time.perf_counter()
    if not 0.0 <= bpr_threshold <= 1.0:
        raise ConfigError(f"bpr_threshold must be in [0, 1], got {bpr_threshold}")
    thr = DEFAULT_THR[metric] if thr is None else float(thr)
    match_cut(metric, thr)
    before_anchors = heads.primary.read_anchors()
    check_anchors(before_anchors, heads.names[0])
    strides = heads.primary.strides
    check_img_size(img_size, strides)
    if len(boxes) == 0:
        raise AnchorFitError(f"no training boxes in {boxes.source or 'the box set'}: cannot check anchors")
    check_wh, _ = prepare_boxes(boxes.scaled(img_size, resize, scale_jitter, seed).to(device))
    if len(check_wh) == 0:
        raise AnchorFitError(f"every box of {boxes.source or 'the box set'} is under 2 px at img_size {img_size:g}")
    flat_before = before_anchors.reshape(-1, 2).to(check_wh.device)
    before = score_anchors(check_wh, flat_before, thr, metric)
    after_anchors, after, candidate = before_anchors, before, None
    if before.bpr < bpr_threshold:
        result = fit_anchors(boxes.scaled(img_size, resize).to(device), len(flat_before), thr=thr, metric=metric,
                             generations=generations, mutation_prob=mutation_prob, sigma=sigma, seed=seed,
                             progress=progress)
        candidate = score_anchors(check_wh, result.anchors.to(check_wh.device), thr, metric)
        if candidate.bpr > before.bpr:
            after_anchors = assign_to_levels(result.anchors, strides, before_anchors.shape[1])
            after = candidate
    return AnchorUpdate(
        replaced=after_anchors is not before_anchors,
        fitted=candidate is not None,
        anchors_before=before_anchors,
        anchors_after=after_anchors,
        before=before,
        after=after,
        candidate=candidate,
        img_size=float(img_size),
        metric=metric,
        thr=thr,
        seed=seed,
        n_images=boxes.num_images,
        source=boxes.source,
        seconds=time.perf_counter() - started,
    )
