"""``lightning-autoanchor check|compute --family torchvision-*``: the stock model's own resize, grid and threshold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from torchvision.models.detection.anchor_utils import AnchorGenerator

from .conftest import DATA

COCO150 = DATA / "coco2017_val_150.json.gz"
SMALL = ["--min-size", "160", "--max-size", "256"]


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_autoanchor.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_check_scores_the_model_s_own_anchors_by_placed_recall() -> None:
    proc = cli("check", COCO150, "--family", "torchvision-retinanet", *SMALL, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["family"] == "torchvision-retinanet" and out["thr"] == 0.5 and not out["fitted"]
    assert out["structure_before"]["sizes"][0] == [32, 40, 50]
    assert 0 < out["before"]["recall"] < 1 and out["fits"] == (out["before"]["recall"] >= 0.98)
    human = cli("check", COCO150, "--family", "torchvision-retinanet", *SMALL, "--thr", "0.6")
    assert "is >= 0.6 (the matcher's foreground threshold)" in human.stdout


def test_compute_fits_and_writes_constructor_arguments(tmp_path: Path) -> None:
    out_file = tmp_path / "anchors.yaml"
    proc = cli("compute", COCO150, "--family", "torchvision-fasterrcnn", *SMALL, "--out", out_file, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["thr"] == 0.7 and out["fitted"]
    assert out["after"]["recall"] >= out["before"]["recall"]
    saved = yaml.safe_load(out_file.read_text())
    assert saved["class_path"].endswith("AnchorGenerator")
    generator = AnchorGenerator(**saved["init_args"])  # pastes into the constructor
    assert generator.num_anchors_per_location() == [3] * 5


def test_a_bad_override_is_one_line_naming_the_option() -> None:
    proc = cli("check", COCO150, "--family", "torchvision-ssd", "--thr", "1.5")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("lightning-autoanchor: error: --thr must be an IoU in (0, 1]")
