"""Metric functions against hand-computed values, and the one-pass scorer against them."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.metrics import (
    anchor_fitness,
    anchors_above_threshold,
    average_iou,
    best_possible_recall,
    match_cut,
    match_quality,
    ratio_metric,
    score_anchors,
    wh_iou,
)

# Three boxes, two anchors (pixels). Worked by hand:
# ratio metric = min over w, h of min(r, 1/r):
#   box (10, 10):  anchor (10, 10) -> 1.0        anchor (40, 20) -> min(10/40, 10/20) = 0.25
#   box (30, 15):  anchor (10, 10) -> min(1/3, 1/1.5) = 1/3   anchor (40, 20) -> min(30/40, 15/20) = 0.75
#   box (100, 4):  anchor (10, 10) -> min(0.1, 0.4) = 0.1     anchor (40, 20) -> min(0.4, 0.2) = 0.2
# width/height IoU = min(w) * min(h) / (area_box + area_anchor - inter):
#   box (10, 10):  (10, 10) -> 1.0               (40, 20) -> 100 / (100 + 800 - 100) = 0.125
#   box (30, 15):  (10, 10) -> 100 / (450 + 100 - 100) = 2/9   (40, 20) -> 450 / 800 = 0.5625
#   box (100, 4):  (10, 10) -> 40 / (400 + 100 - 40) = 40/460  (40, 20) -> 160 / (400 + 800 - 160) = 160/1040
WH = torch.tensor([[10.0, 10.0], [30.0, 15.0], [100.0, 4.0]])
ANCHORS = torch.tensor([[10.0, 10.0], [40.0, 20.0]])
RATIO = torch.tensor([[1.0, 0.25], [1 / 3, 0.75], [0.1, 0.2]])
IOU = torch.tensor([[1.0, 0.125], [2 / 9, 0.5625], [40 / 460, 160 / 1040]])


def test_ratio_metric_matches_hand_values() -> None:
    torch.testing.assert_close(ratio_metric(WH, ANCHORS), RATIO)


def test_wh_iou_matches_hand_values() -> None:
    torch.testing.assert_close(wh_iou(WH, ANCHORS), IOU)


def test_ratio_scores_match_hand_values() -> None:
    # thr 4 -> a match needs quality > 0.25: box 1 matches anchor 1 only (0.25 is not > 0.25), box 2 both, box 3 none
    assert best_possible_recall(WH, ANCHORS, 4.0).item() == pytest.approx(2 / 3)
    assert anchors_above_threshold(WH, ANCHORS, 4.0).item() == pytest.approx((1 + 2 + 0) / 3)
    assert anchor_fitness(WH, ANCHORS, 4.0).item() == pytest.approx((1.0 + 0.75 + 0.0) / 3)
    assert average_iou(WH, ANCHORS).item() == pytest.approx((1.0 + 0.5625 + 160 / 1040) / 3)
    # a looser threshold (thr 10 -> quality > 0.1) matches box 3 through anchor 2 (0.2)
    assert best_possible_recall(WH, ANCHORS, 10.0).item() == pytest.approx(1.0)
    assert anchor_fitness(WH, ANCHORS, 10.0).item() == pytest.approx((1.0 + 0.75 + 0.2) / 3)


def test_iou_scores_match_hand_values() -> None:
    # IoU > 0.5: box 1 (1.0), box 2 (0.5625); box 3 none
    assert best_possible_recall(WH, ANCHORS, 0.5, "iou").item() == pytest.approx(2 / 3)
    assert anchors_above_threshold(WH, ANCHORS, 0.5, "iou").item() == pytest.approx(2 / 3)
    assert anchor_fitness(WH, ANCHORS, 0.5, "iou").item() == pytest.approx((1.0 + 0.5625) / 3)
    torch.testing.assert_close(match_quality(WH, ANCHORS, "iou"), IOU)


@pytest.mark.parametrize("metric", ["ratio", "iou"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 16])
def test_score_anchors_equals_the_single_functions(metric: str, chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    wh = torch.exp(torch.randn(500, 2, generator=gen) * 0.8 + 3.5)
    anchors = torch.exp(torch.randn(6, 2, generator=gen) * 0.8 + 3.5)
    thr = 4.0 if metric == "ratio" else 0.4
    scores = score_anchors(wh, anchors, thr, metric, chunk_size=chunk_size)  # type: ignore[arg-type]
    assert scores.n_boxes == 500
    assert scores.bpr == pytest.approx(best_possible_recall(wh, anchors, thr, metric).item(), abs=1e-7)
    assert scores.aat == pytest.approx(anchors_above_threshold(wh, anchors, thr, metric).item(), abs=1e-6)
    assert scores.fitness == pytest.approx(anchor_fitness(wh, anchors, thr, metric).item(), abs=1e-6)
    assert scores.avg_iou == pytest.approx(average_iou(wh, anchors).item(), abs=1e-6)


def test_default_thresholds_and_their_meaning() -> None:
    assert match_cut("ratio") == 0.25
    assert match_cut("ratio", 2.0) == 0.5
    assert match_cut("iou") == 0.5
    assert match_cut("iou", 0.3) == 0.3


@pytest.mark.parametrize(("metric", "thr"), [("ratio", 1.0), ("ratio", 0.5), ("ratio", math.inf), ("iou", 1.0),
                                             ("iou", -0.1), ("cosine", None)])
def test_bad_thresholds_are_refused(metric: str, thr: float | None) -> None:
    with pytest.raises(ConfigError, match=r"thr|metric"):
        match_cut(metric, thr)  # type: ignore[arg-type]


def test_score_anchors_refuses_bad_shapes_and_empty_sets() -> None:
    with pytest.raises(ConfigError, match=r"\(N, 2\)"):
        score_anchors(torch.ones(3, 3), ANCHORS)
    with pytest.raises(ConfigError, match="empty"):
        score_anchors(torch.ones(0, 2), ANCHORS)
