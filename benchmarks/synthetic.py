"""Synthetic box sets for the benchmark, resampled from the real annotation files.

Images of COCO val2017 and VOC 2012 trainval are drawn with replacement and every drawn image gets
one random scale factor, uniform in :data:`JITTER`, applied to all its boxes (as a training
pipeline's scale augmentation does); they are written as COCO JSON files (:func:`write_coco`), so
YOLOv5's optimiser reads exactly the same boxes, or as a YOLO dataset (:func:`write_yolo_dataset`).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["JITTER", "Pool", "write_coco", "write_yolo_dataset"]

JITTER = (0.8, 1.25)
"""Range of the per-image scale factor of the resampled sets."""


@dataclass
class Pool:
    """Source images of the real sets: sizes and boxes in letterboxed pixels (longer side ``img_size``).

    Attributes:
        sizes: ``(M, 2)`` int image widths and heights.
        boxes: ``(N, 4)`` float64 ``x, y, w, h`` of every box at the letterbox size, grouped by image.
        start: ``(M + 1,)`` offsets: the boxes of image ``i`` are ``boxes[start[i]:start[i + 1]]``.
        img_size: the letterbox size of ``boxes``.
    """

    sizes: np.ndarray
    boxes: np.ndarray
    start: np.ndarray
    img_size: float

    @classmethod
    def load(cls, paths: Sequence[Path], img_size: float) -> Pool:
        sizes, boxes, counts = [], [], []
        for path in paths:
            with gzip.open(path, "rt") as f:
                data = json.load(f)
            row = {im["id"]: i for i, im in enumerate(data["images"])}
            size = np.array([[im["width"], im["height"]] for im in data["images"]], dtype=np.int64)
            index = np.array([row[a["image_id"]] for a in data["annotations"]], dtype=np.int64)
            bbox = np.array([a["bbox"] for a in data["annotations"]], dtype=np.float64).reshape(-1, 4)
            order = np.argsort(index, kind="stable")
            scale = img_size / size.max(axis=1)
            sizes.append(size)
            boxes.append(bbox[order] * scale[index[order], None])
            counts.append(np.bincount(index, minlength=len(size)))
        count = np.concatenate(counts)
        return cls(np.concatenate(sizes), np.concatenate(boxes), np.concatenate([[0], np.cumsum(count)]), img_size)

    @property
    def mean_boxes(self) -> float:
        return len(self.boxes) / len(self.sizes)

    def sample(self, n_images: int, group: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
        """``n_images`` new images: ``(sizes, boxes x,y,w,h in pixels, image index of each box)``.

        Each new image takes the size of a randomly drawn source image and the boxes of ``group``
        drawn source images (``group=1``: exactly that image's boxes), carried over in letterbox
        space (so each box keeps its size relative to the longer image side) and multiplied by the
        image's scale factor (uniform in :data:`JITTER`); boxes are then clipped to the image.
        """
        sources = rng.integers(0, len(self.sizes), size=(n_images, group))
        sizes = self.sizes[sources[:, 0]]
        factor = rng.uniform(*JITTER, size=n_images) * sizes.max(axis=1) / self.img_size
        flat = sources.reshape(-1)
        counts = self.start[flat + 1] - self.start[flat]
        owner = np.repeat(np.arange(n_images), group)
        image_index = np.repeat(owner, counts)
        # position of every box in the pool: start of its source image + its rank within that image
        first = np.repeat(self.start[flat], counts)
        rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        boxes = self.boxes[first + rank] * factor[image_index, None]
        limit = sizes[image_index].astype(np.float64)
        boxes[:, 2:] = np.minimum(boxes[:, 2:], limit)
        boxes[:, :2] = np.clip(boxes[:, :2], 0, limit - boxes[:, 2:])
        boxes = np.round(boxes, 2)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 0.01)
        return sizes, boxes, image_index

    def sample_boxes(self, n_boxes: int, group: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
        """Like :meth:`sample`, with as many images as it takes to reach ``n_boxes`` boxes (whole images)."""
        n_images = int(n_boxes / (group * self.mean_boxes) * 1.05) + 10
        while True:
            sizes, boxes, index = self.sample(n_images, group, rng)
            if len(boxes) >= n_boxes:
                last = int(index[n_boxes - 1])
                keep = index <= last
                return sizes[:last + 1], boxes[keep], index[keep]
            n_images = int(n_images * 1.2)


def _write_rows(f: io.TextIOBase, fmt: str, columns: Sequence[np.ndarray], chunk: int = 200_000) -> None:
    """Write ``fmt % row`` for the rows of ``columns``, separated by ``,\\n``."""
    for begin in range(0, len(columns[0]), chunk):
        rows = zip(*(c[begin:begin + chunk].tolist() for c in columns), strict=True)
        if begin:
            f.write(",\n")
        f.write(",\n".join(fmt % row for row in rows))


def write_coco(path: Path, sizes: np.ndarray, boxes: np.ndarray, image_index: np.ndarray, description: str) -> Path:
    """Write a minimal COCO detection JSON (image ids from 1, one category)."""
    info = {"description": description, "source": "benchmarks/bench_anchors.py (resampled real boxes)"}
    ids = np.arange(1, len(sizes) + 1)
    with open(path, "w", encoding="ascii") as f:
        f.write(f'{{"info": {json.dumps(info)},\n"categories": [{{"id": 1, "name": "object"}}],\n"images": [\n')
        _write_rows(f, '{"id": %d, "width": %d, "height": %d, "file_name": "%06d.jpg"}',
                    [ids, sizes[:, 0], sizes[:, 1], ids])
        f.write('\n],\n"annotations": [\n')
        _write_rows(f, '{"id": %d, "image_id": %d, "category_id": 1, "bbox": [%.2f, %.2f, %.2f, %.2f]}',
                    [np.arange(1, len(boxes) + 1), image_index + 1, *boxes.T])
        f.write("\n]}\n")
    return path


def write_yolo_dataset(root: Path, sizes: np.ndarray, boxes: np.ndarray, image_index: np.ndarray) -> Path:
    """An Ultralytics-style dataset: ``images/train/*.jpg``, ``labels/train/*.txt`` and ``data.yaml``.

    The images are tiny uniform JPEGs with the real sizes in their headers, made once per distinct
    size and copied.
    """
    from PIL import Image

    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    jpeg: dict[tuple[int, int], bytes] = {}
    for w, h in {tuple(s) for s in sizes.tolist()}:
        buffer = io.BytesIO()
        Image.new("L", (w, h), 114).save(buffer, "JPEG", quality=20)
        jpeg[w, h] = buffer.getvalue()
    wh = sizes[image_index].astype(np.float64)
    centre = (boxes[:, :2] + boxes[:, 2:] / 2) / wh
    norm = np.concatenate([centre, boxes[:, 2:] / wh], axis=1).tolist()
    bounds = np.searchsorted(image_index, np.arange(len(sizes) + 1))
    for i, (w, h) in enumerate(sizes.tolist()):
        (images / f"{i:06d}.jpg").write_bytes(jpeg[w, h])
        rows = norm[bounds[i]:bounds[i + 1]]
        (labels / f"{i:06d}.txt").write_text("".join(f"0 {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for x, y, w, h in rows))
    config = root / "data.yaml"
    config.write_text(f"path: {root}\ntrain: images/train\nnames:\n  0: object\n")
    return config

