"""Custom heads that declare IoU matching on their grid (``iou_threshold`` beside the AnchorHead protocol):
found, scored by placed recall, fitted as free anchors, written and read back, under a real Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn
from torchvision.ops import box_iou

from lightning_autoanchor import AutoAnchor, BoxSet
from lightning_autoanchor.boxes import MIN_FIT_SIZE
from lightning_autoanchor.demo import RenderedBoxesDataModule
from lightning_autoanchor.errors import ConfigError, HeadError
from lightning_autoanchor.grid_fit import FreeAnchors, fit_free_anchors
from lightning_autoanchor.heads import GridAnchorHead, find_heads, holds
from lightning_autoanchor.placed import place_boxes
from lightning_autoanchor.refit import AnchorUpdate
from lightning_autoanchor.refit_grid import GridUpdate, refit_grid_anchors, structure_from_dict, update_from_dict
from lightning_autoanchor.reporting import YAML_NAME

IMG = 64
STRIDES = (8, 16, 32)
BAD = [[3, 3, 4, 5], [70, 9, 9, 70], [150, 150, 200, 120]]  # per level w, h pixels: far from the demo's boxes


class Head(nn.Module):
    """A custom head: anchors in pixels, its strides, and (``iou_threshold`` given) IoU matching on its grid."""

    def __init__(self, anchors: list[list[float]] = BAD, iou_threshold: float | None = 0.5,
                 anchor_offset: float | None = None) -> None:
        super().__init__()
        self.register_buffer("anchor_wh", torch.tensor(anchors, dtype=torch.float32).view(len(STRIDES), -1, 2))
        self.register_buffer("strides", torch.tensor(STRIDES, dtype=torch.float32))
        if iou_threshold is not None:
            self.iou_threshold = iou_threshold
        if anchor_offset is not None:
            self.anchor_offset = anchor_offset
        self.conv = nn.Conv2d(3, 1, 1)

    def read_anchors(self) -> torch.Tensor:
        return self.anchor_wh.clone()

    def write_anchors(self, anchors: torch.Tensor) -> None:
        with torch.no_grad():
            self.anchor_wh.copy_(anchors)


class Detector(pl.LightningModule):
    def __init__(self, head: Head) -> None:
        super().__init__()
        self.head = head

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.head.conv(batch[0]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(module: Detector, tmp_path: Path, **settings: object) -> AutoAnchor:
    callback = AutoAnchor(plot=False, save_dir=str(tmp_path), **settings)  # type: ignore[arg-type]
    trainer = pl.Trainer(max_steps=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, datamodule=RenderedBoxesDataModule(img_size=IMG, batch_size=4))
    return callback


@pytest.fixture(scope="module")
def boxes() -> BoxSet:
    return RenderedBoxesDataModule(img_size=IMG).autoanchor_boxes()


def brute_force_best_iou(boxes: BoxSet, anchors: torch.Tensor, offset: float) -> np.ndarray:
    """Best IoU of every box (at least MIN_FIT_SIZE px on a side at the input) with every anchor generated on
    the declared grids: each image letterboxed to IMG (longer side; ``floor`` of each side, torchvision's rule),
    at the top-left, padded to 32."""
    best = []
    for i, (w, h) in enumerate(boxes.image_sizes):
        resized = np.floor(np.array([w, h]) * IMG / max(w, h))
        scale = resized / np.array([w, h])
        padded = -(-resized // 32) * 32
        rows = boxes.image_index == i
        xy, wh = boxes.xy[rows] * scale, boxes.wh[rows] * scale
        every = []
        for level, stride in enumerate(STRIDES):
            gx, gy = ((np.arange(np.ceil(p / stride)) + offset) * stride for p in padded)
            cy, cx = np.meshgrid(gy, gx, indexing="ij")
            centres = np.stack([cx.ravel(), cy.ravel()], 1).repeat(len(anchors[level]), 0)
            sizes = np.tile(anchors[level].numpy(), (len(cx.ravel()), 1))
            every.append(np.concatenate([centres - sizes / 2, centres + sizes / 2], 1))
        iou = box_iou(torch.from_numpy(np.concatenate([xy - wh / 2, xy + wh / 2], 1)),
                      torch.from_numpy(np.concatenate(every)))
        best.append(iou.amax(1).numpy()[(wh >= MIN_FIT_SIZE).any(1)])
    return np.concatenate(best)


def test_custom_grid_head_is_found_scored_fitted_and_written(tmp_path: Path) -> None:
    head = Head()
    module = Detector(head)
    callback = fit(module, tmp_path)
    update = callback.update
    assert isinstance(update, GridUpdate)
    assert update.fitted and update.replaced and update.thr == 0.5
    assert update.after.recall > update.before.recall
    fitted = update.anchors_after
    assert isinstance(fitted, FreeAnchors) and fitted.num_anchors_per_location() == [2, 2, 2]
    assert torch.equal(head.read_anchors(), torch.stack(fitted.cell_anchors()))
    recorded = [v for level in update.structure_after["wh"] for pair in level for v in pair]
    assert all(round(v, 2) == v for v in recorded)  # 0.01 px, as fitted: no float32 digits in the YAML/state
    assert holds(find_heads(module), fitted)  # the head's anchors, read back, are the recorded ones: no rewrite
    saved = yaml.safe_load((tmp_path / YAML_NAME).read_text())
    assert saved["class_path"].endswith("Head")
    assert np.allclose(saved["init_args"]["anchors"], head.read_anchors().view(3, -1).numpy(), rtol=1e-6)
    assert update_from_dict(update.as_dict()) == update  # kept in the callback's state as it is


def test_head_without_iou_threshold_keeps_the_width_height_path(tmp_path: Path) -> None:
    callback = fit(Detector(Head(iou_threshold=None)), tmp_path, generations=50)
    assert isinstance(callback.update, AnchorUpdate)


def test_stretch_to_a_width_height_pair(tmp_path: Path) -> None:
    head = Head()
    callback = fit(Detector(head), tmp_path, img_size=(64, 48), resize="stretch")
    assert isinstance(callback.update, GridUpdate)
    adapter = find_heads(Detector(Head())).primary
    assert isinstance(adapter, GridAnchorHead)
    adapter.train_at((64, 48), "stretch")
    assert adapter.detector_resize().fixed_size == (64, 48)
    assert adapter.detector_resize().size_divisible == 32


@pytest.mark.parametrize("offset", [None, 0.5])
def test_placed_measure_is_brute_force_over_the_declared_grids(boxes: BoxSet, offset: float | None) -> None:
    few = boxes.image_index < 12
    subset = BoxSet(boxes.image_sizes[:12], boxes.wh[few], boxes.image_index[few], xy=boxes.xy[few])
    head = Head([[8, 8, 16, 10], [20, 40, 30, 30], [60, 50, 40, 64]], anchor_offset=offset)
    adapter = find_heads(Detector(head)).primary
    assert find_heads(Detector(head)).on_grid
    adapter.train_at(IMG, "letterbox")
    placed = place_boxes(subset, adapter.detector_resize(), adapter.layout, adapter.settings.center_offset)
    best = placed.best_iou(adapter.structure().cell_anchors()).numpy()
    expected = brute_force_best_iou(subset, head.read_anchors(), offset or 0.0)
    assert len(best) == len(expected) > 20
    assert np.allclose(best, expected, atol=1e-5)


@pytest.mark.parametrize("start", [BAD, [[8, 8, 16, 10], [20, 40, 30, 30], [60, 50, 40, 64]]])
def test_free_anchor_fit_is_never_worse_than_its_start(boxes: BoxSet, start: list[list[float]]) -> None:
    adapter = find_heads(Detector(Head(start))).primary
    adapter.train_at(IMG, "letterbox")
    placed = place_boxes(boxes, adapter.detector_resize(), adapter.layout, 0.0)
    begin = FreeAnchors.of(torch.tensor(start, dtype=torch.float32).view(3, -1, 2))
    result = fit_free_anchors(placed, begin, 0.5, seed=1, restarts=0)
    assert not result.start.beats(result.scores)
    assert result.scores == placed.score(result.anchors.cell_anchors(), 0.5)  # the scored anchors are the result
    assert structure_from_dict({"kind": "free", **result.anchors.as_dict()}) == result.anchors
    update = refit_grid_anchors(begin, placed, 0.5, bpr_threshold=1.0)
    assert update.after.recall >= update.before.recall


def test_bad_declarations_are_named() -> None:
    with pytest.raises(HeadError, match="iou_threshold"):
        find_heads(Detector(Head(iou_threshold=1.5)))
    with pytest.raises(HeadError, match="anchor_offset"):
        find_heads(Detector(Head(anchor_offset=1.0)))
    adapter = find_heads(Detector(Head())).primary
    with pytest.raises(ConfigError, match="non-square"):
        adapter.train_at((64, 48), "letterbox")
    with pytest.raises(HeadError, match="anchors per level"):
        adapter.write(FreeAnchors([[(4, 4)], [(8, 8)], [(16, 16)]]))
