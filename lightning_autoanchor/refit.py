"""Check anchors on a box set and, when they fit badly, fit better ones: no Trainer, no head needed.

:func:`refit_anchors` is what the callback runs at fit start (on one rank), given the primary
head's anchors and strides. The returned :class:`AnchorUpdate` says what to write, and round-trips
through plain Python data (:meth:`AnchorUpdate.as_dict`) for broadcasting and checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_autoanchor.boxes import MIN_FIT_SIZE, BoxSet, describe_img_size
from lightning_autoanchor.errors import AnchorFitError, ConfigError, HeadError
from lightning_autoanchor.metrics import AnchorScores, score_anchors
from lightning_autoanchor.optimizer import fit_anchors, prepare_boxes
from lightning_autoanchor.settings import AnchorSettings, Metric

__all__ = ["AnchorUpdate", "assign_to_levels", "check_anchors", "check_img_size", "follows_strides", "refit_anchors"]


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
        advice: a sentence when the head's count of anchors is far from the knee of the anchor-count
            curve on these boxes (``refit_anchors(..., advise_count=True)``), else ``None``.
    """

    replaced: bool
    fitted: bool
    anchors_before: Tensor
    anchors_after: Tensor
    before: AnchorScores
    after: AnchorScores
    candidate: AnchorScores | None
    img_size: float | list[float]
    metric: Metric
    thr: float
    seed: int
    n_images: int
    source: str
    seconds: float
    advice: str | None = None

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


def check_anchors(anchors: Tensor, where: str) -> None:
    """Raise :class:`HeadError` unless ``anchors`` is ``(levels, anchors, 2)``, finite and positive."""
    if anchors.ndim != 3 or anchors.shape[-1] != 2 or anchors.numel() == 0:
        raise HeadError(f"{where}: anchors must have shape (levels, anchors_per_level, 2), got {tuple(anchors.shape)}")
    if not bool(torch.isfinite(anchors).all()) or not bool((anchors > 0).all()):
        raise HeadError(f"{where}: anchors must be positive and finite, got {anchors.reshape(-1, 2).tolist()}")


def follows_strides(anchors: Tensor, strides: Tensor) -> bool:
    """Whether the levels' mean anchor areas grow with their strides (YOLOv5's ``check_anchor_order``).

    ``anchors``: ``(levels, per_level, 2)`` pixels; ``strides``: ``(levels,)``.
    """
    areas = anchors.prod(dim=-1).mean(dim=-1)[strides.argsort()]
    return bool((areas.diff() >= 0).all())


def assign_to_levels(anchors: Tensor, strides: Tensor, per_level: int) -> Tensor:
    """Arrange anchors sorted by area over levels in stride order: small anchors on fine levels.

    Args:
        anchors: ``(K, 2)`` pixels, sorted from small to large area.
        strides: ``(levels,)`` in the head's level order.
        per_level: anchors per level (``K = levels * per_level``).

    Returns:
        ``(levels, per_level, 2)`` in the head's level order.
    """
    groups = anchors.reshape(len(strides), per_level, 2)
    out = torch.empty_like(groups)
    out[strides.argsort()] = groups
    return out


def check_img_size(img_size: float | tuple[float, float], strides: Tensor) -> None:
    """Raise :class:`ConfigError` unless each side of ``img_size`` is a positive multiple of the largest stride."""
    largest = float(strides.max())
    for side in img_size if isinstance(img_size, tuple | list) else (img_size,):
        if not side > 0 or side % largest:
            nearest = max(1, round(side / largest)) * largest
            raise ConfigError(f"img_size {side:g} is not a multiple of the head's largest stride {largest:g}: "
                              f"train at a size the network can tile (e.g. {nearest:g})")


def refit_anchors(anchors: Tensor, strides: Tensor, boxes: BoxSet, settings: AnchorSettings | None = None, *,
                  device: torch.device | str | None = None, progress: bool = False, where: str = "the head",
                  advise_count: bool = False, **options: Any) -> AnchorUpdate:
    """Score ``anchors`` on ``boxes``; if BPR is under ``settings.bpr_threshold``, fit new ones.

    New anchors (as many as given) are kept only when their BPR beats the current anchors'
    (YOLOv5's rule); they are sorted by area and laid out small-to-large over the levels in stride
    order. Scores use the boxes at ``settings.img_size`` with YOLOv5's per-image scale jitter
    (``scale_jitter``, seeded by ``seed``); the fit itself uses them without jitter. The work that
    grows with the number of boxes runs on ``device`` (e.g. the model's GPU; default CPU).

    Args:
        anchors: ``(levels, per_level, 2)`` the head's anchors, pixels at the training size.
        strides: ``(levels,)`` pixels per cell of each level, in the same level order.
        boxes: the training boxes.
        settings: an :class:`AnchorSettings` with ``img_size`` set; ``options`` change its fields
            (``refit_anchors(anchors, strides, boxes, img_size=640, seed=1)``).
        device: where the per-box work runs.
        progress: show the evolution's progress bar on a terminal.
        where: the head's name, for messages.
        advise_count: also fit the anchor-count curve on the boxes (counts of 3 to 15 anchors, a
            multiple of the levels; about a second for 30k boxes) and say in ``advice`` when the head's
            count is far from its knee (:func:`~lightning_autoanchor.anchor_count.fit_anchor_counts`).

    With ``settings.min_stride_ratio``, the fit keeps each anchor at or above that multiple of the
    stride of the level it is laid out on. With ``settings.scale_aug``, the check, the fit and the
    keep-if-better rule all score the boxes under the training's scale augmentation.

    Raises:
        HeadError: the anchors are not ``(levels, anchors, 2)``, finite and positive.
        ConfigError: no ``img_size``, or it is not a multiple of the largest stride.
        AnchorFitError: no usable boxes.
    """
    started = time.perf_counter()
    settings = AnchorSettings.of(settings, **options)
    if settings.img_size is None:
        raise ConfigError("refit_anchors needs the training image size: give img_size")
    img_size = settings.img_size
    check_anchors(anchors, where)
    check_img_size(img_size, strides)
    if len(boxes) == 0:
        raise AnchorFitError(f"no training boxes in {boxes.source or 'the box set'}: cannot check anchors")
    check_wh, _ = prepare_boxes(boxes.scaled(img_size, settings.resize, settings.scale_jitter, settings.seed)
                                .to(device))
    if len(check_wh) == 0:
        raise AnchorFitError(f"every box of {boxes.source or 'the box set'} is under {MIN_FIT_SIZE:g} px at "
                             f"img_size {describe_img_size(img_size)}")
    before_anchors = anchors.detach().to(torch.float32).cpu()
    flat_before = before_anchors.reshape(-1, 2).to(check_wh.device)
    before = score_anchors(check_wh, flat_before, settings.thr, settings.metric, scale_aug=settings.scale_aug)
    after_anchors, after, candidate = before_anchors, before, None
    levels, per_level = before_anchors.shape[:2]
    in_stride_order = sorted(strides.tolist())
    fit_wh = boxes.scaled(img_size, settings.resize).to(device)
    if before.bpr < settings.bpr_threshold:
        result = fit_anchors(fit_wh, len(flat_before), settings, levels=(per_level,) * levels,
                             strides=in_stride_order, progress=progress)
        candidate = score_anchors(check_wh, result.anchors.to(check_wh.device), settings.thr, settings.metric,
                                  scale_aug=settings.scale_aug)
        if candidate.bpr > before.bpr:
            after_anchors = assign_to_levels(result.anchors, strides, per_level)
            after = candidate
    advice = None
    if advise_count:
        from lightning_autoanchor.anchor_count import CURVE_GENERATIONS, fit_anchor_counts

        counts = range(levels, max(15, len(flat_before)) + 1)
        try:
            curve = fit_anchor_counts(fit_wh, counts, settings.but(generations=CURVE_GENERATIONS), levels=levels,
                                      strides=in_stride_order)
            advice = curve.advice(len(flat_before))
        except AnchorFitError:  # fewer boxes than the largest count: no curve, no advice
            advice = None
    return AnchorUpdate(
        replaced=after_anchors is not before_anchors,
        fitted=candidate is not None,
        anchors_before=before_anchors,
        anchors_after=after_anchors,
        before=before,
        after=after,
        candidate=candidate,
        img_size=[float(v) for v in img_size] if isinstance(img_size, tuple) else float(img_size),
        metric=settings.metric,
        thr=float(settings.thr),  # type: ignore[arg-type]
        seed=settings.seed,
        n_images=boxes.num_images,
        source=boxes.source,
        seconds=time.perf_counter() - started,
        advice=advice,
    )
