"""Fits in torchvision's own anchor structures: what they report is what the real generators produce."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.detector_resize import DetectorResize
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.grid_fit import (
    _FINAL_STEP,
    DefaultBoxes,
    GeneratorAnchors,
    _anchors_of,
    _ascend,
    _climb,
    _DefaultBoxStructure,
    _GeneratorStructure,
    _hop,
    _level_kick,
    _Move,
    _polish,
    _Scorer,
    default_box_cell_anchors,
    fit_anchor_generator,
    fit_default_boxes,
    generator_cell_anchors,
)
from lightning_autoanchor.placed import PlacedBoxes, place_boxes
from lightning_autoanchor.sources import read_coco
from tests.test_placed import (  # one_thread: the autouse fixture, for this module too
    MEAN,
    SSD_GRIDS,
    SSD_STEPS,
    STD,
    brute_force_best_iou,
    fpn_layout,
    one_thread,  # noqa: F401
)

SLICE = Path(__file__).parent / "data" / "coco2017_val_150.json.gz"
CHECKED_IMAGES = 40  # images of the slice whose boxes are scored by brute force over every generated anchor
MIN_SIZE, MAX_SIZE = 320, 533
RETINA = GeneratorAnchors([(32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812)],
                          [(0.5, 1.0, 2.0)] * 5)
SSD = DefaultBoxes([0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], [[2], [2, 3], [2, 3], [2, 3], [2], [2]], (300, 300))


@pytest.fixture(scope="module")
def coco() -> BoxSet:
    return read_coco(SLICE)


@pytest.fixture(scope="module")
def checked(coco: BoxSet) -> BoxSet:
    """The boxes of the first images of the slice."""
    rows = coco.image_index < CHECKED_IMAGES
    return BoxSet(coco.image_sizes[:CHECKED_IMAGES], coco.wh[rows], coco.image_index[rows], xy=coco.xy[rows])


@pytest.fixture(scope="module")
def retina_boxes(coco: BoxSet) -> PlacedBoxes:
    return place_boxes(coco, DetectorResize(MIN_SIZE, MAX_SIZE), fpn_layout(range(3, 8)))


def ssd_layout(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grids = np.broadcast_to(np.array(SSD_GRIDS)[None, :, None], (len(padded), len(SSD_GRIDS), 2))
    return grids, np.broadcast_to(np.array(SSD_STEPS, dtype=np.float64)[None, :, None], grids.shape)


def brute_force_matched(boxes: BoxSet, generator: torch.nn.Module, transform: GeneralizedRCNNTransform,
                        grids_of: object, thr: float) -> int:
    """Boxes whose best IoU with any anchor ``generator`` produces reaches ``thr``, by brute force."""
    return int((brute_force_best_iou(boxes, transform, generator, grids_of) >= thr).sum())


def fpn_grids(w: int, h: int) -> list[tuple[int, int]]:
    return [tuple(g) for g in fpn_layout(range(3, 8))(np.array([[w, h]]))[0][0]]


@pytest.mark.parametrize(("sizes", "ratios"), [
    (((32, 40, 50), (64, 80, 101)), ((0.5, 1.0, 2.0), (0.5, 1.0, 2.0))),
    (((13.1, 20.63, 33.74), (7.0, 9.5)), ((0.3268, 0.9849, 3.0358), (0.2, 5.0))),  # halves at .5: rounding
])
def test_generator_cell_anchors_are_the_generators(sizes: tuple, ratios: tuple) -> None:
    generator = AnchorGenerator(sizes, ratios)
    ours = generator_cell_anchors(sizes, ratios)
    for theirs, mine in zip(generator.cell_anchors, ours, strict=True):
        assert torch.equal(theirs[:, 2:] - theirs[:, :2], mine)
    assert GeneratorAnchors(sizes, ratios).num_anchors_per_location() == generator.num_anchors_per_location()


@pytest.mark.parametrize("image_size", [(300, 300), (320, 240)])
def test_default_box_cell_anchors_are_the_generators(image_size: tuple[int, int]) -> None:
    generator = DefaultBoxGenerator(list(map(list, SSD.aspect_ratios)), scales=list(SSD.scales), steps=list(SSD_STEPS))
    w, h = image_size
    images = GeneralizedRCNNTransform(min(image_size), max(image_size), MEAN, STD, size_divisible=1,
                                      fixed_size=image_size).eval()([torch.zeros(3, h, w)])[0]
    boxes = generator(images, [torch.zeros(1, 1, g, g) for g in SSD_GRIDS])[0]
    counts = generator.num_anchors_per_location()
    starts = np.cumsum([0] + [g * g * n for g, n in zip(SSD_GRIDS, counts, strict=True)])
    ours = default_box_cell_anchors(SSD.scales, SSD.aspect_ratios, image_size)
    for start, n, mine in zip(starts, counts, ours, strict=False):
        np.testing.assert_allclose(boxes[start:start + n, 2:] - boxes[start:start + n, :2], mine, rtol=1e-5,
                                   atol=1e-4)


def test_anchor_generator_fit_is_scored_as_the_real_generator_places_it(checked: BoxSet,
                                                                        retina_boxes: PlacedBoxes) -> None:
    result = fit_anchor_generator(retina_boxes, RETINA, 0.5, seed=0, restarts=8)
    fitted = result.anchors
    assert isinstance(fitted, GeneratorAnchors)
    assert result.scores.recall > result.start.recall + 0.02
    assert [len(s) for s in fitted.sizes] == [3] * 5 and [len(a) for a in fitted.aspect_ratios] == [3] * 5
    assert len({a for a in fitted.aspect_ratios}) > 1, "ratios are fitted per level"
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, MEAN, STD).eval()
    placed = place_boxes(checked, DetectorResize(MIN_SIZE, MAX_SIZE), fpn_layout(range(3, 8)))
    for anchors in (RETINA, fitted):
        real = AnchorGenerator(anchors.sizes, anchors.aspect_ratios)  # the values as a user pastes them
        assert real.num_anchors_per_location() == [9] * 5
        scores = placed.score(anchors.cell_anchors(), 0.5)
        matched = brute_force_matched(checked, real, transform, fpn_grids, 0.5)
        assert matched == pytest.approx(scores.recall * scores.n_boxes, abs=0.5)
    again = fit_anchor_generator(retina_boxes, RETINA, 0.5, seed=0, restarts=8)
    assert again.anchors == fitted and again.scores == result.scores, "equal seeds give equal anchors"
    assert result.as_dict()["sizes"] == [list(s) for s in fitted.sizes]


def test_level_kick_changes_only_its_level_and_scores_it_on_every_row(retina_boxes: PlacedBoxes) -> None:
    structure = _GeneratorStructure(RETINA, shared_ratios=False)
    theta, _ = _ascend(retina_boxes, structure, 0.5)
    scorer = _Scorer(retina_boxes, 0.5, _anchors_of(structure, theta))
    noise = np.random.default_rng(0).normal(size=len(structure.moves))
    kicked, recall = _level_kick(retina_boxes, structure, scorer, theta, {2}, noise)
    changed = set(np.flatnonzero(kicked != theta))
    assert changed and changed <= set(structure.size_ix[2]) | set(structure.ratio_ix[2])
    scores = retina_boxes.score(structure.result(kicked).cell_anchors(), 0.5)
    assert recall == pytest.approx(scores.recall * float(retina_boxes.weight.sum()), abs=1e-6), \
        "the rows other levels match are counted, the others scored"


def test_hops_never_lower_the_recall_and_follow_the_seed(retina_boxes: PlacedBoxes) -> None:
    structure = _GeneratorStructure(RETINA, shared_ratios=False)
    theta, (climbed, _) = _ascend(retina_boxes, structure, 0.5)
    hops = [_hop(retina_boxes, structure, 0.5, theta, 12, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert np.array_equal(hops[0], hops[1]), "equal seeds give equal hops"
    for hop in hops:
        recall = retina_boxes.score(structure.result(hop).cell_anchors(), 0.5).recall
        assert recall * float(retina_boxes.weight.sum()) >= climbed - 1e-6


UNEVEN = GeneratorAnchors([(32,), (64, 80)], [(0.5, 1.0, 2.0), (1.0,)])


@pytest.mark.parametrize("structure", [_GeneratorStructure(RETINA, shared_ratios=False),
                                       _GeneratorStructure(UNEVEN, shared_ratios=False), _DefaultBoxStructure(SSD)],
                         ids=["3x3", "1x3-2x1", "ssd"])
def test_a_pair_changes_its_anchors_only(structure: _GeneratorStructure | _DefaultBoxStructure) -> None:
    theta = structure.theta0
    before = structure.anchors(theta[None])
    assert structure.pairs
    for level, p, q, cols in structure.pairs:
        moved = theta.copy()
        moved[[p, q]] += 0.3
        after = structure.anchors(moved[None])
        for other in before:
            changed = (after[other][0] != before[other][0]).any(dim=1).nonzero()[:, 0]
            assert set(changed.tolist()) == (set(cols.tolist()) if other == level else set()), (level, p, q)


def test_the_polish_guide_counts_what_evaluate_scores(retina_boxes: PlacedBoxes) -> None:
    structure = _GeneratorStructure(RETINA, shared_ratios=False)
    theta, _ = _ascend(retina_boxes, structure, 0.5)
    scorer = _Scorer(retina_boxes, 0.5, _anchors_of(structure, theta))
    grid = np.linspace(-0.3, 0.3, 13)
    counts = [9] * 5
    for level, p, q, cols in structure.pairs:
        candidates = np.repeat(theta[None], len(grid) ** 2, axis=0)
        candidates[:, p] += np.repeat(grid, len(grid))
        candidates[:, q] += np.tile(grid, len(grid))
        anchors = structure.anchors(candidates, [level])
        move = _Move.of(np.zeros_like(theta), {level: cols}, counts)
        guide = scorer.guide(move, anchors[level][:, cols]).double()
        recall, _ = scorer.evaluate(move, anchors)
        assert torch.allclose(guide - guide[0], recall - recall[0], atol=1e-4), (level, p, q)


def test_the_polish_finds_pair_moves_the_climb_misses(retina_boxes: PlacedBoxes) -> None:
    structure = _GeneratorStructure(RETINA, shared_ratios=False)
    theta, _ = _ascend(retina_boxes, structure, 0.5)
    scorer = _Scorer(retina_boxes, 0.5, _anchors_of(structure, theta))
    theta = _climb(scorer, structure, theta, _FINAL_STEP)
    climbed = retina_boxes.score(structure.result(theta).cell_anchors(), 0.5)
    polished = _polish(scorer, structure, theta, 0.15, 0.015)
    scores = retina_boxes.score(structure.result(polished).cell_anchors(), 0.5)
    assert scores.recall > climbed.recall, "the climb's end is not the best of every pair's grid"
    assert scores.recall * scores.n_boxes == pytest.approx(scorer.total()[0], abs=1e-6), \
        "the scorer holds the polished anchors"
    assert np.array_equal(_polish(scorer, structure, polished, 0.15, 0.015), polished), "a polished point stays"


def test_shared_ratios_are_one_set_for_every_level(retina_boxes: PlacedBoxes) -> None:
    result = fit_anchor_generator(retina_boxes, RETINA, 0.5, shared_ratios=True, restarts=0)
    assert len(set(result.anchors.aspect_ratios)) == 1
    assert not result.start.beats(result.scores)
    with pytest.raises(ConfigError, match="same number on every level"):
        fit_anchor_generator(retina_boxes, GeneratorAnchors([(32,), (64, 80)], [(1.0,), (0.5, 1.0)]), 0.5,
                             shared_ratios=True)


def test_refactor_keeps_the_anchors_per_location_and_never_does_worse(coco: BoxSet) -> None:
    placed = place_boxes(coco, DetectorResize(MIN_SIZE, MAX_SIZE), fpn_layout(range(2, 7)))
    rpn = GeneratorAnchors([(32,), (64,), (128,), (256,), (512,)], [(0.5, 1.0, 2.0)] * 5)
    kept = fit_anchor_generator(placed, rpn, 0.7, restarts=0)
    refactored = fit_anchor_generator(placed, rpn, 0.7, restarts=0, refactor=True)
    assert refactored.anchors.num_anchors_per_location() == [3] * 5
    assert refactored.scores.recall >= kept.scores.recall
    assert refactored.scores == placed.score(refactored.anchors.cell_anchors(), 0.7)
    assert AnchorGenerator(refactored.anchors.sizes, refactored.anchors.aspect_ratios).num_anchors_per_location() \
        == [3] * 5


def test_search_on_a_subsample_is_scored_on_every_box(retina_boxes: PlacedBoxes) -> None:
    result = fit_anchor_generator(retina_boxes, RETINA, 0.5, restarts=0, max_search_rows=300)
    assert result.n_search_rows == 300
    assert result.scores == retina_boxes.score(result.anchors.cell_anchors(), 0.5)
    assert result.scores.n_boxes == len(retina_boxes.wh) > 300
    assert not result.start.beats(result.scores), "never worse than the start on every box"


def test_default_box_fit_is_scored_as_the_real_generator_places_it(coco: BoxSet, checked: BoxSet) -> None:
    placed = place_boxes(coco, DetectorResize(300, 300, 1, (300, 300)), ssd_layout, offsets=0.5)
    result = fit_default_boxes(placed, SSD, 0.5, restarts=0)
    fitted = result.anchors
    assert isinstance(fitted, DefaultBoxes)
    assert result.scores.recall > result.start.recall + 0.01
    assert fitted.num_anchors_per_location() == SSD.num_anchors_per_location()
    assert all(a >= 1 for level in fitted.aspect_ratios for a in level)
    transform = GeneralizedRCNNTransform(300, 300, MEAN, STD, size_divisible=1, fixed_size=(300, 300)).eval()
    real = DefaultBoxGenerator([list(a) for a in fitted.aspect_ratios], scales=list(fitted.scales),
                               steps=list(SSD_STEPS))
    scores = place_boxes(checked, DetectorResize(300, 300, 1, (300, 300)), ssd_layout, offsets=0.5).score(
        fitted.cell_anchors(), 0.5)
    matched = brute_force_matched(checked, real, transform, lambda w, h: [(g, g) for g in SSD_GRIDS], 0.5)
    assert matched == pytest.approx(scores.recall * scores.n_boxes, abs=0.5)


def test_fit_settings_are_checked(retina_boxes: PlacedBoxes) -> None:
    with pytest.raises(ConfigError, match="IoU threshold"):
        fit_anchor_generator(retina_boxes, RETINA, 0.0)
    with pytest.raises(ConfigError, match="levels"):
        fit_anchor_generator(retina_boxes, GeneratorAnchors([(32,)] * 4, [(1.0,)] * 4), 0.5)
    with pytest.raises(ConfigError, match="restarts"):
        fit_anchor_generator(retina_boxes, RETINA, 0.5, restarts=-1)
    with pytest.raises(ConfigError, match="positive"):
        GeneratorAnchors([(32, -1)], [(1.0,)])
    with pytest.raises(ConfigError, match="one more scale"):
        DefaultBoxes([0.1, 0.2], [[2], [2]], (300, 300))
