"""Real setups' shapes: a non-square training size, uneven anchor counts per level, average IoU as the objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_autoanchor.boxes import BoxSet, training_size
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.metrics import score_anchors
from lightning_autoanchor.optimizer import fit_anchors, prepare_boxes
from lightning_autoanchor.reporting import anchors_yaml
from lightning_autoanchor.sources import load_boxes

from .conftest import DATA

COCO150 = DATA / "coco2017_val_150.json.gz"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli_json(*args: object) -> dict:
    proc = subprocess.run([sys.executable, "-m", "lightning_autoanchor.cli", *map(str, args), "--quiet", "--json"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def two_images() -> BoxSet:
    """A landscape and a portrait image, one 100 x 50 box each."""
    return BoxSet(np.array([[1000, 500], [500, 1000]]), np.array([[100, 50], [100, 50]]), np.array([0, 1]))


def test_non_square_letterbox_fits_each_image_in_width_by_height(two_images: BoxSet) -> None:
    # landscape: min(1280 / 1000, 640 / 500) = 1.28; portrait: min(1280 / 500, 640 / 1000) = 0.64
    wh = two_images.scaled((1280, 640))
    assert torch.allclose(wh, torch.tensor([[128.0, 64], [64, 32]]))
    assert torch.equal(two_images.scaled((640, 640)), two_images.scaled(640)), "a square pair is the number"
    stretched = two_images.scaled((1280, 640), resize="stretch")
    assert torch.allclose(stretched, torch.tensor([[128.0, 64], [256, 32]]))


def test_non_square_size_on_real_boxes_keeps_aspect_ratios_and_stays_inside() -> None:
    boxes = load_boxes(COCO150)
    wh = boxes.scaled((1280, 736)).numpy()
    scale = boxes.image_scales((1280, 736))
    assert np.allclose(scale[:, 0], scale[:, 1])
    fitted = boxes.image_sizes * scale
    assert (fitted <= [1280 + 1e-6, 736 + 1e-6]).all() and np.isclose(fitted, [1280, 736]).any(axis=1).all()
    assert np.allclose(wh, boxes.wh * scale[boxes.image_index], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -640, float("nan"), (640, 0), (1, 2, 3), "big", (640, float("inf"))])
def test_bad_training_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="img_size must be a positive number of pixels or a"):
        training_size(bad)  # type: ignore[arg-type]


def test_uneven_levels_in_the_fit_and_the_yaml(voc2007: BoxSet) -> None:
    result = fit_anchors(voc2007.scaled(640), levels=(3, 3, 4), generations=100)
    assert result.anchors.shape == (10, 2) and result.levels == (3, 3, 4) and result.strides == (8, 16, 32)
    text = anchors_yaml(result.anchors, result.levels)
    rows = yaml.safe_load(text)["anchors"]
    assert [len(r) for r in rows] == [6, 6, 8]
    assert "# P5/32" in text.splitlines()[-1]
    with pytest.raises(ConfigError, match="hold 10 anchors"):
        anchors_yaml(result.anchors[:9], (3, 3, 4))


def test_avg_iou_objective_maximises_the_average_iou(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(640)
    by_fitness = fit_anchors(wh, 9, generations=200)
    by_iou = fit_anchors(wh, 9, generations=200, objective="avg_iou")
    assert by_iou.objective == "avg_iou" and by_iou.metric == "ratio" and by_iou.thr == 4.0
    assert by_iou.scores.avg_iou > by_fitness.scores.avg_iou
    assert by_fitness.scores.fitness > by_iou.scores.fitness
    assert by_iou.scores == score_anchors(prepare_boxes(wh)[0], by_iou.anchors), "scored under the ratio rule"
    same = fit_anchors(wh, 9, generations=200, metric="iou", thr=0.0)
    assert torch.equal(same.anchors, by_iou.anchors), "the named objective is the old metric='iou', thr=0"
    with pytest.raises(ConfigError, match="objective must be one of 'fitness', 'avg_iou'"):
        fit_anchors(wh, 9, objective="iou")  # type: ignore[arg-type]


def test_cli_non_square_size_and_uneven_levels(tmp_path: Path) -> None:
    out = tmp_path / "anchors.yaml"
    got = cli_json("compute", COCO150, "--img-size", 1280, 736, "--levels", "3,3,4", "--generations", 100,
                   "--out", out)
    boxes = prepare_boxes(load_boxes(COCO150).scaled((1280, 736)))[0]
    assert got["img_size"] == [1280, 736] and got["levels"] == [3, 3, 4] and got["n_boxes"] == len(boxes)
    assert got["fitness"] == pytest.approx(score_anchors(boxes, torch.tensor(got["anchors"])).fitness, abs=1e-9)
    assert [len(r) for r in yaml.safe_load(out.read_text())["anchors"]] == [6, 6, 8]
    assert "img_size 1280x736 (letterbox)" in out.read_text()
    assert len(got["level_shares"]) == 3 and sum(got["level_shares"]) == pytest.approx(1.0)
