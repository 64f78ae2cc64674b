"""Check anchors that a detector places on a grid and matches by IoU (torchvision's RetinaNet, Faster R-CNN's
RPN, SSD) and, when too few boxes reach the matcher's threshold, fit better ones in the model's own structure.

:func:`refit_grid_anchors` is what the callback runs at fit start for such a head (on one rank): it takes the
generator's arguments and the boxes placed as the model places them (:func:`~lightning_autoanchor.placed.place_boxes`),
and never sees a model. The measure is the *placed recall*: the share of boxes whose best IoU with any anchor
the model really generates reaches the threshold (:mod:`lightning_autoanchor.placed`). It is what is compared
with ``bpr_threshold``, what the fit maximises, and what decides whether the new anchors are kept: only if the
recall rises (ties: the mean best IoU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from lightning_autoanchor.grid_fit import (
    DefaultBoxes,
    FreeAnchors,
    GeneratorAnchors,
    fit_anchor_generator,
    fit_default_boxes,
    fit_free_anchors,
)
from lightning_autoanchor.placed import PlacedBoxes, PlacedScores
from lightning_autoanchor.refit import AnchorUpdate

__all__ = ["GridAnchors", "GridUpdate", "refit_grid_anchors", "structure_from_dict", "update_from_dict"]

_REFACTOR_MAX = 3
"""Up to this many anchors per location, ``AnchorGenerator`` fits also try the other ways of writing the count as
sizes x ratios (COCO val2017, Faster R-CNN's RPN at IoU 0.7: placed recall 0.4310 with 1 size x 3 ratios kept,
0.4848 with 3 sizes x 1 ratio; ``benchmarks/bench_torchvision.py``)."""

GridAnchors = GeneratorAnchors | DefaultBoxes | FreeAnchors
"""The arguments of a grid head's anchor generator: torchvision's ``AnchorGenerator`` or SSD's
``DefaultBoxGenerator``, or a custom head's free anchors."""

_KINDS: dict[str, type] = {"anchor_generator": GeneratorAnchors, "default_boxes": DefaultBoxes, "free": FreeAnchors}


def structure_from_dict(data: dict[str, Any]) -> GridAnchors:
    """The generator arguments of :meth:`GeneratorAnchors.as_dict`, :meth:`DefaultBoxes.as_dict` or
    :meth:`FreeAnchors.as_dict` (with ``kind``; none: ``"anchor_generator"``)."""
    fields = {k: v for k, v in data.items() if k != "kind"}
    return _KINDS[data.get("kind", "anchor_generator")](**fields)


def _as_dict(structure: GridAnchors) -> dict[str, Any]:
    kind = next(name for name, cls in _KINDS.items() if isinstance(structure, cls))
    out = {"kind": kind, **structure.as_dict()}
    if isinstance(structure, DefaultBoxes):
        out["image_size"] = list(structure.image_size)
    return out


@dataclass(frozen=True, eq=False)
class GridUpdate:
    """The outcome of a check (and fit) of a grid head's anchors.

    Attributes:
        replaced: whether ``after`` differs from ``before`` (to be written).
        fitted: whether new anchors were searched (the placed recall was under the threshold).
        structure_before, structure_after: the generator's arguments (plain data, see :func:`structure_from_dict`).
        before, after: placed scores of those anchors on the boxes; ``candidate``: of the fitted ones, kept or not.
        thr: the matcher's foreground IoU; ``bpr_threshold``, ``seed``: the settings used.
        n_images, source: the data used; ``seconds``: wall time of the check and fit.
    """

    replaced: bool
    fitted: bool
    structure_before: dict[str, Any]
    structure_after: dict[str, Any]
    before: PlacedScores
    after: PlacedScores
    candidate: PlacedScores | None
    thr: float
    bpr_threshold: float
    seed: int
    n_images: int
    source: str
    seconds: float

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GridUpdate) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    @property
    def anchors_after(self) -> GridAnchors:
        return structure_from_dict(self.structure_after)

    @property
    def anchors_before(self) -> GridAnchors:
        return structure_from_dict(self.structure_before)

    def metrics(self) -> dict[str, float]:
        """The values logged to every logger, under ``autoanchor/``: the placed recall at the matcher's
        threshold is the best possible recall of such a head, so it is logged under both names."""
        return {
            "autoanchor/recall_before": self.before.recall,
            "autoanchor/recall_after": self.after.recall,
            "autoanchor/bpr_before": self.before.recall,
            "autoanchor/bpr_after": self.after.recall,
            "autoanchor/mean_best_iou_before": self.before.mean_best_iou,
            "autoanchor/mean_best_iou_after": self.after.mean_best_iou,
            "autoanchor/low_quality_after": self.after.low_quality,
            "autoanchor/replaced": float(self.replaced),
        }

    def as_dict(self) -> dict[str, Any]:
        """Plain Python data: picklable, YAML- and JSON-friendly (``kind: "grid"`` tells it from an
        ``AnchorUpdate``)."""
        return {"kind": "grid", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridUpdate:
        fields = {k: v for k, v in data.items() if k != "kind"}
        for key in ("before", "after", "candidate"):
            if fields[key] is not None:
                fields[key] = PlacedScores(**fields[key])
        return cls(**fields)


def refit_grid_anchors(structure: GridAnchors, placed: PlacedBoxes, thr: float, *, bpr_threshold: float = 0.98,
                       seed: int = 0, shared_ratios: bool = False, fit: bool | None = None, n_images: int = 0,
                       source: str = "") -> GridUpdate:
    """Score ``structure``'s anchors on ``placed`` boxes; if the placed recall at ``thr`` is under
    ``bpr_threshold``, fit the generator's arguments (or free anchors) anew, keeping the count of anchors per
    location.

    Args:
        structure: the generator's current arguments.
        placed: the training boxes at the network input, with their offsets to each level's nearest
            anchor centre (:func:`~lightning_autoanchor.placed.place_boxes`).
        thr: the matcher's foreground IoU (a box matches at ``IoU >= thr``, as torchvision's ``Matcher``).
        bpr_threshold: re-fit when the placed recall is under this.
        seed: seed of the fit's private random generator.
        shared_ratios: ``AnchorGenerator`` only: one set of aspect ratios for every level.
        fit: ``None``: fit when the recall is under ``bpr_threshold``; ``True``: fit whatever the recall
            (the command line's ``compute``; still kept only if better); ``False``: only score (``check``).
        n_images, source: the data, for the record.
    """
    started = time.perf_counter()
    before = placed.score(structure.cell_anchors(), thr)
    after_structure, after, candidate = structure, before, None
    if fit if fit is not None else before.recall < bpr_threshold:
        if isinstance(structure, DefaultBoxes):
            result = fit_default_boxes(placed, structure, thr, seed=seed)
        elif isinstance(structure, FreeAnchors):
            result = fit_free_anchors(placed, structure, thr, seed=seed)
        else:
            # few anchors per location (Faster R-CNN's RPN: 3): also try the other splits into sizes x ratios
            # (3 sizes x 1 ratio), which keep the count and the slot order; more would cost a fit each
            refactor = max(structure.num_anchors_per_location()) <= _REFACTOR_MAX
            result = fit_anchor_generator(placed, structure, thr, shared_ratios=shared_ratios, refactor=refactor,
                                          seed=seed)
        candidate = result.scores
        if candidate.beats(before):
            after_structure, after = result.anchors, candidate
    return GridUpdate(
        replaced=after_structure is not structure,
        fitted=candidate is not None,
        structure_before=_as_dict(structure),
        structure_after=_as_dict(after_structure),
        before=before,
        after=after,
        candidate=candidate,
        thr=float(thr),
        bpr_threshold=float(bpr_threshold),
        seed=seed,
        n_images=n_images,
        source=source,
        seconds=time.perf_counter() - started,
    )


def update_from_dict(data: dict[str, Any]) -> AnchorUpdate | GridUpdate:
    """An :class:`AnchorUpdate` or a :class:`GridUpdate` from its ``as_dict()`` (a checkpoint's callback state)."""
    return GridUpdate.from_dict(data) if data.get("kind") == "grid" else AnchorUpdate.from_dict(data)
