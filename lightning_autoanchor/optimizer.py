"""Fit anchors to a box set: k-means, evolution, coordinate search, exact scores.

:func:`fit_anchors` is the one entry point. It never touches the global random streams: every draw
comes from a private :class:`torch.Generator` seeded with ``seed``, so a fit is reproducible and
leaves training's randomness as it was. :func:`summarise` and :func:`search` are its two halves, for
callers that fit several anchor counts to one box set (:mod:`lightning_autoanchor.anchor_count`).

Objectives (``objective``):

``"fitness"`` (default)
    YOLOv5's anchor fitness under ``metric`` and ``thr``: the mean over boxes of the best match
    quality, counting 0 for a box no anchor matches.
``"avg_iou"``
    YOLOv2's / darknet's average IoU: the mean over boxes of the best width/height IoU, every box
    counting (no threshold). BPR and anchors per target are still reported under ``metric``/``thr``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_autoanchor.augment import augment_log_bins
from lightning_autoanchor.boxes import MIN_FIT_SIZE, fit_mask, log_bins
from lightning_autoanchor.clustering import KMeansInit, initial_anchors
from lightning_autoanchor.errors import AnchorFitError, ConfigError
from lightning_autoanchor.evolution import LogSpaceFitness, evolve, refine
from lightning_autoanchor.levels import Levels, SizeFloor, level_counts, level_strides, size_floor
from lightning_autoanchor.metrics import AnchorScores, score_anchors
from lightning_autoanchor.settings import AnchorSettings, Metric, Objective

__all__ = [
    "COARSE_BIN",
    "FINE_BIN",
    "KMEANS_STARTS",
    "ROUGH_BIN",
    "AnchorResult",
    "Summaries",
    "fit_anchors",
    "prepare_boxes",
    "search",
    "single_thread",
    "sort_by_area",
    "summarise",
]

FINE_BIN = 0.04
"""Log-space cell (a 4 % size step) of the summary the final coordinate search runs on."""
COARSE_BIN = 0.1
"""Log-space cell (10 %) of the summary the coordinate search of every start runs on."""
ROUGH_BIN = 0.2
"""Log-space cell (20 %) of the summary k-means and the evolution run on."""
KMEANS_STARTS = 4
"""Independent k-means starts; the fittest after evolution and coordinate search is refined."""


@dataclass(frozen=True)
class AnchorResult:
    """Anchors fitted to a box set, with their exact scores on every box.

    Attributes:
        anchors: ``(K, 2)`` float32 widths and heights in pixels at the training size, sorted by area.
        scores: exact fit of ``anchors`` on all boxes used (see :class:`AnchorScores`), under the scale
            augmentation when ``scale_aug`` > 0: what the fit maximised.
        n_dropped: boxes left out for being under 2 px on both sides.
        metric, thr, seed, generations, scale_aug: the settings used.
        seconds: wall time of the fit.
        objective: what the fit maximised (see the module doc).
        levels: anchors per level, in the order of ``strides`` (the smallest anchors on the smallest stride).
        strides: pixels per cell of each level.
        min_stride_ratio: the per-level size limit the fit kept to (``None``: none).
        scale_aug: the training's scale augmentation the fit and ``scores`` took into account (0: none).
        nominal: with ``scale_aug`` > 0, the scores on the boxes at their nominal size (factor 1); else ``None``.
    """

    anchors: Tensor
    scores: AnchorScores
    n_dropped: int
    metric: Metric
    thr: float
    seed: int
    generations: int
    seconds: float = field(compare=False)
    objective: Objective = "fitness"
    levels: tuple[int, ...] = ()
    strides: tuple[float, ...] = ()
    min_stride_ratio: float | None = None
    scale_aug: float = 0.0
    nominal: AnchorScores | None = None

    @property
    def n(self) -> int:
        """Number of anchors."""
        return len(self.anchors)

    @property
    def objective_value(self) -> float:
        """The value of the objective fitted: ``scores.avg_iou`` or ``scores.fitness``."""
        return self.scores.avg_iou if self.objective == "avg_iou" else self.scores.fitness

    def as_dict(self) -> dict[str, object]:
        """Plain-Python summary (anchors as ``[[w, h], ...]``) for JSON, YAML and checkpoints.

        The scores are top-level keys; with ``scale_aug`` > 0 they are the augmented ones, and
        ``nominal`` and ``augmented`` hold both sets side by side.
        """
        sides = {"nominal": self.nominal.as_dict(), "augmented": self.scores.as_dict()} if self.nominal else {}
        return {
            "anchors": [[round(float(w), 2), round(float(h), 2)] for w, h in self.anchors.tolist()],
            **self.scores.as_dict(),
            "n_dropped": self.n_dropped,
            "metric": self.metric,
            "thr": self.thr,
            "seed": self.seed,
            "generations": self.generations,
            "scale_aug": self.scale_aug,
            **sides,
            "seconds": round(self.seconds, 4),
            "objective": self.objective,
            "levels": list(self.levels),
            "strides": list(self.strides),
            "min_stride_ratio": self.min_stride_ratio,
        }


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch's CPU operations on one thread inside the block, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sort_by_area(anchors: Tensor) -> Tensor:
    """``(K, 2)`` anchors reordered from the smallest area to the largest."""
    return anchors[anchors.prod(dim=1).argsort()]


def prepare_boxes(wh: Tensor) -> tuple[Tensor, int]:
    """Check ``(N, 2)`` box sizes and keep those used for fitting (>= 2 px on one side).

    Returns the kept boxes as float32 and the number left out.
    """
    if not isinstance(wh, Tensor) or wh.ndim != 2 or wh.shape[1] != 2:
        raise AnchorFitError(f"box sizes must be an (N, 2) tensor of widths and heights, got "
                             f"{getattr(wh, 'shape', type(wh).__name__)}")
    wh = wh.to(torch.float32)
    bad = ~(torch.isfinite(wh).all(dim=1) & (wh > 0).all(dim=1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AnchorFitError(f"{int(bad.sum())} box sizes are not positive finite numbers "
                             f"(first: box {i} = {wh[i].tolist()})")
    keep = fit_mask(wh)
    return wh[keep], int((~keep).sum())


@dataclass(frozen=True)
class Summaries:
    """A box set summarised on three log-space grids, each with the objective to maximise on it.

    Attributes:
        fine, coarse, rough: the objective on cells of :data:`FINE_BIN`, :data:`COARSE_BIN` and
            :data:`ROUGH_BIN` (see :class:`~lightning_autoanchor.evolution.LogSpaceFitness`), on the CPU.
    """

    fine: LogSpaceFitness
    coarse: LogSpaceFitness
    rough: LogSpaceFitness


def summarise(wh: Tensor, *, metric: Metric = "ratio", thr: float | None = None,
              objective: Objective = "fitness", scale_aug: float = 0.0) -> Summaries:
    """Summarise ``(N, 2)`` kept box sizes (see :func:`prepare_boxes`) for :func:`search`.

    The finest summary is built where the boxes are (a GPU, for boxes on one); the rest on the CPU.
    With ``scale_aug``, the summary is convolved with the distribution of the training's log scale
    factor (:mod:`lightning_autoanchor.augment`): the search then scores the boxes as the network sees them.
    """
    if objective == "avg_iou":  # the mean best IoU: every box counts
        metric, thr = "iou", 0.0
    points, weights = (t.cpu() for t in log_bins(wh, FINE_BIN))
    if scale_aug:
        points, weights = augment_log_bins(points, weights, scale_aug, FINE_BIN)
    fine = LogSpaceFitness(points, weights, metric=metric, thr=thr)
    with single_thread():
        coarse = LogSpaceFitness(*log_bins(fine.points.exp(), COARSE_BIN, fine.weights), metric=metric, thr=thr)
        rough = LogSpaceFitness(*log_bins(coarse.points.exp(), ROUGH_BIN, coarse.weights), metric=metric, thr=thr)
    return Summaries(fine, coarse, rough)


def search(summaries: Summaries, n: int, *, generator: torch.Generator, init: KMeansInit = "log",
           starts: int = KMEANS_STARTS, extra_starts: Tensor | None = None, generations: int = 1000,
           mutation_prob: float = 0.9, sigma: float = 0.1, population: int = 10, floor: SizeFloor | None = None,
           progress: bool = False) -> Tensor:
    """The search of :func:`fit_anchors` on ``summaries``: ``(n, 2)`` log anchor sizes, in no order.

    ``starts`` k-means solutions (``init``), plus ``extra_starts`` (``(E, n, 2)`` log sizes, e.g. a
    neighbouring fit), are evolved (``generations`` mutants split over them), climbed by coordinate
    search on the coarse grid; the fittest is polished on the fine grid. ``floor``: size limits
    every candidate keeps to (see :func:`~lightning_autoanchor.levels.size_floor`).
    """
    fine, coarse, rough = summaries.fine, summaries.coarse, summaries.rough
    # The search runs on the CPU and on one thread: its tensors are small, so per-operation overhead
    # sets the pace, and a thread pool that waits for a core another process holds would slow each
    # of its thousands of steps.
    with single_thread():
        candidates = initial_anchors(rough.points.exp(), n, init, weights=rough.weights, generator=generator,
                                     starts=starts).clamp(min=MIN_FIT_SIZE).log()
        if extra_starts is not None:
            candidates = torch.cat([candidates, extra_starts.to(candidates)])
        if floor is not None:
            candidates = floor.project(candidates)
        if generations:
            candidates = evolve(rough, candidates, generations=-(-generations // len(candidates)),
                                mutation_prob=mutation_prob, sigma=sigma, population=population, generator=generator,
                                floor=floor, progress=progress)
        candidates = refine(coarse, candidates, step=COARSE_BIN, min_step=COARSE_BIN / 4, floor=floor)
        best = candidates[int(coarse(candidates).argmax())]
        return refine(fine, best, step=FINE_BIN / 2, min_step=FINE_BIN / 20, floor=floor)


def fit_anchors(wh: Tensor, n: int | None = None, settings: AnchorSettings | None = None, *,
                levels: Levels | None = None, strides: Sequence[float] | None = None, population: int = 10,
                init: KMeansInit = "log", progress: bool = False, **options: Any) -> AnchorResult:
    """Fit ``n`` anchors to box sizes.

    Anchor sides are at least 2 px (as YOLOv5's evolution keeps them).

    Steps: summarise the boxes on a log-space grid (:func:`log_bins`); start from
    :data:`KMEANS_STARTS` k-means solutions (``init``); evolve each with YOLOv5's mutation
    (:func:`~lightning_autoanchor.evolution.evolve`, ``generations`` mutants split over the starts);
    climb to a local maximum by coordinate search (:func:`~lightning_autoanchor.evolution.refine`);
    polish the fittest on a finer grid; sort by area; score exactly on every box.
    With ``scale_aug``, all of it runs on the boxes as the training's scale augmentation shows them: the
    summary is convolved with the distribution of the log factor (:mod:`lightning_autoanchor.augment`).

    With ``min_stride_ratio``, every anchor's size ``sqrt(w * h)`` stays at or above that multiple
    of its level's stride, the anchors being sorted by area and laid out small to large over the
    levels in stride order. The limits hold throughout the search (starts, mutants and moves are all
    within them), so it finds the best anchors within the limits rather than clipping free ones.

    Args:
        wh: ``(N, 2)`` box widths and heights in pixels at the training size
            (e.g. :meth:`BoxSet.scaled <lightning_autoanchor.boxes.BoxSet.scaled>`). Boxes under 2 px on
            both sides are left out.
        n: number of anchors, all levels together (default: the sum of ``levels`` when it is a
            list of counts, else 9).
        settings: the match rule (``metric``, ``thr``), what is maximised (``objective``), the size
            limits (``min_stride_ratio``) and the search (``generations``, ``mutation_prob``,
            ``sigma``, ``seed``: equal seeds give equal anchors); ``options`` change its fields, as in
            ``fit_anchors(wh, 9, seed=1, thr=3.0)``. See :class:`~lightning_autoanchor.settings.AnchorSettings`.
        levels: number of levels holding equal shares of the anchors, or the count of each level in
            the order of ``strides`` (e.g. ``(3, 3, 4)``); default: one level per stride when
            ``strides`` are given, else 3 levels when ``n`` divides by 3, else 1. Used by
            ``min_stride_ratio`` and recorded in the result.
        strides: pixels per cell of each level (default 8, 16, 32, ...).
        population: mutants scored together per generation (1: YOLOv5's (1+1) scheme).
        init: k-means flavour for the starts: ``"log"``, ``"iou"`` or ``"euclidean"`` (YOLOv5's).
        progress: show a progress bar on a terminal.

    Raises:
        AnchorFitError: no usable boxes, fewer boxes than anchors, or non-finite sizes.
        ConfigError: an argument out of range (the message names it).
    """
    started = time.perf_counter()
    settings = AnchorSettings.of(settings, **options)
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ConfigError(f"population must be an integer >= 1, got {population!r}")
    metric, thr, objective = settings.metric, float(settings.thr), settings.objective  # type: ignore[arg-type]
    if levels is None and strides is not None:
        levels = len(strides)
    counts = level_counts(9 if n is None and (levels is None or isinstance(levels, int)) else n, levels)
    n = sum(counts)
    stride_values = level_strides(counts, strides)
    min_stride_ratio = settings.min_stride_ratio
    floor = None if min_stride_ratio is None else size_floor(counts, min_stride_ratio, stride_values)
    wh, n_dropped = prepare_boxes(wh)
    if len(wh) == 0:
        raise AnchorFitError(f"no boxes to fit anchors to: all {n_dropped} boxes are under "
                             f"{MIN_FIT_SIZE:g} px on both sides at this image size")
    if len(wh) < n:
        raise AnchorFitError(f"cannot fit {n} anchors to {len(wh)} boxes: give at least as many boxes "
                             "as anchors, or ask for fewer anchors")
    generator = torch.Generator().manual_seed(settings.seed)
    scale_aug = settings.scale_aug
    best = search(summarise(wh, metric=metric, thr=thr, objective=objective, scale_aug=scale_aug), n,
                  generator=generator, init=init,
                  generations=settings.generations, mutation_prob=settings.mutation_prob, sigma=settings.sigma,
                  population=population, floor=floor, progress=progress)
    anchors = sort_by_area(best.exp())
    return AnchorResult(
        anchors=anchors,
        scores=score_anchors(wh, anchors.to(wh.device), thr, metric, scale_aug=scale_aug),
        n_dropped=n_dropped,
        metric=metric,
        thr=thr,
        seed=settings.seed,
        generations=settings.generations,
        seconds=time.perf_counter() - started,
        objective=objective,
        levels=counts,
        strides=stride_values,
        min_stride_ratio=min_stride_ratio,
        scale_aug=scale_aug,
        nominal=score_anchors(wh, anchors.to(wh.device), thr, metric) if scale_aug else None,
    )
