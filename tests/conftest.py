"""Shared fixtures: real box data shipped in ``tests/data`` (see its README for sources and licenses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_autoanchor.boxes import BoxSet

DATA = Path(__file__).parent / "data"
DEMO_COCO = Path(__file__).parents[1] / "lightning_autoanchor" / "demo" / "coco_val2017_sample.json.gz"

YOLOV5_DEFAULT_ANCHORS = np.array([10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326],
                                  dtype=np.float32).reshape(9, 2)


@pytest.fixture(scope="session")
def voc2007() -> BoxSet:
    """All 15,662 boxes of PASCAL VOC 2007 trainval (5,011 images) with their image sizes."""
    z = np.load(DATA / "voc2007_trainval_boxes.npz")
    return BoxSet(z["image_sizes"], z["box_wh"], z["image_index"], source="VOC2007 trainval")
