"""Box sets: resizing as in training, seeded jitter, small-box reports, log-space summaries."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lightning_autoanchor.boxes import BoxSet, fit_mask, log_bins
from lightning_autoanchor.errors import ConfigError, DataError
from lightning_autoanchor.evolution import LogSpaceFitness
from lightning_autoanchor.metrics import score_anchors
from lightning_autoanchor.sources import load_boxes

from .conftest import DEMO_COCO, YOLOV5_DEFAULT_ANCHORS


def two_images() -> BoxSet:
    # a 640x480 landscape image with two boxes, a 300x600 portrait image with one
    return BoxSet(image_sizes=np.array([[640, 480], [300, 600]]), wh=np.array([[64, 48], [1.5, 1], [30, 60]]),
                  image_index=np.array([0, 0, 1]), image_names=("a.jpg", "b.jpg"), source="test")


def test_letterbox_scales_each_image_by_its_longer_side() -> None:
    wh = two_images().scaled(320)
    # image a: 320 / 640 = 0.5; image b: 320 / 600
    torch.testing.assert_close(wh, torch.tensor([[32.0, 24.0], [0.75, 0.5], [16.0, 32.0]]))


def test_stretch_scales_each_side_to_img_size() -> None:
    wh = two_images().scaled(1.0, resize="stretch")  # normalised by image size, as in YOLOv2's k-means
    torch.testing.assert_close(wh, torch.tensor([[0.1, 0.1], [1.5 / 640, 1 / 480], [0.1, 0.1]]))


def test_from_normalized_equals_pixels() -> None:
    sizes = np.array([[640, 480], [300, 600]])
    normalized = BoxSet.from_normalized(sizes, np.array([[0.1, 0.1], [1.5 / 640, 1 / 480], [0.1, 0.1]]),
                                        np.array([0, 0, 1]))
    torch.testing.assert_close(normalized.scaled(640), two_images().scaled(640))


def test_scale_jitter_is_seeded_per_image_and_leaves_global_rngs_alone() -> None:
    boxes = load_boxes(DEMO_COCO)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = boxes.scaled(640, scale_jitter=0.1, seed=3)
    b = boxes.scaled(640, scale_jitter=0.1, seed=3)
    c = boxes.scaled(640, scale_jitter=0.1, seed=4)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert torch.equal(a, b) and not torch.equal(a, c)
    factor = a / boxes.scaled(640)
    assert float(factor.min()) >= 0.9 - 1e-6 and float(factor.max()) <= 1.1 + 1e-6
    # one factor per image: both sides of a box, and all boxes of an image, share it
    torch.testing.assert_close(factor[:, 0], factor[:, 1])
    per_image = torch.zeros(boxes.num_images).index_put_((torch.from_numpy(boxes.image_index),), factor[:, 0])
    torch.testing.assert_close(factor[:, 0], per_image[boxes.image_index])


def test_small_boxes_are_counted_and_named() -> None:
    small = two_images().small_boxes(640)
    assert (small.count, small.unfit, small.total) == (1, 1, 3)
    assert small.images == ("a.jpg",)
    assert "a.jpg" in small.describe()
    assert two_images().small_boxes(6400).count == 0


def test_fit_mask_drops_boxes_under_2px_on_both_sides() -> None:
    wh = torch.tensor([[1.0, 1.9], [1.0, 2.0], [2.5, 0.5], [10.0, 10.0]])
    assert fit_mask(wh).tolist() == [False, True, True, True]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("wh", np.array([[np.nan, 1.0]]), "positive and finite"),
    ("wh", np.array([[0.0, 1.0]]), "positive and finite"),
    ("image_sizes", np.array([[-1.0, 10.0]]), "image sizes"),
    ("image_index", np.array([3]), "out of range"),
])
def test_invalid_box_sets_are_refused_with_the_culprit(field: str, value: np.ndarray, message: str) -> None:
    fields = {"image_sizes": np.array([[10.0, 10.0]]), "wh": np.array([[1.0, 1.0]]), "image_index": np.array([0]),
              "image_names": ("culprit.jpg",)}
    fields[field] = value
    with pytest.raises(DataError, match=message):
        BoxSet(**fields)  # type: ignore[arg-type]


def test_bad_img_size_and_jitter_are_refused() -> None:
    with pytest.raises(ConfigError):
        two_images().scaled(0)
    with pytest.raises(ConfigError):
        two_images().scaled(640, scale_jitter=1.5)
    with pytest.raises(ConfigError):
        two_images().scaled(640, resize="crop")  # type: ignore[arg-type]


def test_concat_keeps_images_apart() -> None:
    joined = BoxSet.concat([two_images(), two_images()])
    assert (len(joined), joined.num_images) == (6, 4)
    assert joined.image_index.tolist() == [0, 0, 1, 2, 2, 3]
    torch.testing.assert_close(joined.scaled(640)[3:], two_images().scaled(640))


def test_log_bins_keep_every_box_and_score_anchors_closely(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(640)
    anchors = torch.from_numpy(YOLOV5_DEFAULT_ANCHORS)
    exact = score_anchors(wh, anchors).fitness
    for width, tolerance in ((0.02, 2e-5), (0.1, 5e-4)):
        points, weights = log_bins(wh, width)
        assert float(weights.sum()) == len(wh)
        assert len(points) < len(wh)
        # the weighted summary scores anchors almost exactly: each point stands for its cell's boxes
        summary = float(LogSpaceFitness(points, weights)(anchors.log()))
        assert summary == pytest.approx(exact, abs=tolerance)


def test_log_bins_of_a_summary_merge_cells() -> None:
    wh = torch.tensor([[10.0, 10.0], [10.5, 10.2], [100.0, 50.0]])
    points, weights = log_bins(wh, 0.2)
    assert weights.tolist() == [2.0, 1.0]
    coarse, coarse_weights = log_bins(points.exp(), 5.0, weights)
    assert coarse_weights.tolist() == [3.0]
    torch.testing.assert_close(coarse[0], wh.log().mean(dim=0))
