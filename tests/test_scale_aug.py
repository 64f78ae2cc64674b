"""The scale augmentation kernel against brute-force resampling, and ``scale_aug`` in the fit and the CLI.

Brute force: every box of a real COCO slice scaled by ``R`` factors drawn uniformly from
``[1 - a, 1 + a]``, scored with the plain reference functions (``match_quality``, ``wh_iou``). The
stated tolerance is 5 standard errors of that Monte Carlo estimate (estimated from the draws
themselves) plus the quadrature's measured error (``lightning_autoanchor.augment``): 3e-4 for BPR,
1e-3 for anchors per target, 2e-4 for fitness, 1e-4 for average IoU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_autoanchor.augment import SCORE_MAX_MASS, SCORE_STEP, augment_log_bins, check_scale_aug, log_scale_kernel
from lightning_autoanchor.boxes import log_bins
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.evolution import LogSpaceFitness
from lightning_autoanchor.metrics import match_cut, match_quality, score_anchors, wh_iou
from lightning_autoanchor.optimizer import FINE_BIN, fit_anchors, prepare_boxes
from lightning_autoanchor.sources import load_boxes
from tests.conftest import DATA, YOLOV5_DEFAULT_ANCHORS

COCO = DATA / "coco2017_val_150.json.gz"
YOLOV5 = torch.from_numpy(YOLOV5_DEFAULT_ANCHORS)
DRAWS = 1000
QUADRATURE_TOL = torch.tensor([3e-4, 1e-3, 2e-4, 1e-4], dtype=torch.float64)  # bpr, aat, fitness, avg IoU


@pytest.fixture(scope="module")
def coco_wh() -> torch.Tensor:
    """1,078 COCO val2017 boxes letterboxed to 640 px."""
    return prepare_boxes(load_boxes(COCO).scaled(640))[0]


def brute_force(wh: torch.Tensor, anchors: torch.Tensor, metric: str, a: float, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo estimate of (bpr, aat, fitness, avg IoU) under the augmentation and its standard error."""
    factors = torch.empty(len(wh), DRAWS, dtype=torch.float64).uniform_(1 - a, 1 + a,
                                                                      generator=torch.Generator().manual_seed(seed))
    scaled = (wh.double()[:, None, :] * factors[:, :, None]).reshape(-1, 2).float()
    cut = match_cut(metric)
    quality = match_quality(scaled, anchors, metric)
    best = quality.amax(dim=1)
    matched = best > cut
    values = torch.stack([matched, (quality > cut).sum(dim=1), best * matched, wh_iou(scaled, anchors).amax(dim=1)],
                         dim=1).double().view(len(wh), DRAWS, 4)
    return values.mean(dim=(0, 1)), (values.var(dim=1).mean(dim=0) / DRAWS / len(wh)).sqrt()


def scores_tensor(scores: object) -> torch.Tensor:
    return torch.tensor([scores.bpr, scores.aat, scores.fitness, scores.avg_iou], dtype=torch.float64)


def assert_within(got: torch.Tensor, estimate: torch.Tensor, se: torch.Tensor) -> None:
    tol = 5 * se + QUADRATURE_TOL
    assert bool(((got - estimate).abs() <= tol).all()), f"got {got}, brute force {estimate} +- {tol}"


def test_kernel_is_the_distribution_of_the_log_factor() -> None:
    a, step = 0.5, 0.04
    shifts, weights = log_scale_kernel(a, step)
    low, high = math.log(1 - a), math.log(1 + a)
    assert len(shifts) == math.ceil((high - low) / step)
    assert bool((shifts.diff() > 0).all()) and low < float(shifts[0]) and float(shifts[-1]) < high
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    # exact for functions linear in s: the mean of log f, integral of s e^s / (2a)
    assert float(shifts @ weights) == pytest.approx(((high - 1) * (1 + a) - (low - 1) * (1 - a)) / (2 * a), abs=1e-12)
    # E[f] = 1, within the stated smooth-part error sup|g''| h^2 / 8 (g = e^s, g'' <= 1 + a)
    assert abs(float(shifts.exp() @ weights) - 1.0) <= (1 + a) * step**2 / 8
    narrow_shifts, narrow = log_scale_kernel(0.1, step, max_mass=0.01)
    assert float(narrow.max()) <= 0.01 and float(narrow_shifts.diff().max()) < step
    zero_shift, one = log_scale_kernel(0.0, step)
    assert zero_shift.tolist() == [0.0] and one.tolist() == [1.0]


@pytest.mark.parametrize("metric", ["ratio", "iou"])
def test_kernel_equals_brute_force_resampling(coco_wh: torch.Tensor, metric: str) -> None:
    """The fitness of every box copied at the kernel's nodes (what the fit's summary is made of)."""
    a = 0.5
    shifts, weights = log_scale_kernel(a, SCORE_STEP, SCORE_MAX_MASS)
    points = (coco_wh.log().double()[:, None, :] + shifts[None, :, None]).reshape(-1, 2).float()
    fitness = LogSpaceFitness(points, weights.repeat(len(coco_wh)).float(), metric=metric)
    estimate, se = brute_force(coco_wh, YOLOV5, metric, a)
    assert abs(float(fitness(YOLOV5.log())) - float(estimate[2])) <= 5 * float(se[2]) + float(QUADRATURE_TOL[2])


@pytest.mark.parametrize("a", [0.5, 0.9, 0.1])
@pytest.mark.parametrize("metric", ["ratio", "iou"])
def test_exact_scores_equal_brute_force_resampling(coco_wh: torch.Tensor, metric: str, a: float) -> None:
    anchors = YOLOV5 if a != 0.9 else fit_anchors(coco_wh, 6, generations=0, metric=metric).anchors
    estimate, se = brute_force(coco_wh, anchors, metric, a, seed=int(a * 10))
    assert_within(scores_tensor(score_anchors(coco_wh, anchors, metric=metric, scale_aug=a)), estimate, se)


def test_brute_force_tells_augmented_from_nominal(coco_wh: torch.Tensor) -> None:
    """The tolerance is tight enough to see the augmentation: the nominal scores are outside it."""
    estimate, se = brute_force(coco_wh, YOLOV5, "ratio", 0.5)
    with pytest.raises(AssertionError):
        assert_within(scores_tensor(score_anchors(coco_wh, YOLOV5)), estimate, se)


@pytest.mark.parametrize(("metric", "tol"), [("ratio", 1e-4), ("iou", 2e-3)])
def test_augmented_summary_keeps_the_kernel(coco_wh: torch.Tensor, metric: str, tol: float) -> None:
    """Summarising the copies again costs what any summary on that grid costs (for the IoU cut: up to 1e-3)."""
    points, weights = log_bins(coco_wh, FINE_BIN)
    augmented = augment_log_bins(points, weights, 0.5, FINE_BIN)
    assert float(augmented[1].sum()) == pytest.approx(float(weights.sum()), rel=1e-6)
    shift = float(log_scale_kernel(0.5, FINE_BIN)[0] @ log_scale_kernel(0.5, FINE_BIN)[1])
    mean = (augmented[0] * augmented[1][:, None]).sum(0) / augmented[1].sum()
    torch.testing.assert_close(mean, (points * weights[:, None]).sum(0) / weights.sum() + shift, atol=1e-4, rtol=0)
    exact = score_anchors(coco_wh, YOLOV5, metric=metric, scale_aug=0.5).fitness
    assert abs(float(LogSpaceFitness(*augmented, metric=metric)(YOLOV5.log())) - exact) <= tol


def test_fit_maximises_the_augmented_fitness(coco_wh: torch.Tensor) -> None:
    nominal = fit_anchors(coco_wh, 9, seed=0)
    augmented = fit_anchors(coco_wh, 9, seed=0, scale_aug=0.5)
    assert nominal.nominal is None and nominal.scale_aug == 0.0
    assert augmented.scale_aug == 0.5
    assert augmented.scores == score_anchors(coco_wh, augmented.anchors, scale_aug=0.5)
    assert augmented.nominal == score_anchors(coco_wh, augmented.anchors)
    on_augmented = score_anchors(coco_wh, nominal.anchors, scale_aug=0.5)
    assert augmented.scores.fitness > on_augmented.fitness  # each fit wins on its own objective
    assert nominal.scores.fitness > augmented.nominal.fitness
    assert fit_anchors(coco_wh, 9, seed=0, scale_aug=0.0).anchors.equal(nominal.anchors)
    out = augmented.as_dict()
    assert out["nominal"] == augmented.nominal.as_dict() and out["augmented"]["fitness"] == out["fitness"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_scale_aug_out_of_range_is_refused(coco_wh: torch.Tensor, bad: float) -> None:
    with pytest.raises(ConfigError, match=r"scale_aug must be a scale augmentation .* in \[0, 1\)"):
        check_scale_aug(bad)
    with pytest.raises(ConfigError, match="scale_aug"):
        fit_anchors(coco_wh, 9, scale_aug=bad)
    with pytest.raises(ConfigError, match="scale_aug"):
        score_anchors(coco_wh, YOLOV5, scale_aug=bad)


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_autoanchor.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


ANCHORS = " ".join(f"{w:g},{h:g}" for w, h in YOLOV5_DEFAULT_ANCHORS.tolist())


def test_cli_check_reports_nominal_and_augmented(coco_wh: torch.Tensor) -> None:
    out = json.loads(run_cli("check", COCO, "--anchors", ANCHORS, "--scale-aug", 0.5, "--metric", "iou",
                             "--json").stdout)
    assert out["scale_aug"] == 0.5
    assert out["nominal"] == pytest.approx(score_anchors(coco_wh, YOLOV5, metric="iou").as_dict(), abs=1e-9)
    assert out["augmented"] == pytest.approx(score_anchors(coco_wh, YOLOV5, metric="iou", scale_aug=0.5).as_dict(),
                                             abs=1e-9)
    assert out["fitness"] == out["augmented"]["fitness"]
    human = run_cli("check", COCO, "--anchors", ANCHORS, "--scale-aug", 0.5, "--metric", "iou").stdout
    assert human.splitlines()[3].split() == ["nominal", "scale", "0.5-1.5"]
    row = next(line for line in human.splitlines() if line.startswith("fitness"))
    assert row.split()[1:3] == [f"{out['nominal']['fitness']:.4f}", f"{out['augmented']['fitness']:.4f}"]


def test_cli_compute_reports_both_and_writes_them(tmp_path: Path) -> None:
    out_file = tmp_path / "anchors.yaml"
    proc = run_cli("compute", COCO, "--scale-aug", 0.5, "--generations", 100, "--out", out_file, "--json", "--quiet")
    out = json.loads(proc.stdout)
    assert out["scale_aug"] == 0.5 and set(out["nominal"]) == set(out["augmented"]) >= {"bpr", "fitness"}
    assert f"nominal: fitness {out['nominal']['fitness']:.4f}" in out_file.read_text()


def test_cli_refuses_a_bad_scale_aug_in_one_line() -> None:
    proc = run_cli("check", COCO, "--anchors", ANCHORS, "--scale-aug", 1.2)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "--scale-aug must be a scale augmentation (YOLOv5" in proc.stderr and "in [0, 1), got 1.2" in proc.stderr
