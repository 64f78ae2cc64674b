"""Fit anchors in a torchvision detector's own structure, maximising the placed recall.

Three structures are fitted, each keeping the number of anchors per location of every level (the head's
convolutions are built for it) and the slot order:

torchvision's ``AnchorGenerator(sizes, aspect_ratios)``
    level ``l`` has ``len(sizes[l]) * len(aspect_ratios[l])`` cell anchors, ratio-major (slot
    ``r * len(sizes[l]) + s``); aspect ratio ``a = h / w``, ``w = size / sqrt(a)``, ``h = size * sqrt(a)``,
    computed in float32 and with the corners ``(-w/2, -h/2, w/2, h/2)`` rounded to whole pixels, so the
    generated anchor is ``2 * round(w / 2)`` by ``2 * round(h / 2)`` pixels. Fitted: the sizes of every level
    and the aspect ratios of every level (or one set shared by all levels, ``shared_ratios=True``); with
    ``refactor=True`` also the split of the anchors per location into sizes x ratios (Faster R-CNN's 3 per
    location as 3 sizes x 1 ratio: placed recall 0.48 on COCO val at the RPN's 0.7, against 0.43 as 1 x 3).
SSD's ``DefaultBoxGenerator(aspect_ratios, scales=...)``
    level ``k`` has the square boxes ``s_k`` and ``sqrt(s_k s_{k+1})`` and, for each of its aspect ratios
    ``a``, the boxes ``(s_k sqrt(a), s_k / sqrt(a))`` and ``(s_k / sqrt(a), s_k sqrt(a))``, relative to the
    fixed input size and clipped to 1. Fitted: the ``L + 1`` scales and the aspect ratio values of every
    level (kept ``>= 1``, as the slot order ``(w, h), (h, w)`` reads them).
Free anchors (:class:`FreeAnchors`, a custom head declaring anchors on a grid)
    level ``l`` has ``A_l`` anchors of any width and height (pixels), generated as they are. Fitted: the
    width and height of every anchor (rounded to 0.01 px, float32).

Scores are exact for what the generator really produces (:mod:`lightning_autoanchor.placed`): fitted
values are rounded (sizes to 0.01 px, ratios and SSD scales to 1e-4) before they are scored, and the
rounded values are the result, so pasting them into the model's constructor gives the scored anchors.

**Search.** A pattern search in log space over the parameters, with moves of one parameter and of a whole level's
sizes (or all SSD scales; free anchors: both sides of one anchor, all anchors of a level) together: a move scores
``_SPAN`` steps on either side in one batch and takes the best, compared by placed recall at the threshold, then
mean best IoU; each move keeps its own step, halved when the move does not help, until every step is below 1 %. It
is incremental: the IoUs of every box with every current cell anchor are cached, and a move re-scores only the
anchors it changes, only on the boxes it could change (an upper bound of the candidates' IoUs against the best of
the unchanged anchors), so a move on RetinaNet's COCO boxes costs about 2 ms. The recall is a step function with
many local maxima, so the search climbs from the start along a path of lower thresholds (``thr - 0.1``,
``thr - 0.05``, then ``thr``: smoother, wider coverage first; steps down to 4 %), then hops between basins
(variable-neighbourhood basin hopping; a private :class:`torch.Generator` seeded with ``seed``): ``restarts`` times
it kicks the parameters of one random level (15 % of the time two adjacent levels) from the best so far, a level's
sizes together by N(0, 0.5) in log space and each single parameter by a third of that, climbs the moves touching
those levels back on the rows no other level matches (about 0.04 s a kick on RetinaNet's COCO boxes, against 0.15 s
for a climb on every row), and keeps the result if the recall rises; a fine climb follows. A polish ends it
(:func:`_polish`): every two parameters of one level (two sizes, two ratios, or a size and a ratio, unless the
ratios are shared; SSD: two ratios of a level; free anchors: an anchor's width and height) move together to the
best point of a square grid around their values, ±15 % in 1.5 % steps, then ±3 % in 0.25 % steps; a pair that moves
queues the pairs of its level and the adjacent ones again. Generated anchors are whole even pixels, so two
parameters moved together, and by less than the climb's 1 %, reach anchors no single move reaches: after the search
above (60 kicks), the polish adds 3-16 of RetinaNet's COCO val boxes (mean 9) in about 0.7 s. A grid point is first
ranked by a quick count on the rows at stake only (:meth:`_Scorer.guide`), and the best-ranked ones are scored
exactly before one is taken. With ``refactor``, every factorisation climbs and the best one hops. On COCO val2017's
36,335 boxes placed for RetinaNet (threshold 0.5), the default fit (40 kicks, then the polish) reaches placed
recall 0.9678-0.9684 over seeds 0-11, mean 0.96803, in 3.7-5.1 s (mean 4.4 s) on two cores; 60 kicks without the
polish, run in turn with it seed by seed: 0.9676-0.9681, mean 0.96776, in 3.8-5.2 s (mean 4.3 s); global kicks of
every parameter from the best, as the fit did before that: 0.9669-0.9674. Kicks of up to three adjacent levels
reach more but cost more (a kick of two or three levels climbs 8,000-22,000 rows against 1,500-9,000 for one, and
costs four or nine times as much): 240 of them give mean 0.9681 (at best 0.9684) in about 24 s. Two threads
climbing kicks side by side gave no speed-up (a kick's tensors are small: the GIL stays busy). For box sets over
``max_search_rows`` rows, the search runs on a seeded subsample; the start and the result are scored exactly on
every box, and the start is kept unless the result beats it there.

Hand-written rather than ``scipy.optimize.differential_evolution``: one exact placed score of
RetinaNet's 45 cell anchors on COCO val's 36k boxes costs about 11 ms, and a differential evolution
over its 30 parameters (scipy's default population: 15 per parameter) spends 450 of them, 5 s, on each
generation; the search here reaches a better recall in about 4 s (``benchmarks/bench_torchvision.py``,
which also runs a differential evolution on centred boxes side by side).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_autoanchor.errors import AnchorFitError, ConfigError
from lightning_autoanchor.optimizer import single_thread
from lightning_autoanchor.placed import PlacedBoxes, PlacedScores, check_iou_threshold

__all__ = [
    "DefaultBoxes",
    "FreeAnchors",
    "GeneratorAnchors",
    "GridFitResult",
    "default_box_cell_anchors",
    "fit_anchor_generator",
    "fit_default_boxes",
    "fit_free_anchors",
    "generator_cell_anchors",
]

MAX_SEARCH_ROWS = 60_000
"""Box rows the search runs on; larger sets are subsampled for the search (seeded), scored on every row."""

RESTARTS = 40
"""Level kicks of the search: random kicks of one level's (or two adjacent levels') parameters from the best
solution so far, each climbed back (about 0.04 s each on RetinaNet's COCO boxes)."""

_STEP, _RESTART_STEP, _FINAL_STEP, _MIN_STEP = 0.2, 0.1, 0.02, 0.01  # log units: 0.2 is a 22 % change
_COARSE_STEP = 0.04  # the smallest step of the climbs before the final one
_SPAN = 2
_KICK, _PAIR = 0.5, 0.15  # level kicks: a level's sizes by N(0, 0.5) together; 15 % of kicks take two levels
_POLISH = ((0.15, 0.015), (0.03, 0.0025))  # pair grids of the polish: half width, step (log units)
_POLISH_TIES, _GUIDE_TOLERANCE = 64, 1e-2  # a row weighs 1 / len(min_size tuple): far above the tolerance
_GRADUATED = (0.1, 0.05)  # the lower thresholds climbed first, below thr
_MIN_THR = 0.05
_MIN_SIZE, _MAX_SIZE = 2.0, 1e5
_MAX_RATIO = 16.0


def generator_cell_anchors(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]]) -> list[Tensor]:
    """Widths and heights of the cell anchors torchvision's ``AnchorGenerator`` generates.

    Args:
        sizes: per level, anchor sizes (pixels).
        aspect_ratios: per level, aspect ratios ``h / w``.

    Returns:
        per level an ``(len(aspect_ratios[l]) * len(sizes[l]), 2)`` float32 tensor of widths and heights
        (pixels), ratio-major, rounded as the generator rounds the corners.
    """
    if len(sizes) != len(aspect_ratios):
        raise ConfigError(f"{len(sizes)} levels of sizes but {len(aspect_ratios)} of aspect ratios")
    return [_generator_wh(torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32))
            for s, a in zip(sizes, aspect_ratios, strict=True)]


def _generator_wh(sizes: Tensor, ratios: Tensor) -> Tensor:
    """``(..., R * S, 2)`` anchors of ``(..., S)`` sizes and ``(..., R)`` ratios, as ``AnchorGenerator`` computes
    them in float32 (``round`` of the half side is symmetric, so a side is twice the rounded half side)."""
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[..., :, None] * sizes[..., None, :]).flatten(-2)
    hs = (h_ratios[..., :, None] * sizes[..., None, :]).flatten(-2)
    return torch.stack([(ws / 2).round() * 2, (hs / 2).round() * 2], dim=-1)


def default_box_cell_anchors(scales: Sequence[float], aspect_ratios: Sequence[Sequence[float]],
                             image_size: tuple[int, int], clip: bool = True) -> list[Tensor]:
    """Widths and heights of the default boxes SSD's ``DefaultBoxGenerator`` generates at each location.

    Args:
        scales: ``L + 1`` scales relative to the input size.
        aspect_ratios: per level, the aspect ratios (each gives two boxes, ``(w, h)`` and ``(h, w)``).
        image_size: ``(width, height)`` of the (fixed) network input in pixels.
        clip: clip the relative sizes to 1, as the generator does by default.

    Returns:
        per level a ``(2 + 2 * len(aspect_ratios[l]), 2)`` float32 tensor of widths and heights (pixels).
    """
    if len(scales) != len(aspect_ratios) + 1:
        raise ConfigError(f"SSD needs one more scale than levels: {len(scales)} scales for "
                          f"{len(aspect_ratios)} levels of aspect ratios")
    size = torch.tensor(image_size, dtype=torch.float32)
    out = []
    for k, ratios in enumerate(aspect_ratios):
        s_k, s_prime = float(scales[k]), math.sqrt(float(scales[k]) * float(scales[k + 1]))
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ar in ratios:
            root = math.sqrt(ar)
            pairs.extend([[s_k * root, s_k / root], [s_k / root, s_k * root]])
        wh = torch.as_tensor(pairs, dtype=torch.float32)
        out.append((wh.clamp(min=0, max=1) if clip else wh) * size)
    return out


def _tuples(values: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in level) for level in values)


@dataclass(frozen=True)
class GeneratorAnchors:
    """The arguments of torchvision's ``AnchorGenerator(sizes, aspect_ratios)``: per level, sizes (pixels) and
    aspect ratios (``h / w``)."""

    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", _tuples(self.sizes))
        object.__setattr__(self, "aspect_ratios", _tuples(self.aspect_ratios))
        if not self.sizes or len(self.sizes) != len(self.aspect_ratios):
            raise ConfigError(f"AnchorGenerator needs sizes and aspect ratios for the same levels, got "
                              f"{len(self.sizes)} and {len(self.aspect_ratios)}")
        values = [v for level in self.sizes + self.aspect_ratios for v in level]
        if not all(level for level in self.sizes + self.aspect_ratios) or not all(
                math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(f"every level needs positive sizes and aspect ratios, got sizes {self.sizes} and "
                              f"aspect ratios {self.aspect_ratios}")

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True)]

    def cell_anchors(self) -> list[Tensor]:
        """Per level ``(A_l, 2)`` widths and heights (pixels) the generator produces."""
        return generator_cell_anchors(self.sizes, self.aspect_ratios)

    def as_dict(self) -> dict[str, object]:
        return {"sizes": [list(s) for s in self.sizes], "aspect_ratios": [list(a) for a in self.aspect_ratios]}


@dataclass(frozen=True)
class DefaultBoxes:
    """SSD's ``DefaultBoxGenerator(aspect_ratios, scales=scales, clip=clip)`` on a fixed ``image_size``
    (``(width, height)`` pixels)."""

    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    image_size: tuple[int, int]
    clip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "aspect_ratios", _tuples(self.aspect_ratios))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.scales) != len(self.aspect_ratios) + 1 or not self.aspect_ratios:
            raise ConfigError(f"SSD needs one more scale than levels: {len(self.scales)} scales for "
                              f"{len(self.aspect_ratios)} levels of aspect ratios")
        if not all(math.isfinite(s) and s > 0 for s in self.scales) or not all(
                math.isfinite(a) and a > 0 for level in self.aspect_ratios for a in level):
            raise ConfigError(f"SSD scales and aspect ratios must be positive, got {self.scales} and "
                              f"{self.aspect_ratios}")

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def cell_anchors(self) -> list[Tensor]:
        """Per level ``(A_l, 2)`` widths and heights (pixels) the generator produces."""
        return default_box_cell_anchors(self.scales, self.aspect_ratios, self.image_size, self.clip)

    def as_dict(self) -> dict[str, object]:
        return {"scales": list(self.scales), "aspect_ratios": [list(a) for a in self.aspect_ratios],
                "clip": self.clip}


@dataclass(frozen=True)
class FreeAnchors:
    """Free cell anchors of a custom head: per level ``A_l`` ``(width, height)`` pairs in pixels.

    Values are kept as float32 numbers (what a head's anchor tensor holds), so the anchors read back from a
    float32 head equal the ones written.
    """

    wh: tuple[tuple[tuple[float, float], ...], ...]

    def __post_init__(self) -> None:
        try:
            levels = tuple(tuple((_f32(w), _f32(h)) for w, h in level) for level in self.wh)
        except (TypeError, ValueError):
            raise ConfigError(f"free anchors must be, per level, (width, height) pairs of pixels, got {self.wh!r}") \
                from None
        object.__setattr__(self, "wh", levels)
        if not levels or not all(levels) or not all(math.isfinite(v) and v > 0 for level in levels
                                                    for pair in level for v in pair):
            raise ConfigError(f"free anchors need every level to hold positive, finite (width, height) pairs, got "
                              f"{self.wh}")

    @classmethod
    def of(cls, anchors: Tensor) -> FreeAnchors:
        """From a ``(levels, per_level, 2)`` tensor of widths and heights in pixels."""
        if anchors.ndim != 3 or anchors.shape[-1] != 2:
            raise ConfigError(f"free anchors must be a (levels, per_level, 2) tensor, got shape {tuple(anchors.shape)}")
        return cls(anchors.detach().to(torch.float32).cpu().tolist())

    def num_anchors_per_location(self) -> list[int]:
        return [len(level) for level in self.wh]

    def cell_anchors(self) -> list[Tensor]:
        """Per level ``(A_l, 2)`` float32 widths and heights (pixels), as they are."""
        return [torch.tensor(level, dtype=torch.float32) for level in self.wh]

    def as_dict(self) -> dict[str, object]:
        """Each value as the shortest decimal that reads back as the same float32 (``10.76``, not
        ``10.760000228881836``)."""
        return {"wh": [[[float(str(np.float32(v))) for v in pair] for pair in level] for level in self.wh]}


def _f32(value: float) -> float:
    return float(np.float32(float(value)))


@dataclass(frozen=True)
class GridFitResult:
    """Anchors fitted in a detector's structure, with exact placed scores on every box.

    Attributes:
        anchors: the fitted generator arguments.
        scores: their placed scores on every box.
        start: the placed scores of the anchors the fit started from, on every box.
        n_search_rows: box rows the search ran on (all, or a seeded subsample).
        seed: seed of the private random generator.
        seconds: wall time of the fit.
    """

    anchors: GeneratorAnchors | DefaultBoxes | FreeAnchors
    scores: PlacedScores
    start: PlacedScores
    n_search_rows: int
    seed: int
    seconds: float = field(compare=False)

    def as_dict(self) -> dict[str, object]:
        return {**self.anchors.as_dict(), **self.scores.as_dict(),
                "start": self.start.as_dict(), "n_search_rows": self.n_search_rows, "seed": self.seed,
                "seconds": round(self.seconds, 4)}


# ------------------------------------------------------------------------------------------------------
# Structures: parameters in log space -> cell anchors of every level
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Move:
    """A direction in parameter space, the cell anchors it changes (``{level: columns}``) and those it keeps."""

    direction: np.ndarray
    touched: dict[int, Tensor]
    kept: dict[int, Tensor]

    @classmethod
    def of(cls, direction: np.ndarray, touched: dict[int, Tensor], counts: Sequence[int]) -> _Move:
        kept = {}
        for level, cols in touched.items():
            keep = torch.ones(counts[level], dtype=torch.bool)
            keep[cols] = False
            kept[level] = keep.nonzero()[:, 0]
        return cls(direction, touched, kept)


class _GeneratorStructure:
    """``AnchorGenerator``: per level ``S_l`` log sizes, then ``R_l`` log ratios (or ``R`` shared at the end)."""

    def __init__(self, start: GeneratorAnchors, shared_ratios: bool):
        self.counts = [(len(s), len(a)) for s, a in zip(start.sizes, start.aspect_ratios, strict=True)]
        if shared_ratios and len({a for _, a in self.counts}) != 1:
            raise ConfigError(f"shared aspect ratios need the same number on every level, got "
                              f"{[a for _, a in self.counts]}")
        self.shared = shared_ratios
        logs: list[float] = []
        self.size_ix, self.ratio_ix = [], []
        for s, a in zip(start.sizes, start.aspect_ratios, strict=True):
            self.size_ix.append(np.arange(len(logs), len(logs) + len(s)))
            logs.extend(math.log(v) for v in s)
            if not shared_ratios:
                self.ratio_ix.append(np.arange(len(logs), len(logs) + len(a)))
                logs.extend(math.log(v) for v in a)
        if shared_ratios:
            ix = np.arange(len(logs), len(logs) + len(start.aspect_ratios[0]))
            logs.extend(math.log(v) for v in np.exp(np.mean(np.log(start.aspect_ratios), axis=0)))
            self.ratio_ix = [ix] * len(self.counts)
        self.theta0 = np.array(logs)
        low, high = np.empty_like(self.theta0), np.empty_like(self.theta0)
        for s_ix, r_ix in zip(self.size_ix, self.ratio_ix, strict=True):
            low[s_ix], high[s_ix] = math.log(_MIN_SIZE), math.log(_MAX_SIZE)
            low[r_ix], high[r_ix] = -math.log(_MAX_RATIO), math.log(_MAX_RATIO)
        self.bounds = (low, high)
        self.moves = self._moves()
        self.pairs = [] if shared_ratios else self._pairs()  # a shared ratio touches every level

    def _moves(self) -> list[_Move]:
        moves = []
        eye = np.eye(len(self.theta0))
        counts = [n_sizes * n_ratios for n_sizes, n_ratios in self.counts]
        for level, ((n_sizes, _), s_ix, r_ix) in enumerate(zip(self.counts, self.size_ix, self.ratio_ix, strict=True)):
            for s in range(n_sizes):
                moves.append(_Move.of(eye[s_ix[s]], {level: torch.arange(len(r_ix)) * n_sizes + s}, counts))
            if n_sizes > 1:
                moves.append(_Move.of(eye[s_ix].sum(0), {level: torch.arange(counts[level])}, counts))
            if not self.shared:
                for r in range(len(r_ix)):
                    moves.append(_Move.of(eye[r_ix[r]], {level: torch.arange(n_sizes) + r * n_sizes}, counts))
        if self.shared:
            for r in range(len(self.ratio_ix[0])):
                touched = {level: torch.arange(n_sizes) + r * n_sizes for level, (n_sizes, _) in enumerate(self.counts)}
                moves.append(_Move.of(eye[self.ratio_ix[0][r]], touched, counts))
        return moves

    def _pairs(self) -> list[_Pair]:
        """Every two parameters of a level (two sizes, two ratios, a size and a ratio) and the anchors they change."""
        pairs = []
        for level, ((n_sizes, n_ratios), s_ix, r_ix) in enumerate(zip(self.counts, self.size_ix, self.ratio_ix,
                                                                      strict=True)):
            params = [(p, {r * n_sizes + s for r in range(n_ratios)}) for s, p in enumerate(s_ix)]
            params += [(p, {r * n_sizes + s for s in range(n_sizes)}) for r, p in enumerate(r_ix)]
            pairs += [(level, p, q, torch.tensor(sorted(cols_p | cols_q)))
                      for i, (p, cols_p) in enumerate(params) for q, cols_q in params[i + 1:]]
        return pairs

    def params(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rounded ``(C, P)`` sizes and ratios values of ``(C, P)`` log parameters."""
        values = np.exp(theta)
        return np.round(values, 2), np.round(values, 4)

    def anchors(self, theta: np.ndarray, levels: Iterable[int] | None = None) -> dict[int, Tensor]:
        """``{level: (C, A_l, 2)}`` cell anchors of ``(C, P)`` log parameters, for ``levels`` (default all)."""
        sizes, ratios = (torch.from_numpy(v).to(torch.float32) for v in self.params(theta))
        return {level: _generator_wh(sizes[:, self.size_ix[level]], ratios[:, self.ratio_ix[level]])
                for level in (range(len(self.counts)) if levels is None else levels)}

    def result(self, theta: np.ndarray) -> GeneratorAnchors:
        sizes, ratios = self.params(theta[None])
        return GeneratorAnchors(sizes=[sizes[0, ix].tolist() for ix in self.size_ix],
                                aspect_ratios=[ratios[0, ix].tolist() for ix in self.ratio_ix])


class _DefaultBoxStructure:
    """``DefaultBoxGenerator``: ``L + 1`` log scales, then per level the log aspect ratios (kept >= 0)."""

    def __init__(self, start: DefaultBoxes):
        self.start = start
        n_levels = len(start.aspect_ratios)
        logs = [math.log(s) for s in start.scales]
        self.ratio_ix = []
        for ratios in start.aspect_ratios:
            self.ratio_ix.append(np.arange(len(logs), len(logs) + len(ratios)))
            logs.extend(abs(math.log(a)) for a in ratios)
        self.theta0 = np.array(logs)
        n = len(logs)
        low = np.full(n, 0.0)
        high = np.full(n, math.log(_MAX_RATIO))
        low[:n_levels + 1], high[:n_levels + 1] = math.log(1e-3), math.log(2.0)
        self.bounds = (low, high)
        counts = [2 + 2 * len(r) for r in start.aspect_ratios]
        all_cols = [torch.arange(c) for c in counts]
        eye = np.eye(n)
        self.moves = []
        for k in range(n_levels + 1):  # scale k: every box of level k, the second square box of level k - 1
            touched = {k: all_cols[k]} if k < n_levels else {}
            if k > 0:
                touched[k - 1] = torch.tensor([1])
            self.moves.append(_Move.of(eye[k], touched, counts))
        for k, ix in enumerate(self.ratio_ix):
            for i, p in enumerate(ix):
                self.moves.append(_Move.of(eye[p], {k: torch.tensor([2 + 2 * i, 3 + 2 * i])}, counts))
        self.moves.append(_Move.of(eye[:n_levels + 1].sum(0), dict(enumerate(all_cols)), counts))
        # two aspect ratios of a level (a scale touches two levels)
        self.pairs = [(k, p, q, torch.tensor([2 + 2 * i, 3 + 2 * i, 2 + 2 * j, 3 + 2 * j]))
                      for k, ix in enumerate(self.ratio_ix)
                      for i, p in enumerate(ix) for j, q in enumerate(ix) if i < j]

    def anchors(self, theta: np.ndarray, levels: Iterable[int] | None = None) -> dict[int, Tensor]:
        """``{level: (C, A_l, 2)}`` cell anchors of ``(C, P)`` log parameters, for ``levels`` (default all)."""
        n_levels = len(self.ratio_ix)
        scales = np.round(np.exp(theta[:, :n_levels + 1]), 4)
        size = torch.tensor(self.start.image_size, dtype=torch.float32)
        out = {}
        for k in range(n_levels) if levels is None else levels:
            ix = self.ratio_ix[k]
            s_k, s_next = scales[:, k:k + 1], scales[:, k + 1:k + 2]
            root = np.sqrt(np.round(np.exp(theta[:, ix]), 4))
            pairs = [np.repeat(s_k, 2, axis=1), np.repeat(np.sqrt(s_k * s_next), 2, axis=1)]
            for i in range(len(ix)):
                w, h = s_k[:, 0] * root[:, i], s_k[:, 0] / root[:, i]
                pairs.extend([np.stack([w, h], 1), np.stack([h, w], 1)])
            wh = torch.from_numpy(np.stack(pairs, axis=1)).to(torch.float32)
            out[k] = (wh.clamp(min=0, max=1) if self.start.clip else wh) * size
        return out

    def result(self, theta: np.ndarray) -> DefaultBoxes:
        n_levels = len(self.ratio_ix)
        return DefaultBoxes(scales=np.round(np.exp(theta[:n_levels + 1]), 4).tolist(),
                            aspect_ratios=[np.round(np.exp(theta[ix]), 4).tolist() for ix in self.ratio_ix],
                            image_size=self.start.image_size, clip=self.start.clip)


class _FreeStructure:
    """Free anchors: per anchor its log width and log height, in level order."""

    def __init__(self, start: FreeAnchors):
        self.counts = start.num_anchors_per_location()
        self.first = np.cumsum([0, *self.counts])[:-1]  # index of each level's first anchor
        self.theta0 = np.log(np.array([v for level in start.wh for pair in level for v in pair], dtype=np.float64))
        self.bounds = (np.full_like(self.theta0, math.log(_MIN_SIZE)), np.full_like(self.theta0, math.log(_MAX_SIZE)))
        eye = np.eye(len(self.theta0))
        self.moves = []
        for level, count in enumerate(self.counts):
            for a in range(count):
                ix = 2 * (self.first[level] + a)
                col = {level: torch.tensor([a])}
                self.moves += [_Move.of(eye[ix], col, self.counts), _Move.of(eye[ix + 1], col, self.counts),
                               _Move.of(eye[ix] + eye[ix + 1], col, self.counts)]
            if count > 1:
                ix = 2 * self.first[level]
                self.moves.append(_Move.of(eye[ix:ix + 2 * count].sum(0), {level: torch.arange(count)}, self.counts))
        self.pairs = [(level, 2 * (self.first[level] + a), 2 * (self.first[level] + a) + 1, torch.tensor([a]))
                      for level, count in enumerate(self.counts) for a in range(count)]

    def anchors(self, theta: np.ndarray, levels: Iterable[int] | None = None) -> dict[int, Tensor]:
        """``{level: (C, A_l, 2)}`` cell anchors of ``(C, P)`` log parameters, for ``levels`` (default all)."""
        wh = torch.from_numpy(np.round(np.exp(theta), 2)).to(torch.float32).view(len(theta), -1, 2)
        return {level: wh[:, self.first[level]:self.first[level] + self.counts[level]]
                for level in (range(len(self.counts)) if levels is None else levels)}

    def result(self, theta: np.ndarray) -> FreeAnchors:
        wh = self.anchors(theta[None])
        return FreeAnchors([wh[level][0].tolist() for level in range(len(self.counts))])


_Structure = _GeneratorStructure | _DefaultBoxStructure | _FreeStructure
_Pair = tuple[int, int, int, Tensor]
"""A pair of parameters moved together on a fine grid by :func:`_polish`: the level, the two parameters' indices and
the level's cell anchors they change."""


# ------------------------------------------------------------------------------------------------------
# Incremental scoring and the search
# ------------------------------------------------------------------------------------------------------

class _Scorer:
    """Placed recall and mean best IoU of candidate changes to a current set of cell anchors.

    Keeps the IoUs of every row with every current cell anchor (``(A_l, N)`` per level), each level's
    best and the best two levels of every row; a candidate is scored on the anchors it changes only,
    against the best of the others. Box columns are kept as contiguous ``(N, 1)`` tensors: elementwise
    operations on strided views of an ``(N, L, 2)`` tensor are about ten times slower.
    """

    def __init__(self, placed: PlacedBoxes, thr: float, anchors: dict[int, Tensor]):
        self.thr = thr
        self.w, self.h = placed.wh[:, 0:1].contiguous(), placed.wh[:, 1:2].contiguous()
        self.area = self.w * self.h
        # (w / 2 - |dx|): the overlap along x with an anchor of width a is min(w, a, that + a / 2), at least 0
        self.reach_x = [(self.w / 2 - placed.dxy[:, level, 0:1]).contiguous() for level in range(placed.num_levels)]
        self.reach_y = [(self.h / 2 - placed.dxy[:, level, 1:2]).contiguous() for level in range(placed.num_levels)]
        self.weight = placed.weight.to(torch.float64)
        self.iou = [torch.empty(0)] * placed.num_levels
        self.reset(anchors)

    def _overlap(self, level: int, anchors: Tensor, rows: Tensor | None) -> Tensor:
        """``(n, A)`` overlap of the rows (all, or ``rows``) with ``(A, 2)`` anchors at the level's offsets."""
        w, h, rx, ry = self.w, self.h, self.reach_x[level], self.reach_y[level]
        if rows is not None:
            w, h, rx, ry = w[rows], h[rows], rx[rows], ry[rows]
        aw, ah = anchors[:, 0], anchors[:, 1]
        ix = torch.minimum(torch.minimum(w, aw), rx + aw / 2).clamp_(min=0)
        iy = torch.minimum(torch.minimum(h, ah), ry + ah / 2).clamp_(min=0)
        return ix.mul_(iy)

    def _iou(self, level: int, anchors: Tensor, rows: Tensor | None) -> Tensor:
        inter = self._overlap(level, anchors, rows)
        area = self.area if rows is None else self.area[rows]
        return inter.div_((area + anchors.prod(dim=1)).sub_(inter))

    def best_outside(self, levels: Iterable[int]) -> Tensor:
        """``(N,)`` best IoU of every row with the current anchors of every level but ``levels`` (0 if none)."""
        levels = set(levels)
        if len(levels) == 1:
            (level,) = levels
            return torch.where(self.first == level, self.second_best, self.first_best)
        others = [level for level in range(len(self.iou)) if level not in levels]
        return self.level_best[others].amax(dim=0) if others else torch.zeros(len(self.w))

    def _rest(self, move: _Move, rows: Tensor | None = None) -> Tensor:
        """``(n, 1)`` best IoU of the rows (all, or ``rows``) with the anchors ``move`` keeps."""
        rest = self.best_outside(move.touched)
        if rows is not None:
            rest = rest[rows]
        for level, cols in move.kept.items():
            if len(cols):
                kept = self.iou[level][cols]
                rest = torch.maximum(rest, (kept if rows is None else kept[:, rows]).amax(dim=0))
        return rest[:, None]

    def _bound(self, level: int, anchors: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(n, 1)`` upper bound of the overlap and lower bound of the union of the rows (all, or ``rows``) with
        any of ``(K, 2)`` anchors at the level's offsets: the overlap of the largest sides, at most the box's area
        and the largest anchor area; the smallest anchor area, or the larger of it and the box's area."""
        areas = anchors.prod(dim=1)
        smallest, largest = float(areas.min()), float(areas.max())
        area = self.area if rows is None else self.area[rows]
        overlap = self._overlap(level, anchors.amax(dim=0, keepdim=True), rows)
        overlap = torch.minimum(overlap, area).clamp_(max=largest)
        return overlap, torch.maximum(area + smallest - overlap, area.clamp(min=smallest))

    def evaluate(self, move: _Move, candidates: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        """``(C,)`` weighted recall and mean best IoU, up to a constant shared by all candidates, with the
        anchors ``move`` touches replaced by ``candidates`` (per level ``(C, A_l, 2)``).

        Only rows that some candidate could change are scored: a row whose best untouched IoU is at least
        an upper bound of every candidate's IoU keeps it. The IoU ``I / (w h + A - I)`` rises with the
        overlap ``I`` and falls with the anchor area ``A``; the bound takes for ``I`` the overlap of the
        largest candidate sides, at most the box's area and the largest candidate area, and for the union
        the smallest candidate area, or the larger of the box's area and the smallest candidate area (:meth:`_bound`).
        """
        rest = self._rest(move)
        in_play = None
        for level, cols in move.touched.items():
            overlap, union = self._bound(level, candidates[level][:, cols].flatten(0, 1), None)
            play = overlap > rest * union
            in_play = play if in_play is None else in_play | play
        rows = in_play[:, 0].nonzero()[:, 0]
        n_candidates = next(iter(candidates.values())).shape[0]
        best = rest[rows].expand(-1, n_candidates)
        for level, cols in move.touched.items():
            iou = self._iou(level, candidates[level][:, cols].reshape(-1, 2), rows)
            best = torch.maximum(best, iou.view(len(rows), n_candidates, len(cols)).amax(dim=2))
        best = best.to(torch.float64)
        weight = self.weight[rows]
        return weight @ (best >= self.thr).to(torch.float64), weight @ best

    def guide(self, move: _Move, candidates: Tensor) -> Tensor:
        """``(C,)`` weighted count (float32, a guide for :meth:`evaluate`) of the rows that no anchor ``move``
        keeps matches and candidate cell anchors ``(C, K, 2)`` of its one level do.

        Each distinct candidate anchor is scored once, on the rows at stake: those no kept anchor matches that
        the largest candidate sides could match (the bound of :meth:`evaluate`, at the threshold).
        """
        ((level, _),) = move.touched.items()
        rows = (self.best_outside({level}) < self.thr).nonzero()[:, 0]
        rest = self._rest(move, rows)
        bits = candidates.contiguous().view(torch.int32).to(torch.int64)  # one key per (w, h): their float32 bits
        distinct, inverse = torch.unique((bits[..., 0] << 32) | bits[..., 1], return_inverse=True)
        anchors = torch.empty(len(distinct), 2)
        anchors[inverse.flatten()] = candidates.reshape(-1, 2)
        overlap, union = self._bound(level, anchors, rows)
        rows = rows[((rest < self.thr) & (overlap >= self.thr * union))[:, 0]]
        matched = (self._iou(level, anchors, rows) >= self.thr).T.contiguous()  # (anchors, rows): gathers of rows
        some = matched.any(dim=0)
        matched, rows = matched[:, some], rows[some]
        hit = matched[inverse[:, 0]]
        for column in range(1, inverse.shape[1]):  # (about five times faster than any() over the columns)
            hit |= matched[inverse[:, column]]
        return hit.to(torch.float32) @ self.weight[rows].to(torch.float32)

    def commit(self, touched: dict[int, Tensor], anchors: dict[int, Tensor]) -> None:
        """Make ``anchors`` (per level ``(A_l, 2)``) current; only the ``touched`` columns changed."""
        for level, cols in touched.items():
            self.iou[level][cols] = self._iou(level, anchors[level][cols], None).T
            self.level_best[level] = self.iou[level].amax(dim=0)
        self._best_two_levels()

    def reset(self, anchors: dict[int, Tensor]) -> None:
        """Make ``anchors`` (per level ``(A_l, 2)``) current."""
        self.iou = [self._iou(level, anchors[level], None).T.contiguous() for level in range(len(self.iou))]
        self.level_best = torch.stack([iou.amax(dim=0) for iou in self.iou])
        self._best_two_levels()

    def _best_two_levels(self) -> None:
        self.first_best, self.first = self.level_best.max(dim=0)
        others = self.level_best.scatter(0, self.first[None], 0.0)
        self.second_best = others.amax(dim=0)

    def total(self) -> tuple[float, float]:
        """Weighted recall and mean best IoU (both unnormalised) of the current anchors."""
        best = self.first_best.to(torch.float64)
        return float(self.weight @ (best >= self.thr).to(torch.float64)), float(self.weight @ best)


def _best(recall: Tensor, mean_iou: Tensor) -> int:
    """Index of the best candidate: the highest recall, then the highest mean best IoU."""
    top = recall >= recall.max() - 1e-9
    return int(torch.where(top, mean_iou, torch.full_like(mean_iou, -math.inf)).argmax())


def _climb(scorer: _Scorer, structure: _Structure, theta: np.ndarray, step: float,
           moves: Sequence[_Move] | None = None, min_step: float = _MIN_STEP) -> np.ndarray:
    """Pattern search from ``theta`` (``scorer`` holds its anchors), with a step per move (of ``moves``,
    default all the structure's).

    Each move scores ``_SPAN`` steps on either side of the current parameters in one batch and takes the
    best (recall, then mean best IoU) if it is better than staying; a move that does not help halves its
    step, and the search ends when every step is below ``min_step``. A step per move spends no scoring
    on moves that are already settled while others still travel (about half the scoring of halving one
    step for all moves, for the same result).
    """
    low, high = structure.bounds
    offsets = np.arange(-_SPAN, _SPAN + 1, dtype=np.float64)
    moves = structure.moves if moves is None else moves
    steps = np.full(len(moves), step)
    while (steps >= min_step).any():
        for i, move in enumerate(moves):
            if steps[i] < min_step:
                continue
            candidates = np.clip(theta + steps[i] * offsets[:, None] * move.direction, low, high)
            anchors = structure.anchors(candidates, move.touched)
            recall, mean_iou = scorer.evaluate(move, anchors)
            pick = _best(recall, mean_iou)
            if (float(recall[pick]), float(mean_iou[pick])) > (float(recall[_SPAN]), float(mean_iou[_SPAN])):
                theta = candidates[pick]
                scorer.commit(move.touched, {level: a[pick] for level, a in anchors.items()})
            else:
                steps[i] /= 2
    return theta


def _polish(scorer: _Scorer, structure: _Structure, theta: np.ndarray, half: float, step: float) -> np.ndarray:
    """Move each of the structure's pairs of parameters to the best point of a square grid around their current
    values (``half`` either side, ``step`` apart, log units), in turn; a pair that moves queues again every pair of
    its level and the adjacent ones (those whose rows at stake it changes most), until the queue is empty
    (``scorer`` holds ``theta``'s anchors).

    The points are ranked by :meth:`_Scorer.guide`; the current one and the best-ranked ones (the nearest
    ``_POLISH_TIES``) are then scored exactly (recall, then mean best IoU), and the best of them is taken if
    its recall rises.
    """
    offsets = np.arange(-half, half + step / 2, step)
    grid = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 2)
    grid = grid[np.argsort(np.abs(grid).sum(axis=1), kind="stable")]  # the current point first, then the nearest
    low, high = structure.bounds
    counts = [len(iou) for iou in scorer.iou]
    moves = [_Move.of(np.zeros_like(theta), {level: cols}, counts) for level, _, _, cols in structure.pairs]
    queue = deque(range(len(moves)))
    while queue:
        index = queue.popleft()
        (level, p, q, cols), move = structure.pairs[index], moves[index]
        candidates = np.repeat(theta[None], len(grid), axis=0)
        candidates[:, p] += grid[:, 0]
        candidates[:, q] += grid[:, 1]
        candidates = np.clip(candidates, low, high)
        count = scorer.guide(move, structure.anchors(candidates, [level])[level][:, cols])
        if float(count.max()) <= float(count[0]) + _GUIDE_TOLERANCE:
            continue
        ranked = (count >= count.max() - _GUIDE_TOLERANCE).nonzero()[:, 0][:_POLISH_TIES]
        chosen = np.concatenate([[0], ranked.numpy()])
        anchors = structure.anchors(candidates[chosen], [level])
        recall, mean_iou = scorer.evaluate(move, anchors)
        pick = _best(recall, mean_iou)
        if float(recall[pick]) > float(recall[0]) + 1e-9:
            theta = candidates[chosen[pick]]
            scorer.commit(move.touched, {level: anchors[level][pick]})
            queue.extend(other for other, pair in enumerate(structure.pairs)
                         if abs(pair[0] - level) <= 1 and other not in queue)
    return theta


def _level_kick(placed: PlacedBoxes, structure: _Structure, scorer: _Scorer, theta: np.ndarray, levels: set[int],
                noise: np.ndarray) -> tuple[np.ndarray, float]:
    """Kick the moves touching ``levels`` (and no level beyond their neighbours: an SSD scale touches two) from
    ``theta`` (``scorer`` holds its anchors) and climb them back, on the rows no level they leave alone
    matches (those matches cannot change). Returns the parameters and their weighted recall on every row
    (unnormalised).

    The kick moves each move's direction by ``noise`` (one normal number per move) times ``_KICK``, a third
    of it for a move of one parameter: a level's sizes travel together, one size or ratio less.
    """
    low, high = structure.bounds
    near = levels | {level + 1 for level in levels} | {level - 1 for level in levels}
    moves = [(i, move) for i, move in enumerate(structure.moves)
             if set(move.touched) & levels and set(move.touched) <= near]
    kicked = theta + sum(noise[i] * _KICK * (1 if np.count_nonzero(move.direction) > 1 else 1 / 3) * move.direction
                         for i, move in moves)
    kicked = np.clip(kicked, low, high)
    free = scorer.best_outside(set().union(*(move.touched for _, move in moves))) < scorer.thr
    kept = float(scorer.weight[~free].sum())
    if not bool(free.any()):
        return theta, kept
    sub = _Scorer(placed.rows(free.nonzero()[:, 0]), scorer.thr, _anchors_of(structure, kicked))
    kicked = _climb(sub, structure, kicked, _RESTART_STEP, [move for _, move in moves], _COARSE_STEP)
    return kicked, kept + sub.total()[0]


def _anchors_of(structure: _Structure, theta: np.ndarray) -> dict[int, Tensor]:
    return {level: a[0] for level, a in structure.anchors(theta[None]).items()}


def _ascend(placed: PlacedBoxes, structure: _Structure, thr: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Climb from the start along lower thresholds up to ``thr`` (coarse steps). Returns the parameters and
    their (recall, mean best IoU) at ``thr`` (unnormalised)."""
    theta = structure.theta0
    for lower in _GRADUATED:
        theta = _climb(_Scorer(placed, max(thr - lower, _MIN_THR), _anchors_of(structure, theta)), structure, theta,
                       _STEP, min_step=_COARSE_STEP)
    scorer = _Scorer(placed, thr, _anchors_of(structure, theta))
    theta = _climb(scorer, structure, theta, _RESTART_STEP, min_step=_COARSE_STEP)
    return theta, scorer.total()


def _hop(placed: PlacedBoxes, structure: _Structure, thr: float, theta: np.ndarray, restarts: int,
         generator: torch.Generator) -> np.ndarray:
    """``restarts`` level kicks of the best so far (a random level, or with chance ``_PAIR`` it and the next;
    kept if the recall rises), then a fine climb and the polish. Returns the best parameters found."""
    scorer = _Scorer(placed, thr, _anchors_of(structure, theta))
    recall = scorer.total()[0]
    n_levels = len(scorer.iou)
    for _ in range(restarts):
        level = int(torch.randint(n_levels, (1,), generator=generator))
        pair = float(torch.rand(1, generator=generator, dtype=torch.float64)) < _PAIR and level + 1 < n_levels
        noise = torch.randn(len(structure.moves), generator=generator, dtype=torch.float64).numpy()
        candidate, candidate_recall = _level_kick(placed, structure, scorer, theta,
                                                  {level, level + 1} if pair else {level}, noise)
        if candidate_recall > recall + 1e-6:
            theta, recall = candidate, candidate_recall
            scorer.reset(_anchors_of(structure, theta))
    theta = _climb(scorer, structure, theta, _FINAL_STEP)
    for half, step in _POLISH:
        theta = _polish(scorer, structure, theta, half, step)
    return theta


def _fit(placed: PlacedBoxes, structures: Sequence[_Structure],
         start: GeneratorAnchors | DefaultBoxes | FreeAnchors, thr: float, seed: int, restarts: int,
         max_search_rows: int) -> GridFitResult:
    """Climb from each structure's start (same seed), hop from the best climb only, score each result on every
    row, keep the best unless ``start`` scores at least as well."""
    started = time.perf_counter()
    thr = check_iou_threshold(thr)
    if len(placed.wh) == 0:
        raise AnchorFitError("no boxes to fit anchors to (none is 2 px or more at the network input)")
    start_anchors = start.cell_anchors()
    if len(start_anchors) != placed.num_levels:
        raise ConfigError(f"the anchors have {len(start_anchors)} levels but the boxes were placed on "
                          f"{placed.num_levels}")
    if max_search_rows < 1 or restarts < 0:
        raise ConfigError(f"max_search_rows must be positive and restarts >= 0, got {max_search_rows} and {restarts}")
    start_scores = placed.score(start_anchors, thr)
    generator = torch.Generator().manual_seed(seed)
    search_rows = placed
    if len(placed.wh) > max_search_rows:
        search_rows = placed.rows(torch.randperm(len(placed.wh), generator=generator)[:max_search_rows])
    with single_thread():
        climbs = [_ascend(search_rows, structure, thr) for structure in structures]
        best = max(range(len(climbs)), key=lambda i: climbs[i][1])
        thetas = [theta for theta, _ in climbs]
        thetas[best] = _hop(search_rows, structures[best], thr, thetas[best], restarts, generator)
    fitted, scores = start, start_scores
    for structure, theta in zip(structures, thetas, strict=True):
        candidate = structure.result(theta)
        candidate_scores = placed.score(candidate.cell_anchors(), thr)
        if candidate_scores.beats(scores):  # on a subsample, a search may end below the start on every row
            fitted, scores = candidate, candidate_scores
    return GridFitResult(fitted, scores, start_scores, len(search_rows.wh), seed, time.perf_counter() - started)


def _refactored(start: GeneratorAnchors, n_sizes: int, n_ratios: int) -> GeneratorAnchors:
    """``start`` with ``n_sizes`` sizes and ``n_ratios`` ratios on every level, spread over the range of its
    anchors' sizes (``sqrt(w h)``) and ratios on each level (at least a factor 2 for a spread)."""
    def spread(values: Sequence[float], n: int) -> tuple[float, ...]:
        low, high = math.log(min(values)), math.log(max(values))
        middle = (low + high) / 2
        half = max((high - low) / 2, math.log(2) / 2)
        return (round(math.exp(middle), 4),) if n == 1 else tuple(
            round(math.exp(v), 4) for v in np.linspace(middle - half, middle + half, n))
    return GeneratorAnchors([spread(sizes, n_sizes) for sizes in start.sizes],
                            [spread(ratios, n_ratios) for ratios in start.aspect_ratios])


def fit_anchor_generator(placed: PlacedBoxes, start: GeneratorAnchors, thr: float, *, shared_ratios: bool = False,
                         refactor: bool = False, seed: int = 0, restarts: int = RESTARTS,
                         max_search_rows: int = MAX_SEARCH_ROWS) -> GridFitResult:
    """Fit the sizes and aspect ratios of a torchvision ``AnchorGenerator`` to placed boxes.

    Keeps the number of anchors per location of every level and the slot order (ratio-major); maximises the
    placed recall at ``thr`` (ties: mean best IoU), starting from ``start``.

    Args:
        placed: boxes with their offsets to every level's grid (:func:`~lightning_autoanchor.placed.place_boxes`).
        start: the generator's current arguments (where the search starts).
        thr: the matcher's foreground IoU threshold (RetinaNet 0.5, Faster R-CNN's RPN 0.7).
        shared_ratios: one set of aspect ratios for all levels (else each level has its own).
        refactor: also fit, for every way of writing the anchors per location as ``sizes x ratios`` on all
            levels (3 = 1 x 3 or 3 x 1; 9 = 1 x 9, 3 x 3 or 9 x 1), and keep the best; the result may then have
            other numbers of sizes and ratios than ``start`` (never another number of anchors per location).
            Each way costs a climb (the best one then hops). Off: the numbers of sizes and of ratios of every
            level are kept.
        seed: seed of the private random generator (subsample, level kicks); equal seeds give equal anchors.
        restarts: level kicks of the search (more: slower, and sometimes better; with ``refactor``, for the best
            factorisation only).
        max_search_rows: box rows the search runs on at most (a seeded subsample beyond).

    Returns:
        the fitted arguments, never scoring below ``start`` on ``placed`` (``start`` itself if nothing better
        is found).
    """
    starts = [start]
    per_location = start.num_anchors_per_location()
    if refactor and len(set(per_location)) == 1:
        count = per_location[0]
        starts.extend(_refactored(start, n, count // n) for n in range(1, count + 1)
                      if count % n == 0 and any((len(s), len(a)) != (n, count // n)
                                                for s, a in zip(start.sizes, start.aspect_ratios, strict=True)))
    return _fit(placed, [_GeneratorStructure(s, shared_ratios) for s in starts], start, thr, seed, restarts,
                max_search_rows)


def fit_default_boxes(placed: PlacedBoxes, start: DefaultBoxes, thr: float, *, seed: int = 0,
                      restarts: int = RESTARTS, max_search_rows: int = MAX_SEARCH_ROWS) -> GridFitResult:
    """Fit the scales and per-level aspect ratio values of SSD's ``DefaultBoxGenerator`` to placed boxes.

    Keeps the number of aspect ratios of every level (so the boxes per location); maximises the placed
    recall at ``thr`` (ties: mean best IoU), starting from ``start``. Arguments as
    :func:`fit_anchor_generator`; ``placed`` must be placed on SSD's grids (centre offset 0.5, strides = steps).
    """
    return _fit(placed, [_DefaultBoxStructure(start)], start, thr, seed, restarts, max_search_rows)


def fit_free_anchors(placed: PlacedBoxes, start: FreeAnchors, thr: float, *, seed: int = 0,
                     restarts: int = RESTARTS, max_search_rows: int = MAX_SEARCH_ROWS) -> GridFitResult:
    """Fit the width and height of every free anchor (a custom head declaring anchors on a grid) to placed boxes.

    Keeps the number of anchors of every level and their level; maximises the placed recall at ``thr``
    (ties: mean best IoU), starting from ``start``. Arguments as :func:`fit_anchor_generator`; ``placed``
    must be placed on the head's grids (its strides and centre offset).
    """
    return _fit(placed, [_FreeStructure(start)], start, thr, seed, restarts, max_search_rows)
