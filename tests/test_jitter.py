"""The recall check's per-image scale jitter belongs to each image (``BoxSet.image_uniforms``): one dataset,
written as COCO JSON, YOLO labels or Pascal VOC XML, in any order, gives the same numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.metrics import score_anchors
from lightning_autoanchor.refit import refit_anchors
from lightning_autoanchor.sources import read_coco, read_voc, read_yolo

from .conftest import YOLOV5_DEFAULT_ANCHORS, write_coco, write_voc, write_yolo

# Sides whose whole and half pixels are exact in YOLO's 6 decimals (1e6 / side * k / 2 is whole): every
# format then holds the very same float32 box sizes, and only the jitter could tell the formats apart.
SIZES = [(500, 400), (1000, 800), (400, 500), (250, 200), (800, 1000), (625, 500)]


def exact_dataset(n_images: int = 60) -> dict:
    """A COCO-style dict of boxes with whole-pixel corners inside images of the sizes above."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(n_images):
        w, h = SIZES[i % len(SIZES)]
        images.append({"id": i + 1, "width": w, "height": h, "file_name": f"img_{i:04d}.jpg"})
        for _ in range(int(rng.integers(1, 6))):
            bw, bh = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [x, y, bw, bh]})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def shuffled(d: dict) -> dict:
    """The same dataset with its images and annotations in another order (ids unchanged)."""
    order = random.Random(1)
    images, annotations = list(d["images"]), list(d["annotations"])
    order.shuffle(images)
    order.shuffle(annotations)
    return {**d, "images": images, "annotations": annotations}


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BoxSet]:
    d = exact_dataset()
    folder = tmp_path_factory.mktemp("formats")
    return {
        "COCO": read_coco(write_coco(d, folder / "a.json")),
        "COCO, images in another order": read_coco(write_coco(shuffled(d), folder / "b.json.gz")),
        "YOLO (half the images PNG)": read_yolo(write_yolo(d, folder / "yolo"), cache=False),
        "VOC": read_voc(write_voc(d, folder / "VOC2007")),
    }


def sorted_rows(wh: torch.Tensor) -> torch.Tensor:
    rows = wh.numpy()
    return torch.from_numpy(rows[np.lexsort(rows.T[::-1])])


def test_every_format_and_order_gives_the_same_jittered_boxes(formats: dict[str, BoxSet]) -> None:
    """The jittered sizes of every box (sorted) and their scores are identical across formats and orders."""
    anchors = torch.from_numpy(YOLOV5_DEFAULT_ANCHORS)
    reference_name, reference = next(iter(formats.items()))
    plain = sorted_rows(reference.scaled(640))
    for seed in (0, 1):
        expected = sorted_rows(reference.scaled(640, scale_jitter=0.1, seed=seed))
        assert not torch.equal(expected, plain)  # jittered
        expected_scores = score_anchors(expected, anchors).as_dict()
        for name, box_set in formats.items():
            got = sorted_rows(box_set.scaled(640, scale_jitter=0.1, seed=seed))
            assert torch.equal(got, expected), f"{name} differs from {reference_name} (seed {seed})"
            assert score_anchors(got, anchors).as_dict() == expected_scores, name


def test_every_format_gives_the_same_recall_check(formats: dict[str, BoxSet]) -> None:
    """``refit_anchors``' check (boxes in each reader's own order) scores the same in every format."""
    anchors, strides = torch.from_numpy(YOLOV5_DEFAULT_ANCHORS).reshape(3, 3, 2), torch.tensor([8.0, 16.0, 32.0])
    scores = {name: refit_anchors(anchors, strides, box_set, img_size=640, bpr_threshold=0.0).before.as_dict()
              for name, box_set in formats.items()}
    reference = next(iter(scores.values()))
    for name, got in scores.items():
        assert got == pytest.approx(reference, rel=1e-12, abs=0), name


def test_an_images_number_comes_from_its_name_and_the_seed() -> None:
    """The stem of the name decides (folders and extension do not); unnamed images fall back to their index."""
    names = ("a/b/000139.jpg", "000139.png", "C:\\data\\000139.JPG", "000140.jpg", ".hidden", "x.tar.gz")
    boxes = BoxSet(np.full((6, 2), 100.0), np.ones((6, 2)), np.arange(6), image_names=names)
    u = boxes.image_uniforms(seed=0)
    assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    assert u[0] == u[1] == u[2] and len(set(u[2:].tolist())) == 4
    assert (boxes.image_uniforms(seed=1) != u).all()
    assert (boxes.image_uniforms(seed=2**64 + 1) == boxes.image_uniforms(seed=1)).all()
    nul = BoxSet(np.full((3, 2), 100.0), np.ones((3, 2)), np.arange(3), image_names=("a\0b.jpg", "a\0b.png", "c"))
    assert nul.image_uniforms(0)[0] == nul.image_uniforms(0)[1] != nul.image_uniforms(0)[2]
    unnamed = BoxSet(np.full((3, 2), 100.0), np.ones((3, 2)), np.arange(3))
    assert unnamed.image_uniforms(0).tolist() == BoxSet(np.full((4, 2), 9.0), np.ones((4, 2)), np.arange(4)
                                                        ).image_uniforms(0)[:3].tolist()


def test_the_numbers_are_uniform() -> None:
    """Over 100,000 names the numbers fill [0, 1) evenly (each tenth within 3 % of its share), as the jitter's
    uniform draw must."""
    n = 100_000
    boxes = BoxSet(np.full((n, 2), 100.0), np.ones((n, 2)), np.arange(n),
                   image_names=tuple(f"images/train2017/{i:012d}.jpg" for i in range(n)))
    counts = np.histogram(boxes.image_uniforms(seed=0), bins=10, range=(0, 1))[0]
    assert (np.abs(counts - n / 10) < 0.03 * n / 10).all(), counts
    factors = boxes.scaled(100, scale_jitter=0.1)[:, 0]  # unit boxes in images of the training size
    assert 0.9 <= float(factors.min()) < 0.901 and 1.099 < float(factors.max()) < 1.1


def test_every_format_reads_the_whole_dataset(formats: dict[str, BoxSet]) -> None:
    """Every format read every image and box, with no skip: the comparison is of the whole dataset."""
    d = exact_dataset()
    for name, box_set in formats.items():
        assert (box_set.num_images, len(box_set), dict(box_set.skipped)) == (60, len(d["annotations"]), {}), name
