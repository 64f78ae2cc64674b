"""Per-level size limits (``min_stride_ratio``) inside the fit, and who owns the boxes per level."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lightning_autoanchor.boxes import BoxSet, log_bins
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.evolution import LogSpaceFitness, evolve, refine
from lightning_autoanchor.levels import anchor_levels, level_counts, level_shares, size_floor
from lightning_autoanchor.metrics import score_anchors
from lightning_autoanchor.optimizer import fit_anchors

from .conftest import DATA, YOLOV5_DEFAULT_ANCHORS


def sizes_by_level(anchors: torch.Tensor, counts: tuple[int, ...], strides: tuple[float, ...]) -> list[torch.Tensor]:
    """``sqrt(w h)`` of the anchors (sorted by area) on each level, in the order of ``counts``."""
    level = anchor_levels(counts, strides)
    size = anchors.prod(dim=1).sqrt()
    return [size[level == i] for i in range(len(counts))]


@pytest.mark.parametrize("ratio", [3.0, 4.0])
def test_limits_hold_and_beat_fitting_freely_then_clipping(voc2007: BoxSet, ratio: float) -> None:
    """At 320 px, VOC's small boxes want anchors under 3-4x the stride: the limits bind."""
    wh = voc2007.scaled(320)
    free = fit_anchors(wh, 9, generations=0)
    limited = fit_anchors(wh, 9, generations=0, min_stride_ratio=ratio)
    for size, stride in zip(sizes_by_level(limited.anchors, (3, 3, 3), (8, 16, 32)), (8, 16, 32), strict=True):
        assert bool((size >= ratio * stride).all()), (size, stride)
    clipped = size_floor((3, 3, 3), ratio).project(free.anchors.log()).exp()
    assert not bool((sizes_by_level(free.anchors, (3, 3, 3), (8, 16, 32))[0] >= ratio * 8).all()), "limits bind"
    assert limited.scores.fitness > score_anchors(wh, clipped).fitness + 0.002
    assert limited.min_stride_ratio == ratio and limited.levels == (3, 3, 3) and limited.strides == (8, 16, 32)


def test_limits_follow_uneven_levels_and_strides_in_any_order(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(640)
    counts, strides = (4, 2, 3), (32.0, 8.0, 16.0)  # levels given coarse first: 4 anchors at stride 32
    result = fit_anchors(wh, levels=counts, strides=strides, min_stride_ratio=4.0, generations=100)
    assert len(result.anchors) == 9 and result.levels == counts and result.strides == strides
    for size, stride, count in zip(sizes_by_level(result.anchors, counts, strides), strides, counts, strict=True):
        assert len(size) == count and bool((size >= 4.0 * stride).all()), (size, stride)
    assert anchor_levels(counts, strides).tolist() == [1, 1, 2, 2, 2, 0, 0, 0, 0]


def test_loose_limits_change_nothing(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(640)
    free = fit_anchors(wh, 9, generations=200)
    assert torch.equal(free.anchors, fit_anchors(wh, 9, generations=200, min_stride_ratio=0.1).anchors)


def test_project_lifts_only_anchors_under_their_limit() -> None:
    floor = size_floor((2, 2), 2.0, (8, 16))  # sizes at least 16, 16, 32, 32 by area rank
    anchors = torch.tensor([[24.0, 24], [4, 16], [64, 64], [10, 40]])  # sizes 24, 8, 64, 20: ranks 2, 0, 3, 1
    lifted = floor.project(anchors.log()).exp()
    size = lifted.prod(dim=1).sqrt()
    assert size.tolist() == pytest.approx([32, 16, 64, 20], rel=1e-5)
    assert (lifted[:, 0] / lifted[:, 1]).tolist() == pytest.approx((anchors[:, 0] / anchors[:, 1]).tolist(), rel=1e-5)
    assert torch.equal(lifted[[2, 3]], anchors[[2, 3]])
    assert bool(floor.allows(lifted.log())) and not bool(floor.allows(anchors.log()))
    assert torch.allclose(floor.project(lifted.log()), lifted.log())


def test_evolution_and_coordinate_search_stay_within_the_limits(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(320)
    fitness = LogSpaceFitness(*log_bins(wh, 0.1))
    floor = size_floor((3, 3, 3), 3.0)
    start = floor.project(torch.from_numpy(YOLOV5_DEFAULT_ANCHORS).log() - math.log(2))
    evolved = evolve(fitness, start, generations=300, population=10, generator=torch.Generator().manual_seed(0),
                     floor=floor)
    assert bool(floor.allows(evolved)) and float(fitness(evolved)) >= float(fitness(start))
    refined = refine(fitness, evolved, step=0.2, min_step=0.01, floor=floor)
    assert bool(floor.allows(refined)) and float(fitness(refined)) >= float(fitness(evolved))
    free = refine(fitness, evolved, step=0.2, min_step=0.01)
    assert not bool(floor.allows(free)), "without the limits the search leaves them"


def test_coordinate_search_takes_no_set_of_moves_that_breaks_the_limits_together() -> None:
    """Either anchor may shrink alone (it then ranks first, limit 8 px), not both (the larger must stay >= 32 px)."""
    floor = size_floor((1, 1), 1.0, (8, 32))
    boxes = torch.tensor([[16.0, 16]] * 50 + [[32.0, 8]] * 50)
    fitness = LogSpaceFitness(*log_bins(boxes, 0.05))
    start = torch.tensor([[32.0, 32], [64, 16]]).log()  # both of size 32, each wants to shrink to its cluster
    assert bool(floor.allows(start))
    end = refine(fitness, start, step=0.2, min_step=0.05, floor=floor)
    assert bool(floor.allows(end)) and float(fitness(end)) > float(fitness(start))


def test_level_shares_count_each_box_once_on_its_best_anchors_level() -> None:
    anchors = torch.tensor([[10.0, 10], [20, 20], [40, 40], [80, 80]])
    wh = torch.tensor([[10.0, 10], [11, 9], [21, 19], [80, 80], [79, 81]])
    shares = level_shares(wh, anchors, torch.tensor([0, 0, 1, 1]))
    assert shares.tolist() == pytest.approx([3 / 5, 2 / 5])
    empty = level_shares(wh, anchors, torch.tensor([0, 1, 2, 2]))
    assert empty.tolist() == pytest.approx([2 / 5, 1 / 5, 2 / 5])
    assert level_shares(wh, anchors, torch.tensor([0, 0, 2, 2])).tolist() == pytest.approx([3 / 5, 0, 2 / 5])


def test_level_shares_show_the_limits_moving_boxes_up(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(320)
    level = anchor_levels((3, 3, 3))
    free = level_shares(wh, fit_anchors(wh, 9, generations=0).anchors, level)
    limited = level_shares(wh, fit_anchors(wh, 9, generations=0, min_stride_ratio=4.0).anchors, level)
    assert float(free.sum()) == pytest.approx(1.0) and float(limited.sum()) == pytest.approx(1.0)
    assert float(limited[0]) > float(free[0]), "small boxes pile onto the smallest anchors, now held at 32 px"


@pytest.mark.parametrize("ratio", [0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_ratio_is_refused_by_name(voc2007: BoxSet, ratio: object) -> None:
    with pytest.raises(ConfigError, match=r"min_stride_ratio must be a multiple of the level's stride"):
        fit_anchors(voc2007.scaled(640), 9, min_stride_ratio=ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"levels": 3, "strides": (8, 16)}, "3 levels need 3 strides"),
    ({"strides": (8, 0, 32)}, "strides must be positive"),
    ({"levels": (3, 3, 4)}, "hold 10 anchors, but n is 9"),
    ({"levels": (3, 0, 6)}, "positive integers"),
    ({"levels": 2}, "cannot be split evenly over 2 levels"),
])
def test_bad_levels_are_refused(voc2007: BoxSet, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fit_anchors(voc2007.scaled(640), 9, min_stride_ratio=1.0, **kwargs)


def test_level_counts_default_rule() -> None:
    assert level_counts(9) == (3, 3, 3)
    assert level_counts(10) == (10,)
    assert level_counts(None, (3, 3, 4)) == (3, 3, 4)
    assert level_counts(12, 4) == (3, 3, 3, 3)


def test_cli_min_stride_ratio_keeps_the_limits_and_shows_the_levels() -> None:
    args = ["compute", DATA / "coco2017_val_150.json.gz", "--img-size", 320, "--min-stride-ratio", 4,
            "--strides", "8,16,32", "--generations", 100, "--quiet", "--json"]
    proc = subprocess.run([sys.executable, "-m", "lightning_autoanchor.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["min_stride_ratio"] == 4 and out["levels"] == [3, 3, 3] and out["strides"] == [8, 16, 32]
    sizes = sizes_by_level(torch.tensor(out["anchors"]), (3, 3, 3), (8, 16, 32))
    assert all(bool((size >= 4 * stride).all()) for size, stride in zip(sizes, (8, 16, 32), strict=True))
    assert len(out["level_shares"]) == 3 and sum(out["level_shares"]) == pytest.approx(1.0)
