"""The demo detector and data: shapes, units, the anchor buffers and the loss's reference to them."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.cli import LightningCLI

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo, YoloHead, YoloLoss
from lightning_autoanchor.demo.data import DEFAULT_ANNOTATIONS, PAD_VALUE

ROOT = Path(__file__).resolve().parents[1]
YOLOV5_ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


@pytest.fixture(scope="module")
def coco() -> dict:
    with gzip.open(DEFAULT_ANNOTATIONS, "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def dm() -> RenderedBoxesDataModule:
    dm = RenderedBoxesDataModule(batch_size=4)
    dm.setup("fit")
    return dm


def _targets(sizes_px: list[tuple[float, float]], img_size: int = 160) -> torch.Tensor:
    """One image with boxes of the given sizes (pixels) spread along its diagonal, YOLOv5 label rows."""
    n = len(sizes_px)
    t = torch.zeros(n, 6)
    t[:, 2:4] = torch.linspace(0.2, 0.8, n)[:, None]
    t[:, 4:6] = torch.tensor(sizes_px) / img_size
    return t


def test_shipped_slice_is_small_and_attributed(coco: dict) -> None:
    assert DEFAULT_ANNOTATIONS.stat().st_size < 200_000
    assert "CC BY 4.0" in coco["info"]["license_note"]
    assert "CC BY 4.0" in (DEFAULT_ANNOTATIONS.parent / "DATA_LICENSE.md").read_text()
    assert len(coco["categories"]) == 80
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    assert {im["id"] for im in coco["images"]} == with_boxes


def test_batches_have_yolo_shapes_and_normalised_targets(dm: RenderedBoxesDataModule) -> None:
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 160, 160) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert targets.ndim == 2 and targets.shape[1] == 6 and len(targets) > 0
    assert set(targets[:, 0].long().tolist()) == {0, 1, 2, 3}  # every slice image has a box
    assert ((targets[:, 1] >= 0) & (targets[:, 1] < 80)).all()
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all() and (targets[:, 4:] > 0).all()
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape[1:] == (3, 160, 160)


def test_rendering_letterboxes_the_json_boxes(dm: RenderedBoxesDataModule, coco: dict) -> None:
    ds = dm.train_dataloader().dataset
    sizes = dm.annotations.image_sizes[ds.rows]
    i = int(np.flatnonzero(sizes[:, 0] != sizes[:, 1])[0])  # an image that needs padding
    image, targets = ds[i]
    name = dm.annotations.file_names[ds.rows[i]]
    info = next(im for im in coco["images"] if im["file_name"] == name)
    cat_ids = sorted(c["id"] for c in coco["categories"])
    boxes = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
    r = 160 / max(info["width"], info["height"])
    pad = ((160 - info["width"] * r) / 2, (160 - info["height"] * r) / 2)
    expected = sorted(
        (cat_ids.index(a["category_id"]), (a["bbox"][0] + a["bbox"][2] / 2) * r + pad[0],
         (a["bbox"][1] + a["bbox"][3] / 2) * r + pad[1], a["bbox"][2] * r, a["bbox"][3] * r)
        for a in boxes
    )
    got = sorted((int(c), *(v * 160 for v in rest)) for c, *rest in targets[:, 1:].tolist())
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-3)
    if pad[1] >= 1:  # wide image: grey bands above and below
        assert torch.all(image[:, 0, :] == PAD_VALUE) and torch.all(image[:, -1, :] == PAD_VALUE)
    else:
        assert torch.all(image[:, :, 0] == PAD_VALUE) and torch.all(image[:, :, -1] == PAD_VALUE)
    assert torch.equal(ds[i][0], image)  # deterministic rendering


def test_autoanchor_boxes_are_the_train_split(coco: dict) -> None:
    dm = RenderedBoxesDataModule()  # no setup: autoanchor_boxes() sets up itself
    boxes = dm.autoanchor_boxes()
    assert isinstance(boxes, BoxSet)
    assert dm.img_size == 160
    n_images = len(coco["images"])
    assert boxes.num_images == len(boxes.image_names) == round(0.9 * n_images)
    train_names = set(boxes.image_names)
    val_names = {dm.annotations.file_names[r] for r in dm.val_rows}
    assert len(train_names) == boxes.num_images and not train_names & val_names
    assert len(train_names | val_names) == n_images
    train_ids = {im["id"]: im for im in coco["images"] if im["file_name"] in train_names}
    train_anns = [a for a in coco["annotations"] if a["image_id"] in train_ids]
    assert len(boxes) == len(train_anns)
    for k in range(0, boxes.num_images, 97):  # per-image sizes and box sizes in original pixels
        im = next(v for v in train_ids.values() if v["file_name"] == boxes.image_names[k])
        np.testing.assert_allclose(boxes.image_sizes[k], [im["width"], im["height"]])
        expected = sorted(tuple(a["bbox"][2:]) for a in train_anns if a["image_id"] == im["id"])
        got = sorted(map(tuple, boxes.wh[boxes.image_index == k].tolist()))
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6)
    assert Counter(boxes.image_names) == Counter(dm.annotations.file_names[r] for r in dm.train_rows)
    other = RenderedBoxesDataModule(seed=1).autoanchor_boxes()
    assert set(other.image_names) != train_names
    assert RenderedBoxesDataModule().autoanchor_boxes().image_names == boxes.image_names


def test_default_anchors_fit_the_boxes_badly_at_160_px(dm: RenderedBoxesDataModule) -> None:
    """The demo's premise: YOLOv5's 640 px anchors recall under 98 % of the boxes at 160 px (thr 4)."""
    wh = dm.autoanchor_boxes().scaled(160)
    anchors = torch.tensor(YOLOV5_ANCHORS_PX, dtype=torch.float32).view(-1, 2)
    r = wh[:, None] / anchors[None]
    best = torch.min(r, 1 / r).amin(2).amax(1)
    bpr = (best > 1 / 4).float().mean().item()
    assert 0.5 < bpr < 0.98


def test_head_stores_anchors_in_stride_units() -> None:
    model = TinyYolo()
    head = model.head
    assert isinstance(head, YoloHead) and isinstance(model.loss_fn, YoloLoss)
    assert head.anchors.shape == (3, 3, 2) and head.stride.tolist() == [8, 16, 32]
    expected_px = torch.tensor(YOLOV5_ANCHORS_PX, dtype=torch.float32).view(3, 3, 2)
    torch.testing.assert_close(head.anchors * head.stride.view(-1, 1, 1), expected_px)
    assert {"head.anchors", "head.stride"} <= set(model.state_dict())
    owners = [m for m in model.modules()
              if {"anchors", "stride"} <= dict(m.named_buffers(recurse=False)).keys()]
    assert owners == [head]
    raw = model(torch.zeros(2, 3, 160, 160))
    assert [tuple(p.shape) for p in raw] == [(2, 3, s, s, 85) for s in (20, 10, 5)]


def test_loss_sees_anchors_written_in_place() -> None:
    torch.manual_seed(0)
    model = TinyYolo(width=8)
    raw = model(torch.rand(1, 3, 160, 160))
    sizes = [(12, 20), (40, 30), (100, 150), (3, 3), (150, 10)]
    targets = _targets(sizes)

    loss_default, _ = model.loss_fn(raw, targets)
    assert model.loss_fn.last_match_rate == pytest.approx(3 / 5)  # 3x3 and 150x10 match no default anchor

    fitted_px = torch.tensor([*sizes, (20, 20), (60, 60), (120, 120), (8, 8)], dtype=torch.float32)
    with torch.no_grad():
        model.head.anchors.copy_(fitted_px.view(3, 3, 2) / model.head.stride.view(-1, 1, 1))
    assert model.loss_fn.anchors is model.head.anchors
    seen_px = model.loss_fn.anchors * model.loss_fn.stride.view(-1, 1, 1)
    torch.testing.assert_close(seen_px, fitted_px.view(3, 3, 2))
    loss_fitted, parts = model.loss_fn(raw, targets)
    assert model.loss_fn.last_match_rate == 1.0
    assert model.loss_fn.last_matched == model.loss_fn.last_total == 5
    assert parts["box"] > 0 and loss_fitted != loss_default

    with torch.no_grad():
        model.head.anchors.fill_(1000.0)
    _, parts = model.loss_fn(raw, targets)
    assert model.loss_fn.last_match_rate == 0.0 and parts["box"] == 0 and parts["cls"] == 0


def test_loss_follows_the_head_across_dtype_moves_and_checkpoints() -> None:
    model = TinyYolo(width=8)
    new = torch.rand(3, 3, 2) + 0.5
    with torch.no_grad():
        model.head.anchors.copy_(new)
    model.double()
    assert model.head.anchors.dtype == torch.float64
    assert model.loss_fn.anchors is model.head.anchors and model.loss_fn.stride is model.head.stride
    model.float()
    fresh = TinyYolo(width=8)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.head.anchors, new)
    assert fresh.loss_fn.anchors is fresh.head.anchors


def test_decode_uses_anchors_in_pixels_and_rebuilds_reset_grids() -> None:
    model = TinyYolo(width=8).eval()
    head = model.head
    with torch.no_grad():
        for conv in head.m:
            conv.weight.zero_()
            conv.bias.zero_()  # every sigmoid is 0.5: box at the cell centre with the anchor's size
    with torch.no_grad():
        out = head.decode(model(torch.rand(1, 3, 160, 160)))
    assert out.shape == (1, 3 * (400 + 100 + 25), 85)
    p3 = out[0, :3 * 400].view(3, 20, 20, 85)
    torch.testing.assert_close(p3[:, 0, 0, 2:4], head.anchors[0] * 8)
    torch.testing.assert_close(p3[0, 2, 5, :2], torch.tensor([5.5 * 8, 2.5 * 8]))

    with torch.no_grad():
        head.anchors.mul_(2)
    head.grid = [torch.empty(0)] * head.nl
    head.anchor_grid = [torch.empty(0)] * head.nl
    with torch.no_grad():
        out = head.decode(model(torch.rand(1, 3, 160, 160)))
    torch.testing.assert_close(out[0, :3 * 400].view(3, 20, 20, 85)[:, 0, 0, 2:4], head.anchors[0] * 8)


def test_fast_dev_run_fits(dm: RenderedBoxesDataModule) -> None:
    model = TinyYolo(width=8)
    before = model.head.m[0].weight.detach().clone()
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished
    assert not torch.equal(before, model.head.m[0].weight)
    for key in ("train/loss", "train/match_rate", "val/loss", "val/match_rate"):
        assert torch.isfinite(trainer.callback_metrics[key])
    assert 0 < trainer.callback_metrics["train/match_rate"] <= 1


def test_example_config_builds_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load((ROOT / "example_configs" / "demo.yaml").read_text())
    assert config["trainer"]["callbacks"][0]["class_path"] == "lightning_autoanchor.AutoAnchor"
    del config["trainer"]["callbacks"]  # the callback is tested on its own
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    monkeypatch.setattr("sys.argv", ["demo"])  # not pytest's arguments
    cli = LightningCLI(TinyYolo, RenderedBoxesDataModule, run=False, args=config)
    assert isinstance(cli.model, TinyYolo) and cli.datamodule.img_size == 160
    torch.testing.assert_close(cli.model.head.anchors * cli.model.head.stride.view(-1, 1, 1),
                               torch.tensor(YOLOV5_ANCHORS_PX, dtype=torch.float32).view(3, 3, 2))
    assert cli.trainer.max_epochs <= 3
