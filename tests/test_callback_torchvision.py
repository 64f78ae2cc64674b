"""AutoAnchor on torchvision's detectors (weights=None) under real Trainers: found, measured where the model
places anchors, fitted in its structure, written so the next forward uses them, kept across save and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torchvision.models import detection
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from lightning_autoanchor import AutoAnchor, BoxSet, restore_anchors
from lightning_autoanchor.errors import HeadError
from lightning_autoanchor.placed import place_boxes
from lightning_autoanchor.refit_grid import GridUpdate
from lightning_autoanchor.reporting import YAML_NAME
from lightning_autoanchor.sources import load_boxes
from lightning_autoanchor.torchvision_heads import find_torchvision_anchors

from .conftest import DATA

COCO150 = DATA / "coco2017_val_150.json.gz"
SMALL = {"min_size": 160, "max_size": 256}  # small images: fast forwards on CPU


def retinanet() -> torch.nn.Module:
    return detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **SMALL)


def fasterrcnn() -> torch.nn.Module:
    return detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                           **SMALL)


class Detector(pl.LightningModule):
    """A LightningModule around a torchvision detector, trained on a few random images with boxes."""

    def __init__(self, build: object = retinanet) -> None:
        super().__init__()
        self.model = build()  # type: ignore[operator]

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        return sum(self.model(images, targets).values())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)


class Boxes(pl.LightningDataModule):
    """Two tiny training images; the boxes the callback reads are the COCO slice's."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        images = [torch.rand(3, 96, 128) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])} for _ in range(2)]
        return torch.utils.data.DataLoader(list(zip(images, targets, strict=True)), batch_size=2,
                                           collate_fn=lambda b: tuple(zip(*b, strict=True)))

    def autoanchor_boxes(self) -> BoxSet:
        return load_boxes(COCO150)


def trainer(tmp_path: Path, *callbacks: pl.Callback, **kwargs: object) -> pl.Trainer:
    options = {"max_epochs": 1, "limit_train_batches": 1, "accelerator": "cpu", "logger": CSVLogger(tmp_path),
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               "default_root_dir": tmp_path}
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)  # type: ignore[arg-type]


def generated_wh(model: torch.nn.Module, height: int = 96, width: int = 128) -> torch.Tensor:
    """The widths and heights of the anchors the model's generator produces on its next forward."""
    model.eval()
    images = ImageList(torch.zeros(1, 3, height, width), [(height, width)])
    features = list(model.backbone(images.tensors).values())
    anchors = model.anchor_generator(images, features)[0] if hasattr(model, "anchor_generator") else \
        model.rpn.anchor_generator(images, features)[0]
    return torch.unique((anchors[:, 2:] - anchors[:, :2]).round(decimals=2), dim=0)


@pytest.mark.parametrize("build", [retinanet, fasterrcnn])
def test_found_fitted_written_and_used_by_the_next_forward(tmp_path: Path, build: object) -> None:
    module, callback = Detector(build), AutoAnchor(seed=0)
    count = find_torchvision_anchors(module).num_anchors_per_location()
    trainer(tmp_path, callback).fit(module, Boxes())
    update = callback.update
    assert isinstance(update, GridUpdate) and update.fitted and update.replaced
    assert update.after.recall > update.before.recall
    adapter = find_torchvision_anchors(module)
    assert adapter.num_anchors_per_location() == count, "the count per location is the model's"
    expected = torch.unique(torch.cat(update.anchors_after.cell_anchors()).round(decimals=2), dim=0)
    torch.testing.assert_close(generated_wh(module.model), expected)
    module.model.eval()
    with torch.no_grad():
        module.model([torch.rand(3, 96, 128)])  # an eval forward runs with the new anchors
    logged = (Path(trainer_log_dir(tmp_path)) / "metrics.csv").read_text()
    assert "autoanchor/recall_after" in logged and "autoanchor/mean_best_iou_after" in logged
    saved = yaml.safe_load((Path(trainer_log_dir(tmp_path)) / YAML_NAME).read_text())
    assert saved["init_args"]["sizes"] == [list(s) for s in update.anchors_after.sizes]


def trainer_log_dir(tmp_path: Path) -> Path:
    return tmp_path / "lightning_logs" / "version_0"


def test_the_measure_is_the_model_s_own_best_iou(tmp_path: Path) -> None:
    """Placed recall equals a brute-force IoU over every anchor the model generates, image by image."""
    adapter = find_torchvision_anchors(retinanet())
    boxes = load_boxes(COCO150)
    keep = np.flatnonzero(np.isin(boxes.image_index, [0, 1, 2]))
    small = BoxSet(boxes.image_sizes[:3], boxes.wh[keep], boxes.image_index[keep], xy=boxes.xy[keep])
    resize = adapter.detector_resize()
    placed = place_boxes(small, resize, adapter.layout, 0.0)
    model = adapter.detector.eval()
    best = []
    for i in range(3):
        w, h = small.image_sizes[i]
        image = torch.zeros(3, int(h), int(w))
        batch, _ = model.transform([image])
        features = list(model.backbone(batch.tensors).values())
        anchors = adapter.generator(batch, features)[0]
        scale = torch.tensor(batch.image_sizes[0][::-1], dtype=torch.float64) / torch.tensor([w, h])
        rows = small.image_index == i
        centre, size = torch.from_numpy(small.xy[rows]).double(), torch.from_numpy(small.wh[rows]).double()
        xyxy = torch.cat([(centre - size / 2) * scale, (centre + size / 2) * scale], dim=1)
        best.append(box_iou(xyxy, anchors.double()).amax(dim=1))
    brute = torch.cat(best)
    ours = placed.best_iou(adapter.structure().cell_anchors())
    torch.testing.assert_close(ours.double(), brute, atol=2e-3, rtol=0)


def test_restore_anchors_after_load_from_checkpoint_and_a_resume_trains_on_them(tmp_path: Path) -> None:
    callback = AutoAnchor(seed=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trained = Detector()
    trainer(tmp_path, callback, checkpoint, enable_checkpointing=True).fit(trained, Boxes())
    fitted = find_torchvision_anchors(trained).structure()
    path = tmp_path / "ckpt" / "last.ckpt"

    fresh = Detector.load_from_checkpoint(path)
    assert find_torchvision_anchors(fresh).structure() != fitted, "cell anchors are not in the state_dict"
    assert restore_anchors(fresh, path) == ["model.anchor_generator"]
    assert find_torchvision_anchors(fresh).structure() == fitted
    bare = retinanet()  # the detector alone, without the LightningModule around it
    restore_anchors(bare, path)
    assert find_torchvision_anchors(bare).structure() == fitted

    resumed, again = Detector(), AutoAnchor(seed=0)
    trainer(tmp_path, again, max_epochs=2).fit(resumed, Boxes(), ckpt_path=path)
    assert find_torchvision_anchors(resumed).structure() == fitted, "the resumed run trains on the fitted anchors"


def test_restore_anchors_refuses_a_checkpoint_without_autoanchor(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match="holds no AutoAnchor state"):
        restore_anchors(Detector(), {"state_dict": {}, "callbacks": {}})


def test_the_random_min_size_tuple_is_covered() -> None:
    """In training torchvision draws min_size from the tuple: every size counts, each equally."""
    adapter = find_torchvision_anchors(detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=(128, 256), max_size=400))
    boxes = load_boxes(COCO150)
    both = place_boxes(boxes, adapter.detector_resize(), adapter.layout, 0.0)
    each = [place_boxes(boxes, adapter.detector_resize(min_size=(s,)), adapter.layout, 0.0) for s in (128, 256)]
    anchors = adapter.structure().cell_anchors()
    recalls = [p.score(anchors, 0.5).recall for p in each]
    # the mean of the two, but for the few boxes under 2 px at one size only, left out there
    assert both.score(anchors, 0.5).recall == pytest.approx(sum(recalls) / 2, abs=1e-3)
    assert recalls[0] != pytest.approx(recalls[1], abs=1e-3)


def test_a_retinanet_given_only_annotations_gains_on_held_out_images(tmp_path: Path) -> None:
    """Fitted on the 150-image slice through ``AutoAnchor(annotations=...)``, scored on the 850 other images of
    the demo's COCO sample, which the fit never saw."""
    from lightning_autoanchor.demo.data import DEFAULT_ANNOTATIONS

    module, callback = Detector(), AutoAnchor(annotations=str(COCO150))
    defaults = find_torchvision_anchors(module).structure()
    trainer(tmp_path, callback).fit(module, Boxes())
    adapter = find_torchvision_anchors(module)
    seen = set(load_boxes(COCO150).image_names)
    sample = load_boxes(DEFAULT_ANNOTATIONS)
    unseen = np.array([name not in seen for name in sample.image_names])
    rows = unseen[sample.image_index]
    held_out = BoxSet(sample.image_sizes, sample.wh[rows], sample.image_index[rows], xy=sample.xy[rows])
    assert len(held_out) > 5000
    placed = place_boxes(held_out, adapter.detector_resize(), adapter.layout, 0.0)
    before = placed.score(defaults.cell_anchors(), 0.5)
    after = placed.score(adapter.structure().cell_anchors(), 0.5)
    assert after.recall > before.recall + 0.05, (before, after)


def test_ssd_default_boxes_are_fitted_in_their_own_parametrisation(tmp_path: Path) -> None:
    def ssdlite() -> torch.nn.Module:
        return detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)

    module, callback = Detector(ssdlite), AutoAnchor(seed=0)
    before = find_torchvision_anchors(module)
    count, scales = before.num_anchors_per_location(), before.structure().scales
    trainer(tmp_path, callback).fit(module, Boxes())
    update = callback.update
    assert isinstance(update, GridUpdate) and update.fitted
    after = find_torchvision_anchors(module)
    assert after.num_anchors_per_location() == count
    if update.replaced:
        assert update.after.recall > update.before.recall and after.structure().scales != scales
    module.model.eval()
    with torch.no_grad():
        module.model([torch.rand(3, 96, 128)])
