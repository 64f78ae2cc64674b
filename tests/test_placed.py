"""The placed measure against brute force over every anchor torchvision's real generators produce, and the
resize geometry against torchvision's real ``GeneralizedRCNNTransform``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.detector_resize import DetectorResize, ResizedBoxes, padded_sizes, resized_sizes
from lightning_autoanchor.errors import ConfigError, DataError
from lightning_autoanchor.placed import best_placed_iou, nearest_offsets, place_boxes, placed_iou, placed_scores

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
SSD_GRIDS = (38, 19, 10, 5, 3, 1)
SSD_STEPS = (8, 16, 32, 64, 100, 300)


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Torch on one thread: these small operations only wait for a second core (badly, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_box_set(seed: int, image_sizes: list[tuple[int, int]], per_image: int, smallest: float = 12.0) -> BoxSet:
    """Boxes from ``smallest`` px to the image's shorter side, log-uniform, anywhere inside their image."""
    rng = np.random.default_rng(seed)
    sizes = np.array(image_sizes, dtype=np.float64)
    index = np.repeat(np.arange(len(sizes)), per_image)
    image_wh = sizes[index]
    short = image_wh.min(axis=1, keepdims=True)
    wh = np.exp(rng.uniform(np.log(np.minimum(smallest, short)), np.log(short), size=(len(index), 2)))
    x1y1 = rng.uniform(0, 1, size=(len(index), 2)) * (image_wh - wh)
    return BoxSet(sizes, wh, index, xy=x1y1 + wh / 2)


def with_corner_boxes(box_set: BoxSet, sides: tuple[float, ...] = (12.0, 40.0, 150.0)) -> BoxSet:
    """``box_set`` and, in every image, square boxes of each side (at most the image's shorter side) flush with
    each of its four corners: the boxes whose nearest anchor centres are the first and last of the grid."""
    xy, wh, index = [box_set.xy], [box_set.wh], [box_set.image_index]
    for i, (w, h) in enumerate(box_set.image_sizes):
        for side in sides:
            side = min(side, w, h)
            for cx in (side / 2, w - side / 2):
                for cy in (side / 2, h - side / 2):
                    xy.append(np.array([[cx, cy]]))
                    wh.append(np.array([[side, side]]))
                    index.append(np.array([i]))
    index = np.concatenate(index)
    order = np.argsort(index, kind="stable")  # image by image, as the brute force scores them
    return BoxSet(box_set.image_sizes, np.concatenate(wh)[order], index[order], xy=np.concatenate(xy)[order])


def corners(xy: np.ndarray, wh: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)).float()


def fpn_layout(log2_strides: range):
    """ResNet-FPN grids: ``ceil(padded / 2^k)`` cells per level, stride ``padded // grid``."""
    def layout(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grids = np.stack([-(-padded // 2 ** k) for k in log2_strides], axis=1)
        return grids, (padded[:, None, :] // grids).astype(np.float64)
    return layout


def tv_resized(box_set: BoxSet, transform: GeneralizedRCNNTransform) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each image through the real transform (a batch of one): resized boxes and the padded (h, w)."""
    out = []
    for i, (w, h) in enumerate(box_set.image_sizes.astype(int)):
        rows = box_set.image_index == i
        target = {"boxes": corners(box_set.xy[rows], box_set.wh[rows])}
        images, targets = transform([torch.zeros(3, h, w)], [target])
        out.append((targets[0]["boxes"], tuple(images.tensors.shape[-2:])))
    return out


def brute_force_best_iou(box_set: BoxSet, transform: GeneralizedRCNNTransform, generator: torch.nn.Module,
                         grids_of: object) -> torch.Tensor:
    """Best IoU of every box with every anchor the generator produces for its image, by ``box_iou``."""
    best = []
    for i, (w, h) in enumerate(box_set.image_sizes.astype(int)):
        rows = box_set.image_index == i
        images, targets = transform([torch.zeros(3, h, w)], [{"boxes": corners(box_set.xy[rows], box_set.wh[rows])}])
        feature_maps = [torch.zeros(1, 1, gh, gw) for gw, gh in grids_of(images.tensors.shape[-1],
                                                                          images.tensors.shape[-2])]
        anchors = generator(images, feature_maps)[0]
        best.append(box_iou(targets[0]["boxes"], anchors).amax(dim=1))
    return torch.cat(best)


def cell_anchors_of(generator: AnchorGenerator) -> list[torch.Tensor]:
    return [a[:, 2:] - a[:, :2] for a in generator.cell_anchors]


# ----------------------------------------------------------------------------------------------------------
# Resize geometry
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("min_size", "max_size", "divisible", "fixed"),
                         [(800, 1333, 32, None), (333, 500, 32, None), (320, 320, 1, None), (300, 300, 1, (300, 300)),
                          (512, 1000, 32, (400, 250))])
def test_resize_equals_torchvision_transform(min_size: int, max_size: int, divisible: int,
                                             fixed: tuple[int, int] | None) -> None:
    sizes = [(640, 480), (480, 640), (500, 333), (427, 640), (1333, 17), (9, 7), (1000, 999), (612, 612), (77, 3001)]
    box_set = random_box_set(0, sizes, 3)
    transform = GeneralizedRCNNTransform(min_size, max_size, MEAN, STD, size_divisible=divisible,
                                         fixed_size=fixed).eval()
    resize = DetectorResize((min_size,), max_size, divisible, fixed)
    ours = ResizedBoxes.of(box_set, resize)
    resized = resized_sizes(box_set.image_sizes, min_size, max_size, fixed)
    for i, (w, h) in enumerate(box_set.image_sizes.astype(int)):
        images, targets = transform([torch.zeros(3, h, w)], [{"boxes": corners(box_set.xy[box_set.image_index == i],
                                                                                box_set.wh[box_set.image_index == i])}])
        assert tuple(images.image_sizes[0]) == (resized[i, 1], resized[i, 0])
        assert tuple(images.tensors.shape[-2:]) == tuple(padded_sizes(resized[i:i + 1], divisible)[0, ::-1])
        rows = ours.image == i
        np.testing.assert_allclose(corners(ours.xy[rows], ours.wh[rows]), targets[0]["boxes"], rtol=1e-5, atol=1e-4)


def test_resize_settings_are_checked() -> None:
    assert DetectorResize(640).min_size == (640,)
    assert DetectorResize((480, 512, 800)).min_sizes(training=False) == (800,)
    for bad in [{"min_size": ()}, {"min_size": (0,)}, {"max_size": -1}, {"size_divisible": 0},
                {"fixed_size": (300,)}, {"fixed_size": (300.5, 300)}]:
        with pytest.raises(ConfigError):
            DetectorResize(**bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# The measure against brute force
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_best_iou_equals_brute_force_over_anchor_generator(seed: int) -> None:
    box_set = with_corner_boxes(random_box_set(seed, [(640, 480), (300, 500), (1000, 200), (333, 333)], 40))
    generator = AnchorGenerator(sizes=((23, 37), (50, 71, 77), (101, 130)),  # odd sizes: the rounding shows
                                aspect_ratios=((0.4, 1.3), (0.7, 1.0), (0.5, 2.2, 3.0)))
    layout = fpn_layout(range(3, 6))
    for min_size in (200, 256):
        transform = GeneralizedRCNNTransform(min_size, 400, MEAN, STD).eval()
        placed = place_boxes(box_set, DetectorResize((min_size,), 400), layout, offsets=0.0)
        assert placed.n_boxes == len(box_set)

        def grids_of(w: int, h: int) -> list[tuple[int, int]]:
            return [tuple(g) for g in layout(np.array([[w, h]]))[0][0]]

        expected = brute_force_best_iou(box_set, transform, generator, grids_of)
        got = placed.best_iou(cell_anchors_of(generator))
        np.testing.assert_allclose(got, expected, atol=2e-5)
        assert 0.1 < float((expected >= 0.5).float().mean()) < 0.9, "a case with matched and unmatched boxes"


def test_best_iou_equals_brute_force_over_ssd_default_boxes() -> None:
    box_set = with_corner_boxes(random_box_set(2, [(640, 480), (200, 500), (300, 300)], 25))
    generator = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=list(SSD_STEPS))
    transform = GeneralizedRCNNTransform(300, 300, MEAN, STD, size_divisible=1, fixed_size=(300, 300)).eval()

    def layout(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grids = np.broadcast_to(np.array(SSD_GRIDS)[None, :, None], (len(padded), len(SSD_GRIDS), 2))
        return grids, np.broadcast_to(np.array(SSD_STEPS, dtype=np.float64)[None, :, None], grids.shape)

    placed = place_boxes(box_set, DetectorResize(300, 300, 1, (300, 300)), layout, offsets=0.5)
    expected = brute_force_best_iou(box_set, transform, generator, lambda w, h: [(g, g) for g in SSD_GRIDS])
    boxes = generator(transform([torch.zeros(3, 300, 300)])[0], [torch.zeros(1, 1, g, g) for g in SSD_GRIDS])[0]
    starts = np.cumsum([0] + [g * g * n for g, n in zip(SSD_GRIDS, generator.num_anchors_per_location(), strict=True)])
    cells = [boxes[s:s + n, 2:] - boxes[s:s + n, :2]
             for s, n in zip(starts, generator.num_anchors_per_location(), strict=False)]
    np.testing.assert_allclose(placed.best_iou(cells), expected, atol=2e-5)


def test_min_size_tuple_weighs_every_size_equally() -> None:
    box_set = random_box_set(3, [(640, 480), (300, 500)], 30)
    generator = AnchorGenerator(sizes=((32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    layout = fpn_layout(range(3, 6))

    def grids_of(w: int, h: int) -> list[tuple[int, int]]:
        return [tuple(g) for g in layout(np.array([[w, h]]))[0][0]]

    recalls = []
    for min_size in (160, 224, 320):
        best = brute_force_best_iou(box_set, GeneralizedRCNNTransform(min_size, 1000, MEAN, STD).eval(),
                                    generator, grids_of)
        recalls.append(float((best >= 0.5).float().mean()))
    training = place_boxes(box_set, DetectorResize((160, 224, 320), 1000), layout)
    scores = training.score(cell_anchors_of(generator), 0.5)
    assert scores.recall == pytest.approx(np.mean(recalls), abs=1e-6)
    assert scores.n_boxes == len(box_set)
    assert len(set(recalls)) == 3, "the sizes of the tuple must score differently for the test to mean anything"
    evaluation = place_boxes(box_set, DetectorResize((160, 224, 320), 1000), layout, training=False)
    assert evaluation.score(cell_anchors_of(generator), 0.5).recall == pytest.approx(recalls[-1], abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------------

def test_nearest_offsets_are_clamped_to_the_grid() -> None:
    xy = torch.tensor([[5.0, 95.0], [33.0, 250.0], [-3.0, 7.9]])
    grids = torch.tensor([[[4, 4]]] * 3)
    strides = torch.tensor([[[10.0, 20.0]]] * 3)
    got = nearest_offsets(xy, grids, strides, torch.tensor([0.5]))  # centres x: 5, 15, 25, 35; y: 10, 30, 50, 70
    np.testing.assert_allclose(got[:, 0], [[0, 25], [2, 180], [8, 2.1]], atol=1e-5)


def test_placed_iou_at_an_offset() -> None:
    iou = placed_iou(torch.tensor([[10.0, 10.0]]), torch.tensor([[5.0, 0.0]]), torch.tensor([[10.0, 10.0], [4.0, 4.0]]))
    np.testing.assert_allclose(iou, [[50 / 150, 8 / 108]])  # second: a 4 px anchor 5 px off overlaps 2 x 4 px
    far = placed_iou(torch.tensor([[10.0, 10.0]]), torch.tensor([[30.0, 0.0]]), torch.tensor([[10.0, 10.0]]))
    assert float(far) == 0.0


def test_scores_count_the_threshold_as_foreground_and_the_low_quality_fallback() -> None:
    scores = placed_scores(torch.tensor([0.5, 0.49, 0.0, 0.9]), torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5)
    assert (scores.recall, scores.low_quality, scores.n_boxes) == (0.5, 0.25, 4)
    assert scores.mean_best_iou == pytest.approx(1.89 / 4)
    weighted = placed_scores(torch.tensor([0.7, 0.2]), torch.tensor([3.0, 1.0]), 0.5, n_boxes=2)
    assert (weighted.recall, weighted.n_boxes) == (0.75, 2)
    assert weighted.beats(scores) and not scores.beats(weighted)
    with pytest.raises(ConfigError, match="in \\(0, 1\\]"):
        placed_scores(torch.tensor([0.5]), torch.tensor([1.0]), 1.5)


def test_best_iou_needs_one_set_of_cell_anchors_per_level() -> None:
    with pytest.raises(ConfigError, match="2 levels"):
        best_placed_iou(torch.ones(3, 2), torch.zeros(3, 3, 2), [torch.ones(1, 2)] * 2)


def test_place_boxes_checks_its_input() -> None:
    layout = fpn_layout(range(3, 5))
    no_centres = BoxSet(np.array([[100, 100]]), [[10, 10]], [0], source="x.json")
    with pytest.raises(DataError, match=r"x\.json has no box centres"):
        place_boxes(no_centres, DetectorResize(100, 100), layout)
    boxes = BoxSet(np.array([[100, 100]]), [[10, 10], [1, 1]], [0, 0], xy=[[50, 50], [3, 3]])
    placed = place_boxes(boxes, DetectorResize(100, 100), layout)
    assert (placed.n_boxes, placed.n_dropped, len(placed.wh)) == (1, 1, 1), "a 1 px box is left out"
    with pytest.raises(ConfigError, match="one per level"):
        place_boxes(boxes, DetectorResize(100, 100), layout, offsets=[0.0, 0.5, 0.5])
    with pytest.raises(ConfigError, match="shape"):
        place_boxes(boxes, DetectorResize(100, 100), lambda p: (np.ones((len(p), 2)), np.ones((len(p), 2))))
    with pytest.raises(ConfigError, match="not positive"):
        place_boxes(boxes, DetectorResize(100, 100), lambda p: (np.zeros((len(p), 2, 2)), np.ones((len(p), 2, 2))))
