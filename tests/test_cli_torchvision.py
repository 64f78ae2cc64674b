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


def test_check_scores_the_anchors_a_yaml_file_gives(tmp_path: Path) -> None:
    out_file = tmp_path / "anchors.yaml"
    fitted = json.loads(cli("compute", COCO150, "--family", "torchvision-retinanet", *SMALL, "--out", out_file,
                            "--json").stdout)
    init_args = tmp_path / "init_args.yaml"  # the arguments alone, without class_path
    init_args.write_text(yaml.safe_dump(yaml.safe_load(out_file.read_text())["init_args"]))
    for given in (out_file, init_args):
        proc = cli("check", COCO150, "--family", "torchvision-retinanet", *SMALL, "--anchors", given, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["structure_before"] == fitted["structure_after"] != fitted["structure_before"]
        assert out["before"] == fitted["after"]


def test_check_takes_back_the_ssd_arguments_compute_wrote(tmp_path: Path) -> None:
    out_file = tmp_path / "ssd.yaml"  # scales and aspect_ratios, with the model's own steps
    fitted = json.loads(cli("compute", COCO150, "--family", "torchvision-ssd", "--out", out_file, "--json").stdout)
    assert "steps" in yaml.safe_load(out_file.read_text())["init_args"]
    proc = cli("check", COCO150, "--family", "torchvision-ssd", "--anchors", out_file, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["structure_before"] == fitted["structure_after"] and out["before"] == fitted["after"]


def test_anchors_the_model_cannot_take_are_one_line_naming_the_file(tmp_path: Path) -> None:
    ssd = tmp_path / "ssd.yaml"
    ssd.write_text(yaml.safe_dump({"class_path": "torchvision.models.detection.anchor_utils.DefaultBoxGenerator",
                                   "init_args": {"aspect_ratios": [[2]] * 5, "scales": [0.1] * 6}}))
    six = tmp_path / "six.yaml"  # 2 sizes x 3 ratios: 6 anchors per location, RetinaNet's head is built for 9
    six.write_text(yaml.safe_dump({"sizes": [[32, 40]] * 5, "aspect_ratios": [[0.5, 1.0, 2.0]] * 5}))
    strides = tmp_path / "strides.yaml"
    strides.write_text(yaml.safe_dump({"sizes": [[32, 40, 50]] * 5, "aspect_ratios": [[0.5, 1.0, 2.0]] * 5,
                                       "strides": [8, 16, 32, 64, 128]}))
    for given, message in (("10,13, 16,30", "--anchors for --family torchvision-retinanet is a YAML file"),
                           (ssd, f"{ssd}: holds the arguments of DefaultBoxGenerator, but the torchvision-retinanet "
                                 "model's anchors come from AnchorGenerator"),
                           (six, f"{six}: anchor_generator: the new anchors give (6, 6, 6, 6, 6) anchors per "
                                 "location"),
                           (strides, f"{strides}: 'strides' is not an argument --anchors sets (AnchorGenerator: "
                                     "sizes and aspect_ratios)")):
        proc = cli("check", COCO150, "--family", "torchvision-retinanet", *SMALL, "--anchors", given)
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert proc.stderr.startswith(f"lightning-autoanchor: error: {message}"), proc.stderr
        assert proc.stderr.count("\n") == 1
