"""Anchor search in log space: YOLOv5's genetic mutation and a coordinate (pattern) search.

Both work on *log* anchor sizes ``(K, 2)`` against a weighted set of log box sizes (see
:func:`~lightning_autoanchor.boxes.log_bins`). Both match rules depend only on the differences
``log w - log a_w`` and ``log h - log a_h``:

- ratio: quality ``exp(-max(|du|, |dv|))``, a Chebyshev distance in log space;
- IoU: ``inter / (exp(du + dv) + 1 - inter)`` with ``inter = exp(min(du, 0) + min(dv, 0))``.

so a candidate's fitness costs one pass over the (small) summary, and many candidates are scored
in one batched pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_autoanchor.boxes import MIN_FIT_SIZE
from lightning_autoanchor.metrics import match_cut
from lightning_autoanchor.progress import progress_bar
from lightning_autoanchor.settings import Metric

if TYPE_CHECKING:
    from lightning_autoanchor.levels import SizeFloor

__all__ = ["LogSpaceFitness", "evolve", "refine"]


def _ratio_quality(du: Tensor, dv: Tensor) -> Tensor:
    return torch.exp(-torch.maximum(du.abs(), dv.abs()))


def _iou_quality(du: Tensor, dv: Tensor) -> Tensor:
    inter = torch.exp(du.clamp(max=0) + dv.clamp(max=0))
    return inter / (torch.exp(du + dv) + 1 - inter)


_QUALITY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ratio": _ratio_quality, "iou": _iou_quality}


class LogSpaceFitness:
    """YOLOv5's fitness of anchor sets on weighted points in log space, batched over candidates.

    Args:
        points: ``(B, 2)`` log box sizes (log pixels).
        weights: ``(B,)`` positive weight (box count) of each point.
        metric: ``"ratio"`` or ``"iou"``.
        thr: match threshold of ``metric`` (see :func:`~lightning_autoanchor.metrics.match_cut`).
    """

    def __init__(self, points: Tensor, weights: Tensor, metric: Metric = "ratio", thr: float | None = None):
        self.points = points
        self.weights = weights / weights.sum()
        self.cut = match_cut(metric, thr)
        self.kernel = _QUALITY[metric]

    def raw_quality(self, anchors: Tensor) -> Tensor:
        """``(..., K, B)`` match quality of each anchor with each point (before the match cut).

        ``anchors``: ``(..., K, 2)`` log anchor sizes.
        """
        return self.kernel(self.points[:, 0] - anchors[..., :, 0:1], self.points[:, 1] - anchors[..., :, 1:2])

    def __call__(self, anchors: Tensor) -> Tensor:
        """``(...,)`` weighted fitness of ``(..., K, 2)`` log anchor sets."""
        du = self.points[:, 0] - anchors[..., :, 0:1]
        dv = self.points[:, 1] - anchors[..., :, 1:2]
        if self.kernel is _ratio_quality:  # the best anchor is the nearest: take exp once per point
            best = torch.exp(-torch.maximum(du.abs_(), dv.abs_()).amin(dim=-2))
        else:
            best = self.kernel(du, dv).amax(dim=-2)
        return (best * (best > self.cut)) @ self.weights


def evolve(fitness: LogSpaceFitness, anchors: Tensor, *, generations: int = 1000, mutation_prob: float = 0.9,
           sigma: float = 0.1, population: int = 1, generator: torch.Generator, floor: SizeFloor | None = None,
           progress: bool = False) -> Tensor:
    """YOLOv5's anchor evolution: mutate the parent, keep the mutant if it is fitter.

    Each mutant multiplies every anchor side, with probability ``mutation_prob``, by
    ``1 + sigma * u * N(0, 1)`` clipped to ``[0.3, 3]`` (``u ~ U(0, 1)`` drawn once per mutant); at
    least one side changes, and sides stay at least :data:`MIN_FIT_SIZE` pixels. ``generations``
    mutants are scored in all, ``population`` of the current parent at a time, and the fittest of
    those replaces the parent when it is fitter: ``population=1`` is exactly YOLOv5's (1+1) scheme,
    larger values a (1+λ) scheme that scores the same number of mutants in fewer, batched passes.
    With ``floor``, every mutant is first brought within its size limits (:meth:`SizeFloor.project
    <lightning_autoanchor.levels.SizeFloor.project>`), so the search stays among allowed anchors.

    Args:
        fitness: the objective.
        anchors: ``(K, 2)`` log anchor sizes to start from, or ``(S, K, 2)`` for ``S`` independent
            parents evolved side by side (each scores ``generations`` mutants); within ``floor``.
        floor: per-rank size limits, or ``None``.

    Returns:
        Log anchor sizes shaped like ``anchors``, never less fit.
    """
    min_log = math.log(MIN_FIT_SIZE)
    parents = anchors[None] if anchors.ndim == 2 else anchors
    parent_fitness = fitness(parents)  # (S,)
    n_parents = len(parents)
    side_count = parents[0].numel()
    rows = torch.arange(n_parents, device=parents.device)
    rounds = -(-generations // population)
    for _ in progress_bar(range(rounds), desc="Evolving anchors", enabled=progress):
        shape = (n_parents, population, *parents.shape[1:])
        mutate = torch.rand(shape, generator=generator) < mutation_prob
        unchanged = ~mutate.flatten(2).any(dim=2)
        if bool(unchanged.any()):  # every mutant changes at least one side (YOLOv5 redraws instead)
            which = unchanged.nonzero()
            side = torch.randint(side_count, (len(which),), generator=generator)
            mutate.flatten(2)[which[:, 0], which[:, 1], side] = True
        spread = torch.rand((n_parents, population, 1, 1), generator=generator) * sigma
        factor = (mutate * spread * torch.randn(shape, generator=generator) + 1).clamp(0.3, 3.0)
        mutants = (parents[:, None] + factor.log()).clamp(min=min_log)  # (S, λ, K, 2)
        if floor is not None:
            mutants = floor.project(mutants)
        scores = fitness(mutants)  # (S, λ)
        best_score, best = scores.max(dim=1)
        better = best_score > parent_fitness
        parents = torch.where(better[:, None, None], mutants[rows, best], parents)
        parent_fitness = torch.where(better, best_score, parent_fitness)
    return parents[0] if anchors.ndim == 2 else parents


_MIN_GAIN = 1e-6
"""Smallest fitness gain a move must bring (guards against float32 round-off cycles)."""
_DIRECTIONS = torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [1, -1], [-1, 1], [-1, -1]],
                           dtype=torch.float32)


def refine(fitness: LogSpaceFitness, anchors: Tensor, *, step: float = 0.1, min_step: float = 1e-3,
           max_rounds: int = 2_000, floor: SizeFloor | None = None) -> Tensor:
    """Coordinate (pattern) search: move anchors by ``step`` in log space while fitness rises.

    Every round scores all ``8 K`` single-anchor moves (one ``step`` along an axis or a diagonal)
    against each point's best quality among the *other* anchors. A move of length ``step`` changes
    a quality by at most a factor ``exp(2 step)``, so only the points an anchor could win or lose
    are scored for it: about ``8 B`` evaluations a round instead of ``8 K B``. Then the set of all
    helpful moves and the single best move are both scored exactly and the fitter is taken; when no
    move helps, ``step`` halves, down to ``min_step``. Ends at a local maximum.
    With ``floor``, moves that would leave the set outside its size limits are not taken (nor is
    the set of all helpful moves when it would be): the search stays among allowed anchors.

    Args:
        fitness: the objective.
        anchors: ``(K, 2)`` log anchor sizes to start from, or ``(S, K, 2)`` for ``S`` independent
            searches run side by side; within ``floor``.
        step: first move length (log units; 0.1 is about 10 %).
        min_step: a search ends when its ``step`` falls below this.
        floor: per-rank size limits, or ``None``.

    Returns:
        Log anchor sizes shaped like ``anchors``, never less fit.
    """
    batch = anchors[None] if anchors.ndim == 2 else anchors
    n_starts, k, _ = batch.shape
    directions = _DIRECTIONS.to(batch.device)
    anchor_ids = torch.arange(k, device=batch.device)[None, :, None]
    min_log = math.log(MIN_FIT_SIZE)
    points, weights, cut = fitness.points, fitness.weights, fitness.cut
    steps = torch.full((n_starts,), float(step), device=batch.device)
    raw = fitness.raw_quality(batch)  # (S, K, B)
    quality = raw * (raw > cut)
    current = quality.amax(dim=1) @ weights  # (S,)
    for _ in range(max_rounds):
        active = steps >= min_step
        if not bool(active.any()):
            break
        best_value, best_id = quality.max(dim=1)  # (S, B)
        is_best = best_id[:, None, :] == anchor_ids  # (S, K, B)
        runner_up = quality.masked_fill(is_best, 0).amax(dim=1)
        others = torch.where(is_best, runner_up[:, None, :], best_value[:, None, :])  # best of the other anchors
        reach = raw * torch.exp(2 * steps)[:, None, None]  # no move of this anchor does better on a point
        in_play = (is_best | (reach > others.clamp(min=cut))) & active[:, None, None]
        s_idx, k_idx, p_idx = in_play.nonzero(as_tuple=True)
        candidates = (batch[:, :, None, :] + steps[:, None, None, None] * directions).clamp(min=min_log)
        moved = candidates[s_idx, k_idx]  # (P, 8, 2)
        moved_quality = fitness.kernel(points[p_idx, None, 0] - moved[..., 0], points[p_idx, None, 1] - moved[..., 1])
        moved_quality = moved_quality * (moved_quality > cut)
        rest = others[s_idx, k_idx, p_idx][:, None]
        gains = (torch.maximum(moved_quality, rest) - rest) * weights[p_idx, None]  # (P, 8)
        scores = (others @ weights)[..., None] + torch.zeros(n_starts * k, 8, device=batch.device).index_add_(
            0, s_idx * k + k_idx, gains).view(n_starts, k, 8)
        if floor is not None:  # a move must keep the set within the limits: (S, K, 8, K) sets, one anchor moved
            moved_sets = torch.where(torch.eye(k, dtype=torch.bool, device=batch.device)[None, :, None, :, None],
                                     candidates[:, :, :, None, :], batch[:, None, None, :, :])
            scores = scores.masked_fill(~floor.allows(moved_sets), -1.0)
        best_score, best_dir = scores.max(dim=2)  # (S, K)
        helps = (best_score > current[:, None] + _MIN_GAIN) & active[:, None]
        improving = helps.any(dim=1)
        steps = torch.where(improving | ~active, steps, steps / 2)
        if not bool(improving.any()):
            continue
        chosen = candidates.gather(2, best_dir[:, :, None, None].expand(-1, -1, 1, 2))[:, :, 0]  # (S, K, 2)
        mover_s, mover_k = helps.nonzero(as_tuple=True)
        mover_raw = fitness.raw_quality(chosen[mover_s, mover_k][:, None, :])[:, 0]  # (M, B)
        mover_quality = mover_raw * (mover_raw > cut)
        # Take every helpful move at once, or the single best move (its fitness is already exact),
        # whichever is fitter.
        together = quality.clone()
        together[mover_s, mover_k] = mover_quality
        together_score = together.amax(dim=1) @ weights  # (S,)
        single_score, single_k = best_score.masked_fill(~helps, -1.0).max(dim=1)
        all_at_once = together_score > single_score
        if floor is not None:
            together_sets = batch.clone()
            together_sets[mover_s, mover_k] = chosen[mover_s, mover_k]
            all_at_once &= floor.allows(together_sets)
        keep = all_at_once[mover_s] | (mover_k == single_k[mover_s])
        s_kept, k_kept = mover_s[keep], mover_k[keep]
        batch = batch.clone()
        batch[s_kept, k_kept] = chosen[s_kept, k_kept]
        raw[s_kept, k_kept] = mover_raw[keep]
        quality[s_kept, k_kept] = mover_quality[keep]
        current = torch.where(improving, torch.where(all_at_once, together_score, single_score), current)
    return batch[0] if anchors.ndim == 2 else batch
