"""Property-based tests of the metrics (hypothesis): invariances every anchor metric must have."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_autoanchor.evolution import LogSpaceFitness
from lightning_autoanchor.metrics import best_possible_recall, match_quality, ratio_metric, score_anchors, wh_iou

sizes = st.floats(min_value=0.5, max_value=5000.0, allow_nan=False, allow_infinity=False, width=32)


def size_arrays(min_rows: int, max_rows: int) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(st.tuples(sizes, sizes), min_size=min_rows, max_size=max_rows).map(
        lambda rows: torch.tensor(rows, dtype=torch.float32))


boxes = size_arrays(1, 40)
anchor_sets = size_arrays(1, 12)
metrics = st.sampled_from(["ratio", "iou"])
SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(boxes, anchor_sets, st.floats(min_value=1e-3, max_value=1e3), metrics)
def test_scaling_boxes_and_anchors_together_changes_nothing(wh: torch.Tensor, anchors: torch.Tensor, scale: float,
                                                            metric: str) -> None:
    wh64, anchors64 = wh.double(), anchors.double()
    torch.testing.assert_close(match_quality(wh64 * scale, anchors64 * scale, metric),  # type: ignore[arg-type]
                               match_quality(wh64, anchors64, metric), rtol=1e-9, atol=1e-12)  # type: ignore[arg-type]


@SETTINGS
@given(boxes, anchor_sets, st.floats(min_value=1.01, max_value=20.0), st.floats(min_value=1.01, max_value=20.0))
def test_bpr_grows_with_the_ratio_threshold(wh: torch.Tensor, anchors: torch.Tensor, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert best_possible_recall(wh, anchors, low) <= best_possible_recall(wh, anchors, high)


@SETTINGS
@given(boxes, anchor_sets, st.floats(min_value=0.0, max_value=0.99), st.floats(min_value=0.0, max_value=0.99))
def test_bpr_falls_as_the_iou_threshold_rises(wh: torch.Tensor, anchors: torch.Tensor, a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert best_possible_recall(wh, anchors, low, "iou") >= best_possible_recall(wh, anchors, high, "iou")


@SETTINGS
@given(boxes, anchor_sets, st.randoms(use_true_random=False), metrics)
def test_permuting_anchors_or_boxes_changes_no_score(wh: torch.Tensor, anchors: torch.Tensor, rnd, metric: str) -> None:
    anchor_order = list(range(len(anchors)))
    box_order = list(range(len(wh)))
    rnd.shuffle(anchor_order)
    rnd.shuffle(box_order)
    a = score_anchors(wh, anchors, metric=metric)  # type: ignore[arg-type]
    b = score_anchors(wh[box_order], anchors[anchor_order], metric=metric)  # type: ignore[arg-type]
    assert (a.bpr, a.aat) == (b.bpr, b.aat)
    assert abs(a.fitness - b.fitness) < 1e-6 and abs(a.avg_iou - b.avg_iou) < 1e-6


@SETTINGS
@given(boxes, anchor_sets)
def test_quality_is_in_0_1_and_1_only_for_equal_sizes(wh: torch.Tensor, anchors: torch.Tensor) -> None:
    for quality in (ratio_metric(wh, anchors), wh_iou(wh, anchors)):
        assert bool(((quality > 0) & (quality <= 1 + 1e-6)).all())
    equal = (wh[:, None, :] == anchors[None]).all(dim=2)
    assert bool((ratio_metric(wh, anchors)[equal] == 1).all())
    # IoU is symmetric in box and anchor
    torch.testing.assert_close(wh_iou(wh, anchors), wh_iou(anchors, wh).T)


@SETTINGS
@given(boxes, anchor_sets, metrics)
def test_log_space_objective_equals_the_metric(wh: torch.Tensor, anchors: torch.Tensor, metric: str) -> None:
    """The optimiser's log-space kernels are the metrics, written on log-size differences."""
    wh64, anchors64 = wh.double(), anchors.double()
    objective = LogSpaceFitness(wh64.log(), torch.ones(len(wh64), dtype=torch.float64), metric=metric)  # type: ignore[arg-type]
    exact = score_anchors(wh64, anchors64, metric=metric).fitness  # type: ignore[arg-type]
    assert abs(float(objective(anchors64.log())) - exact) < 1e-5
