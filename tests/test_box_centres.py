"""Box centres (``BoxSet.xy``): every reader gives them, in pixels of the image, of the clipped box where
a box reaches outside its image; ``from_normalized`` and ``concat`` carry them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import load_boxes, read_coco, read_voc, read_yolo
from lightning_autoanchor.sources.training import boxes_of

SLICE = Path(__file__).parent / "data" / "coco2017_val_150.json.gz"

# One 100 x 80 image; COCO boxes [x, y, w, h] and the centre of each after clipping to the image.
IMAGE = (100, 80)
BORDER_CASES = [
    ([10, 20, 30, 40], (25, 40)),  # inside
    ([-10, 10, 30, 20], (10, 20)),  # reaches out on the left: [0, 20] x [10, 30]
    ([80, 70, 40, 20], (90, 75)),  # out on the right and bottom: [80, 100] x [70, 80]
    ([-10, -20, 120, 120], (50, 40)),  # covers the whole image
    ([-0.5, 4, 10, 8], (4.5, 8)),  # within 1 px of the image: keeps its annotated size and centre
]


def coco_dict(image: tuple[int, int], bboxes: list[list[float]]) -> dict:
    return {"images": [{"id": 1, "width": image[0], "height": image[1], "file_name": "a.jpg"}],
            "annotations": [{"id": i, "image_id": 1, "bbox": b, "iscrowd": 0, "category_id": 1}
                            for i, b in enumerate(bboxes)],
            "categories": [{"id": 1, "name": "thing"}]}


def write_yolo(root: Path, image: tuple[int, int], bboxes: list[list[float]]) -> Path:
    """``images/a.png`` and ``labels/a.txt`` with the boxes as normalised centre, size lines."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.new("RGB", image).save(root / "images" / "a.png")
    w, h = image
    lines = [f"0 {(x + bw / 2) / w!r} {(y + bh / 2) / h!r} {bw / w!r} {bh / h!r}" for x, y, bw, bh in bboxes]
    (root / "labels" / "a.txt").write_text("\n".join(lines) + "\n")
    return root / "labels"


def write_voc(root: Path, image: tuple[int, int], bboxes: list[list[float]]) -> Path:
    """One VOC XML file; 1-based inclusive corners: ``xmin = x + 1``, ``xmax = x + w``."""
    root.mkdir(parents=True)
    objects = "".join(f"<object><name>thing</name><bndbox><xmin>{x + 1!r}</xmin><ymin>{y + 1!r}</ymin>"
                      f"<xmax>{x + w!r}</xmax><ymax>{y + h!r}</ymax></bndbox></object>" for x, y, w, h in bboxes)
    (root / "a.xml").write_text(f"<annotation><filename>a.jpg</filename><size><width>{image[0]}</width>"
                                f"<height>{image[1]}</height><depth>3</depth></size>{objects}</annotation>")
    return root


def test_coco_centres_of_a_real_slice() -> None:
    with gzip.open(SLICE, "rt", encoding="utf-8") as f:
        d = json.load(f)
    boxes = read_coco(SLICE)
    kept = [a["bbox"] for a in d["annotations"] if not a.get("iscrowd")]
    expected = np.array([[x + w / 2, y + h / 2] for x, y, w, h in kept], dtype=np.float32)
    assert boxes.xy is not None and boxes.xy.dtype == np.float32
    np.testing.assert_allclose(boxes.xy, expected, rtol=1e-6)


@pytest.mark.parametrize("reader", ["coco", "yolo", "voc"])
def test_centres_of_clipped_boxes_are_those_of_the_clipped_box(reader: str, tmp_path: Path) -> None:
    bboxes = [b for b, _ in BORDER_CASES]
    cases = BORDER_CASES
    if reader == "yolo":  # YOLO lines are normalised to [0, 1]: keep the boxes whose centre and size fit that
        cases = [(b, xy) for b, xy in BORDER_CASES
                 if all(0 <= b[i] + b[i + 2] / 2 <= IMAGE[i] and b[i + 2] <= IMAGE[i] for i in (0, 1))]
        bboxes = [b for b, _ in cases]
        path = write_yolo(tmp_path / "yolo", IMAGE, bboxes)
    elif reader == "voc":
        path = write_voc(tmp_path / "voc", IMAGE, bboxes)
    else:
        path = tmp_path / "a.json"
        path.write_text(json.dumps(coco_dict(IMAGE, bboxes)))
    with pytest.warns(UserWarning):  # the clipped boxes are told
        boxes = load_boxes(path)
    assert len(cases) >= 3 and boxes.xy is not None
    np.testing.assert_allclose(boxes.xy, [xy for _, xy in cases], atol=1e-4)


def test_yolo_centres_from_the_cache_equal_the_first_read(tmp_path: Path) -> None:
    path = write_yolo(tmp_path, (640, 480), [[10, 20, 30, 40], [300.5, 100.25, 50, 60]])
    first = read_yolo(path)
    assert list(tmp_path.glob(".*autoanchor-cache.npz")), "the first read writes the cache"
    second = read_yolo(path)
    assert first.xy is not None and second.xy is not None
    np.testing.assert_allclose(first.xy, [[25, 40], [325.5, 130.25]], atol=1e-4)
    np.testing.assert_array_equal(second.xy, first.xy)


def test_voc_centres_of_one_based_inclusive_corners(tmp_path: Path) -> None:
    """Pixel ``xmin`` of a VOC box spans ``[xmin - 1, xmin]``: corners 1..10 are the 10 px ``[0, 10]``."""
    root = tmp_path / "voc"
    root.mkdir()
    (root / "a.xml").write_text("<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height>"
                                "</size><object><name>x</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>10</xmax>"
                                "<ymax>30</ymax></bndbox></object></annotation>")
    boxes = read_voc(root)
    np.testing.assert_array_equal(boxes.wh, [[10, 20]])
    np.testing.assert_array_equal(boxes.xy, [[5, 20]])


class _YoloV5Dataset:
    def __init__(self) -> None:
        self.shapes = np.array([[640, 480], [200, 100]])
        self.labels = [np.array([[0, 0.5, 0.5, 0.25, 0.5]]),
                       np.array([[3, 0.1, 0.2, 0.2, 0.4], [1, 0.9, 0.5, 0.2, 1.0]])]


def test_yolov5_dataset_labels_give_centres() -> None:
    boxes = boxes_of(_YoloV5Dataset())
    assert boxes is not None
    np.testing.assert_allclose(boxes.xy, [[320, 240], [20, 20], [180, 50]])
    np.testing.assert_allclose(boxes.wh, [[160, 240], [40, 40], [40, 100]])


def test_from_normalized_and_concat_carry_centres() -> None:
    sizes = np.array([[640, 480], [300, 600]])
    a = BoxSet.from_normalized(sizes, [[0.1, 0.1], [0.5, 0.5]], [0, 1], xy_normalized=[[0.5, 0.25], [0.1, 0.9]])
    np.testing.assert_allclose(a.xy, [[320, 120], [30, 540]])
    assert BoxSet.from_normalized(sizes, [[0.1, 0.1]], [0]).xy is None
    b = BoxSet(np.array([[10, 10]]), [[2, 2]], [0], xy=[[5, 5]])
    joined = BoxSet.concat([a, b])
    np.testing.assert_allclose(joined.xy, [[320, 120], [30, 540], [5, 5]])
    no_centres = BoxSet(np.array([[10, 10]]), [[2, 2]], [0])
    assert BoxSet.concat([a, no_centres]).xy is None, "centres of only some boxes are not centres of the set"


@pytest.mark.parametrize(("xy", "message"), [([[1.0, 2.0]], r"centres of shape \(1, 2\); expected \(2, 2\)"),
                                             ([[1.0, 2.0], [np.nan, 0]], r"box 1 of image #0 has centre")])
def test_bad_centres_are_refused(xy: list, message: str) -> None:
    with pytest.raises(DataError, match=message):
        BoxSet(np.array([[10, 10]]), [[2, 2], [3, 3]], [0, 0], xy=xy)
