"""Fit anchors to a box set: k-means, evolution, coordinate search, exact scores.

:func:`fit_anchors` is the one entry point. It never touches the global random streams: every draw
comes from a private :class:`torch.Generator` seeded with ``seed``, so a fit is reproducible and
leaves training's randomness as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_autoanchor.augment import augment_log_bins, check_scale_aug
from lightning_autoanchor.boxes import MIN_FIT_SIZE, fit_mask, log_bins
from lightning_autoanchor.clustering import KMeansInit, initial_anchors
from lightning_autoanchor.errors import AnchorFitError, ConfigError
from lightning_autoanchor.evolution import MIN_ANCHOR_SIZE, LogSpaceFitness, evolve, refine
from lightning_autoanchor.metrics import DEFAULT_THR, AnchorScores, Metric, match_cut, score_anchors

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
    scale_aug: float = 0.0
    nominal: AnchorScores | None = None

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


def fit_anchors(wh: Tensor, n: int = 9, *, thr: float | None = None, metric: Metric = "ratio",
                generations: int = 1000, mutation_prob: float = 0.9, sigma: float = 0.1,
                population: int = 10, init: KMeansInit = "log", seed: int = 0, scale_aug: float = 0.0,
                progress: bool = False) -> AnchorResult:
    """Fit ``n`` anchors to box sizes.

    Anchor sides are at least 2 px (as YOLOv5's evolution keeps them).

    Steps: summarise the boxes on a log-space grid (:func:`log_bins`); start from
    :data:`KMEANS_STARTS` k-means solutions (``init``); evolve each with YOLOv5's mutation
    (:func:`~lightning_autoanchor.evolution.evolve`, ``generations`` mutants split over the starts);
    climb to a local maximum by coordinate search (:func:`~lightning_autoanchor.evolution.refine`);
    polish the fittest on a finer grid; sort by area; score exactly on every box.
    With ``scale_aug``, all of it runs on the boxes as the training's scale augmentation shows them: the
    summary is convolved with the distribution of the log factor (:mod:`lightning_autoanchor.augment`).

    Args:
        wh: ``(N, 2)`` box widths and heights in pixels at the training size
            (e.g. :meth:`BoxSet.scaled <lightning_autoanchor.boxes.BoxSet.scaled>`). Boxes under 2 px on
            both sides are left out.
        n: number of anchors (all levels together).
        thr: match threshold (``None``: 4.0 for ``metric="ratio"``, 0.5 for ``"iou"``).
        metric: ``"ratio"`` (YOLOv5) or ``"iou"``; see :mod:`lightning_autoanchor.metrics`.
        generations: mutants scored by the evolution in all (YOLOv5: 1000); 0 skips it.
        mutation_prob: probability that a mutant changes each anchor side (YOLOv5: 0.9).
        sigma: mutation strength (YOLOv5: 0.1).
        population: mutants scored together per generation (1: YOLOv5's (1+1) scheme).
        init: k-means flavour for the starts: ``"log"``, ``"iou"`` or ``"euclidean"`` (YOLOv5's).
        seed: seed of the private random generator; equal seeds give equal anchors.
        scale_aug: the training's scale augmentation ``a`` in ``[0, 1)``: each image scaled by a factor
            uniform on ``[1 - a, 1 + a]`` (YOLOv5's hyperparameter ``scale``; multi-scale training likewise).
            The fit maximises, and ``scores`` report, the expected fit over that factor; ``nominal`` the
            fit at factor 1. 0: no augmentation.
        progress: show a progress bar on a terminal.

    Raises:
        AnchorFitError: no usable boxes, fewer boxes than anchors, or non-finite sizes.
        ConfigError: an argument out of range.
    """
    started = time.perf_counter()
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (number of anchors) must be a positive integer, got {n!r}")
    if generations < 0 or population < 1:
        raise ConfigError(f"generations must be >= 0 and population >= 1, got {generations} and {population}")
    if not (0.0 <= mutation_prob <= 1.0) or not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ConfigError(f"mutation_prob must be in [0, 1] and sigma >= 0, got {mutation_prob} and {sigma}")
    thr = DEFAULT_THR[metric] if thr is None else float(thr)
    match_cut(metric, thr)
    scale_aug = check_scale_aug(scale_aug)
    wh, n_dropped = prepare_boxes(wh)
    if len(wh) == 0:
        raise AnchorFitError(f"no boxes to fit anchors to: all {n_dropped} boxes are under "
                             f"{MIN_FIT_SIZE:g} px on both sides at this image size")
    if len(wh) < n:
        raise AnchorFitError(f"cannot fit {n} anchors to {len(wh)} boxes: give at least as many boxes "
                             "as anchors, or ask for fewer anchors")
    generator = torch.Generator().manual_seed(seed)

    # Summaries are built where the boxes are (a GPU, for boxes on one). The search runs on the CPU
    # and on one thread: its tensors are small, so per-operation overhead sets the pace, and a thread
    # pool that waits for a core another process holds would slow each of its thousands of steps.
    points, weights = (t.cpu() for t in log_bins(wh, FINE_BIN))
    with single_thread():
        if scale_aug:
            points, weights = augment_log_bins(points, weights, scale_aug, FINE_BIN)
        fine = LogSpaceFitness(points, weights, metric=metric, thr=thr)
        coarse = LogSpaceFitness(*log_bins(fine.points.exp(), COARSE_BIN, fine.weights), metric=metric, thr=thr)
        rough = LogSpaceFitness(*log_bins(coarse.points.exp(), ROUGH_BIN, coarse.weights), metric=metric, thr=thr)
        starts = initial_anchors(rough.points.exp(), n, init, weights=rough.weights, generator=generator,
                                 starts=KMEANS_STARTS).clamp(min=MIN_ANCHOR_SIZE).log()
        if generations:
            starts = evolve(rough, starts, generations=-(-generations // KMEANS_STARTS), mutation_prob=mutation_prob,
                            sigma=sigma, population=population, generator=generator, progress=progress)
        starts = refine(coarse, starts, step=COARSE_BIN, min_step=COARSE_BIN / 4)
        best = starts[int(coarse(starts).argmax())]
        best = refine(fine, best, step=FINE_BIN / 2, min_step=FINE_BIN / 20)

    anchors = sort_by_area(best.exp())
    return AnchorResult(
        anchors=anchors,
        scores=score_anchors(wh, anchors.to(wh.device), thr, metric, scale_aug=scale_aug),
        n_dropped=n_dropped,
        metric=metric,
        thr=thr,
        seed=seed,
        generations=generations,
        seconds=time.perf_counter() - started,
        scale_aug=scale_aug,
        nominal=score_anchors(wh, anchors.to(wh.device), thr, metric) if scale_aug else None,
    )
