"""How many anchors: fit every count in a range, and recommend one at the knee of the curve.

:func:`fit_anchor_counts` fits each count (multiples of ``levels`` when a number of levels is
given) and scores it exactly on every box; :func:`recommend_count` picks the count from the curve.

The knee rule
    The objective (YOLOv5's fitness by default) grows with every anchor added, with diminishing
    returns; it has no plateau to stop at (on COCO val2017 it still gains 0.007 per anchor at 15).
    The recommended count is where the curve bends most: scaled so that the range of counts and the
    range of objective values both run from 0 to 1, it is the count that lies farthest above the
    straight line joining the first and last counts (the "Kneedle" rule of Satopää et al., 2011),
    the smallest such count on a tie within :data:`KNEE_TOLERANCE`. Past it, each extra anchor
    gains less than the average gain over the whole range. When no count lies above that line
    (gains that do not diminish), the largest count is recommended; when the curve is flat (it
    spans less than :data:`FLAT_CURVE`), the smallest. Then, if the count found leaves BPR under
    ``min_bpr`` (0.98) while a larger count reaches it, the smallest such larger count is taken.
    The rule is a few lines here rather than the ``kneed`` package's ``KneeLocator``: that would add a
    dependency for one subtraction per count, and the tie and BPR rules would still be ours.

Speed
    Each count is searched from two starts: one k-means solution and the fit of the previous count
    with anchors added where the boxes are worst served, with :data:`CURVE_GENERATIONS` mutants
    (a full fit: four k-means starts, 1000 mutants); the coordinate search does most of the work.
    The summaries of the boxes are built once for all counts. On VOC 2012 trainval (32k boxes, a
    quiet 2-core machine) counts 3-15 take 0.57 s against 0.81 s for full fits of each, and every
    count's fitness is within 0.001 of a full fit's (largest gaps: 0.0008 on VOC, 0.0003 on COCO
    val2017; ``benchmarks/bench_anchors.py --sections counts`` prints both).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_autoanchor.boxes import MIN_FIT_SIZE
from lightning_autoanchor.clustering import KMeansInit
from lightning_autoanchor.errors import AnchorFitError, ConfigError
from lightning_autoanchor.evolution import LogSpaceFitness
from lightning_autoanchor.levels import level_counts, level_strides, size_floor
from lightning_autoanchor.metrics import score_anchors
from lightning_autoanchor.optimizer import (
    AnchorResult,
    prepare_boxes,
    search,
    single_thread,
    sort_by_area,
    summarise,
)
from lightning_autoanchor.progress import progress_bar
from lightning_autoanchor.settings import AnchorSettings, Metric, Objective

__all__ = [
    "CURVE_GENERATIONS",
    "DEFAULT_COUNTS",
    "FLAT_CURVE",
    "KNEE_TOLERANCE",
    "AnchorCountResult",
    "fit_anchor_counts",
    "recommend_count",
]

DEFAULT_COUNTS = range(3, 16)
"""Counts tried by default (``--n auto``): 3 to 15 anchors."""
KNEE_TOLERANCE = 0.01
"""Counts whose distance above the chord is within this (on the 0-1 scales) of the largest tie; the smallest wins."""
FLAT_CURVE = 1e-4
"""A curve whose objective spans less than this recommends the smallest count."""
CURVE_GENERATIONS = 200
"""Mutants of the evolution per count of the curve (200: the largest counts' fitness gap to a full fit
falls from 0.0014 to 0.0004 on COCO val2017, at the same speed: the evolution's moves save the
coordinate search steps)."""


@dataclass(frozen=True)
class AnchorCountResult:
    """The curve of anchor counts and the recommended count.

    Attributes:
        rows: the fit of each count, in increasing order (``rows[i].objective_value`` is the curve).
        recommended: the count the knee rule picks (see the module doc).
        objective, metric, thr: what was fitted and how boxes match.
        levels: the number of levels the counts are multiples of (``None``: any count).
        min_bpr: the BPR the recommended count should reach.
        seconds: wall time.
    """

    rows: tuple[AnchorResult, ...]
    recommended: int
    objective: Objective
    metric: Metric
    thr: float
    levels: int | None
    min_bpr: float
    seconds: float = field(compare=False)

    def row(self, n: int) -> AnchorResult:
        """The row of count ``n`` (``KeyError`` when ``n`` was not fitted)."""
        for row in self.rows:
            if row.n == n:
                return row
        raise KeyError(n)

    @property
    def counts(self) -> list[int]:
        return [row.n for row in self.rows]

    @property
    def step(self) -> int:
        """Difference between consecutive counts (the number of levels, or 1)."""
        return self.levels or 1

    def advice(self, current: int) -> str | None:
        """A sentence for a report when ``current`` anchors are more than one step from the recommended count.

        ``None`` when ``current`` is the recommended count or next to it (one level's worth of
        anchors apart, or one anchor without levels). Costs nothing: it reads the curve.
        """
        if abs(current - self.recommended) <= self.step:
            return None
        best = self.row(self.recommended)
        have = next((r for r in self.rows if r.n == current), None)
        scores = (f" ({self.objective} {have.objective_value:.4f} against {best.objective_value:.4f})"
                  if have is not None
                  else f" ({current} is outside the counts tried, {self.rows[0].n}-{self.rows[-1].n})")
        return (f"the head has {current} anchors; on these boxes {self.recommended} is the knee of the "
                f"{self.objective} curve{scores}: consider {self.recommended} anchors for the next model")

    def as_dict(self) -> dict[str, object]:
        rows = [{"n": r.n, **r.scores.as_dict(), "levels": list(r.levels),
                 "anchors": [[round(float(w), 2), round(float(h), 2)] for w, h in r.anchors.tolist()]}
                for r in self.rows]
        return {"counts": rows, "recommended": self.recommended,
                "objective": self.objective, "metric": self.metric, "thr": self.thr, "levels": self.levels,
                "min_bpr": self.min_bpr, "seconds": round(self.seconds, 4)}


def recommend_count(counts: Sequence[int], values: Sequence[float], bpr: Sequence[float] | None = None,
                    min_bpr: float = 0.98) -> int:
    """The count at the knee of the curve ``values`` over ``counts`` (the rule in the module doc).

    Args:
        counts: increasing anchor counts.
        values: the objective of each count.
        bpr: best possible recall of each count (``None``: no BPR condition).
        min_bpr: the BPR the recommended count should reach when some count does.
    """
    if len(counts) != len(values) or not counts or (bpr is not None and len(bpr) != len(counts)):
        raise ConfigError(f"recommend_count needs one value (and BPR) per count, got {len(counts)} counts, "
                          f"{len(values)} values" + ("" if bpr is None else f", {len(bpr)} BPRs"))
    if any(b <= a for a, b in itertools.pairwise(counts)):
        raise ConfigError(f"counts must increase, got {list(counts)}")
    low, high = min(values), max(values)
    if high - low < FLAT_CURVE:
        pick = 0
    elif len(counts) < 3:
        pick = len(counts) - 1
    else:
        # height above the chord from the first count's point to the last's, both axes scaled to 0-1
        span = counts[-1] - counts[0]
        above = [(v - values[0] - (values[-1] - values[0]) * (c - counts[0]) / span) / (high - low)
                 for c, v in zip(counts, values, strict=True)]
        top = max(above)
        pick = len(counts) - 1 if top <= 0 else min(i for i, a in enumerate(above) if a >= top - KNEE_TOLERANCE)
    if bpr is not None and bpr[pick] < min_bpr:
        pick = next((i for i in range(pick + 1, len(counts)) if bpr[i] >= min_bpr), pick)
    return counts[pick]


def _counts(counts: Sequence[int] | None, levels: int | None) -> list[int]:
    """The counts to fit: ``counts`` (default 3-15) that are multiples of ``levels``."""
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 1):
        raise ConfigError(f"levels must be a positive number of levels for a range of counts, got {levels!r} "
                          "(counts per level cannot be kept across counts)")
    wanted = list(DEFAULT_COUNTS if counts is None else counts)
    if not wanted or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in wanted):
        raise ConfigError(f"counts must be positive integers, got {wanted}")
    kept = sorted({c for c in wanted if levels is None or c % levels == 0})
    if not kept:
        raise ConfigError(f"no count in {wanted[0]}-{wanted[-1]} is a multiple of levels={levels}")
    return kept


def _add_anchors(fitness: LogSpaceFitness, log_anchors: Tensor, extra: int) -> Tensor:
    """``log_anchors`` ``(K, 2)`` with ``extra`` anchors added, each at the summary point worst served so far."""
    quality = fitness.raw_quality(log_anchors).amax(dim=0)
    for _ in range(extra):
        i = int((fitness.weights * (1 - quality)).argmax())
        log_anchors = torch.cat([log_anchors, fitness.points[i:i + 1]])
        quality = torch.maximum(quality, fitness.raw_quality(fitness.points[i:i + 1])[0])
    return log_anchors


def fit_anchor_counts(wh: Tensor, counts: Sequence[int] | None = None, settings: AnchorSettings | None = None, *,
                      levels: int | None = None, strides: Sequence[float] | None = None, population: int = 10,
                      init: KMeansInit = "log", progress: bool = False, **options: Any) -> AnchorCountResult:
    """Fit every anchor count in ``counts`` and recommend one (see the module doc for the rule and the speed).

    Args:
        wh: ``(N, 2)`` box widths and heights in pixels at the training size.
        counts: anchor counts to try (default 3-15); with ``levels``, only their multiples of it.
        settings: as for :func:`~lightning_autoanchor.optimizer.fit_anchors` (``options`` change its
            fields); ``generations`` are the evolution's mutants per count (without ``settings``:
            :data:`CURVE_GENERATIONS`), ``bpr_threshold`` the BPR the recommended count should reach
            (see :func:`recommend_count`), ``min_stride_ratio`` needs ``levels``.
        levels: number of detection levels sharing each count equally (``None``: any count).
        strides: pixels per cell of each level, for ``min_stride_ratio``.
        population, init: as in ``fit_anchors``.
        progress: show a progress bar over the counts on a terminal.

    Raises:
        ConfigError: an argument out of range (the message names it).
        AnchorFitError: no usable boxes, or fewer boxes than the largest count.
    """
    started = time.perf_counter()
    settings = AnchorSettings.of(settings if settings is not None else AnchorSettings(generations=CURVE_GENERATIONS),
                                 **options)
    tried = _counts(counts, levels)
    metric, thr, objective = settings.metric, float(settings.thr), settings.objective  # type: ignore[arg-type]
    min_stride_ratio, min_bpr, seed = settings.min_stride_ratio, settings.bpr_threshold, settings.seed
    generations, mutation_prob, sigma = settings.generations, settings.mutation_prob, settings.sigma
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ConfigError(f"population must be an integer >= 1, got {population!r}")
    if min_stride_ratio is not None and levels is None:
        raise ConfigError("min_stride_ratio over a range of counts needs levels (the number of levels), so that "
                          "every count is laid out over the same levels")
    if levels is not None:
        level_strides([1] * levels, strides)  # one stride per level
    wh, n_dropped = prepare_boxes(wh)
    if len(wh) < tried[-1]:
        raise AnchorFitError(f"cannot fit up to {tried[-1]} anchors to {len(wh)} boxes"
                             + (f" ({n_dropped} under {MIN_FIT_SIZE:g} px left out)" if n_dropped else ""))
    summaries = summarise(wh, metric=metric, thr=thr, objective=objective)
    generator = torch.Generator().manual_seed(seed)
    rows: list[AnchorResult] = []
    previous: Tensor | None = None
    for n in progress_bar(tried, desc="Fitting anchor counts", enabled=progress):
        started_n = time.perf_counter()
        counts_n = level_counts(n, levels)
        floor = None if min_stride_ratio is None else size_floor(counts_n, min_stride_ratio, strides)
        warm = None if previous is None else _add_anchors(summaries.rough, previous, n - len(previous))[None]
        best = search(summaries, n, generator=generator, init=init, starts=1, extra_starts=warm,
                      generations=generations, mutation_prob=mutation_prob, sigma=sigma, population=population,
                      floor=floor)
        previous = best
        anchors = sort_by_area(best.exp())
        with single_thread():  # short calls in a row: a thread pool's start-up and waits cost more than it saves
            scores = score_anchors(wh, anchors.to(wh.device), thr, metric)
        rows.append(AnchorResult(anchors, scores, n_dropped, metric, thr, seed, generations,
                                 time.perf_counter() - started_n, objective, counts_n,
                                 level_strides(counts_n, strides), min_stride_ratio))
    recommended = recommend_count([r.n for r in rows], [r.objective_value for r in rows],
                                  [r.scores.bpr for r in rows], min_bpr)
    return AnchorCountResult(tuple(rows), recommended, objective, metric, thr, levels, min_bpr,
                             time.perf_counter() - started)
