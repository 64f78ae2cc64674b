"""Synthetic detection images rendered from real COCO boxes.

Each image of an annotation file (COCO-style JSON, optionally gzip) becomes a letterboxed
``img_size`` x ``img_size`` picture: its boxes are drawn as filled rectangles in a colour per class
over a noisy background, so a detector can learn them while the box sizes stay those of the real data.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError

__all__ = [
    "DEFAULT_ANNOTATIONS",
    "PAD_VALUE",
    "Annotations",
    "RenderedBoxesDataModule",
    "RenderedBoxesDataset",
    "collate",
]

DEFAULT_ANNOTATIONS = Path(__file__).with_name("coco_val2017_sample.json.gz")
"""The shipped slice of COCO val2017 boxes (see DATA_LICENSE.md)."""

PAD_VALUE = 114 / 255
"""Grey of the letterbox padding (YOLOv5's)."""


@dataclass(frozen=True)
class Annotations:
    """Images and boxes of an annotation file.

    Attributes:
        file_names: ``M`` image file names.
        image_ids: ``(M,)`` int64 image ids.
        image_sizes: ``(M, 2)`` float64 width and height of every image in pixels.
        boxes: ``M`` arrays of shape ``(n_i, 4)`` float64, ``x, y, w, h`` in pixels of the original image.
        classes: ``M`` arrays of shape ``(n_i,)`` int64 contiguous class indices.
        class_names: ``C`` category names, indexed by class index.
    """

    file_names: tuple[str, ...]
    image_ids: np.ndarray
    image_sizes: np.ndarray
    boxes: tuple[np.ndarray, ...]
    classes: tuple[np.ndarray, ...]
    class_names: tuple[str, ...]

    @classmethod
    def read(cls, path: str | Path) -> Annotations:
        """Read a COCO-style file; category ids are mapped to ``0..C-1`` in increasing id order."""
        path = Path(path)
        try:
            with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
                data = json.load(f)
            images = sorted(data["images"], key=lambda im: im["id"])
            categories = sorted(data["categories"], key=lambda c: c["id"])
            annotations = data["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: cannot read COCO-style annotations ({e!r})") from e
        if not images:
            raise DataError(f"{path}: no images")
        class_of = {c["id"]: k for k, c in enumerate(categories)}
        row_of = {im["id"]: i for i, im in enumerate(images)}
        boxes: list[list[list[float]]] = [[] for _ in images]
        classes: list[list[int]] = [[] for _ in images]
        for a in annotations:
            if a["image_id"] not in row_of or a["category_id"] not in class_of:
                raise DataError(f"{path}: annotation {a.get('id')} refers to an unknown image or category")
            boxes[row_of[a["image_id"]]].append(a["bbox"])
            classes[row_of[a["image_id"]]].append(class_of[a["category_id"]])
        return cls(
            file_names=tuple(im["file_name"] for im in images),
            image_ids=np.array([im["id"] for im in images], dtype=np.int64),
            image_sizes=np.array([[im["width"], im["height"]] for im in images], dtype=np.float64),
            boxes=tuple(np.array(b, dtype=np.float64).reshape(-1, 4) for b in boxes),
            classes=tuple(np.array(c, dtype=np.int64) for c in classes),
            class_names=tuple(c["name"] for c in categories),
        )


class RenderedBoxesDataset(Dataset):
    """Letterboxed renderings of some images of an :class:`Annotations`.

    Item ``i`` is ``(image, targets)``: ``image`` a ``(3, img_size, img_size)`` float32 tensor in
    ``[0, 1]``; ``targets`` an ``(n, 6)`` float32 tensor of rows ``[0, class, xc, yc, w, h]`` with the
    box centre and size as fractions of ``img_size`` (YOLOv5 labels; column 0 is filled with the batch
    index by :func:`collate`). Rendering is deterministic given ``seed`` and the image id.
    """

    def __init__(self, annotations: Annotations, rows: np.ndarray, img_size: int, seed: int = 0) -> None:
        self.annotations = annotations
        self.rows = np.asarray(rows, dtype=np.int64)
        self.img_size = img_size
        self.seed = seed
        self.palette = torch.from_numpy(
            np.random.default_rng(12345).uniform(0.05, 0.95, size=(len(annotations.class_names), 3))
        ).float()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        ann, s = self.annotations, self.img_size
        row = int(self.rows[i])
        w, h = ann.image_sizes[row]
        r = s / max(w, h)
        pad = np.array([(s - w * r) / 2, (s - h * r) / 2])
        xywh = ann.boxes[row]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        xyxy = (xyxy * r + np.tile(pad, 2)).clip(0, s)  # pixels at img_size

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ann.image_ids[row]))
        image = torch.full((3, s, s), PAD_VALUE)
        x0, y0 = (round(p) for p in pad)
        x1, y1 = round(pad[0] + w * r), round(pad[1] + h * r)
        image[:, y0:y1, x0:x1] = 0.5
        order = np.argsort(-(xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]), kind="stable")
        for k in order:  # largest first, so that small boxes stay visible
            bx0, by0 = int(xyxy[k, 0]), int(xyxy[k, 1])
            bx1, by1 = max(bx0 + 1, round(xyxy[k, 2])), max(by0 + 1, round(xyxy[k, 3]))
            colour = self.palette[ann.classes[row][k]].view(3, 1, 1)
            image[:, by0:by1, bx0:bx1] = colour * 0.7  # darker rim separates touching boxes
            image[:, by0 + 1:by1 - 1, bx0 + 1:bx1 - 1] = colour
        image[:, y0:y1, x0:x1] += 0.08 * torch.randn((3, y1 - y0, x1 - x0), generator=gen)

        targets = torch.zeros((len(xyxy), 6))
        targets[:, 1] = torch.from_numpy(ann.classes[row])
        xyxy_t = torch.from_numpy(xyxy / s).float()
        targets[:, 2:4] = (xyxy_t[:, :2] + xyxy_t[:, 2:]) / 2
        targets[:, 4:6] = xyxy_t[:, 2:] - xyxy_t[:, :2]
        return image.clamp_(0, 1), targets


def collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack images to ``(B, 3, S, S)`` and concatenate targets to ``(N, 6)`` with the batch index set."""
    images, targets = zip(*batch, strict=True)
    for b, t in enumerate(targets):
        t[:, 0] = b
    return torch.stack(images), torch.cat(targets)


class _RenderedBoxesDataModule:
    """Train/val loaders of rendered images, and the train split's boxes for ``AutoAnchor``.

    Args:
        annotations: COCO-style JSON (``.json`` or ``.json.gz``); default: the shipped COCO val2017 slice.
        img_size: training image size in pixels (letterbox: longer side scaled to it, then padded square).
        batch_size: images per batch.
        num_workers: data loader worker processes.
        train_fraction: share of images in the train split; the rest are the val split.
        seed: seed of the split and of the rendering noise.
    """

    def __init__(self, annotations: str | None = None, img_size: int = 160, batch_size: int = 16,
                 num_workers: int = 0, train_fraction: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.save_hyperparameters()
        self.annotations_path = Path(annotations) if annotations else DEFAULT_ANNOTATIONS
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_fraction = train_fraction
        self.seed = seed
        self.annotations: Annotations | None = None
        self.train_rows = np.zeros(0, dtype=np.int64)
        self.val_rows = np.zeros(0, dtype=np.int64)

    def setup(self, stage: str | None = None) -> None:
        """Read the annotations once and split the images at random (seeded) into train and val."""
        if self.annotations is not None:
            return
        self.annotations = Annotations.read(self.annotations_path)
        n = len(self.annotations.file_names)
        order = np.random.default_rng(self.seed).permutation(n)
        n_train = max(1, round(self.train_fraction * n))
        self.train_rows, self.val_rows = np.sort(order[:n_train]), np.sort(order[n_train:])

    def _loaded(self) -> Annotations:
        self.setup()
        assert self.annotations is not None
        return self.annotations

    def _loader(self, split: str) -> DataLoader:
        annotations = self._loaded()
        rows = self.train_rows if split == "train" else self.val_rows
        return DataLoader(RenderedBoxesDataset(annotations, rows, self.img_size, self.seed), batch_size=self.batch_size,
                          shuffle=split == "train", num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def autoanchor_boxes(self) -> BoxSet:
        """Boxes of the train split (sizes and centres), in pixels of their original images (calls
        :meth:`setup` if needed)."""
        ann = self._loaded()
        rows = self.train_rows
        xywh = np.concatenate([ann.boxes[r] for r in rows])
        return BoxSet(
            image_sizes=ann.image_sizes[rows],
            wh=xywh[:, 2:],
            xy=xywh[:, :2] + xywh[:, 2:] / 2,
            image_index=np.concatenate([np.full(len(ann.boxes[r]), i) for i, r in enumerate(rows)]),
            image_names=tuple(ann.file_names[r] for r in rows),
            source=str(self.annotations_path),
        )


class RenderedBoxesDataModule(_RenderedBoxesDataModule, pl.LightningDataModule):  # type: ignore[misc]
    __doc__ = _RenderedBoxesDataModule.__doc__
