"""Every export format parsed back the way its framework reads it gives the anchors back."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_autoanchor import reporting
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.formats import (
    FORMATS,
    anchors_yaml,
    darknet_cfg,
    export_anchors,
    mmdet_prior_generator,
    torchvision_anchor_generator,
    torchvision_grid,
    yolo_yaml,
)

DEMO = Path(__file__).parents[1] / "lightning_autoanchor" / "demo" / "coco_val2017_sample.json.gz"
YOLOV5 = torch.tensor([10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326.0]).view(3, 3, 2)
UNEVEN = [torch.tensor([[2.5, 3.5], [6.0, 4.5]]), torch.tensor([[12.0, 20], [31, 17], [25, 44]]),
          torch.tensor([[70.0, 55], [90, 160], [200, 130], [410, 380]])]  # 2, 3, 4 anchors (one decimal under 10 px)


def as_lists(levels: list[torch.Tensor] | torch.Tensor) -> list[list[list[float]]]:
    return [level.tolist() for level in levels]


def keywords(text: str, call: str) -> dict[str, object]:
    """The keyword arguments of the one ``call(...)`` expression in ``text``, each read by ``ast.literal_eval``."""
    calls = [node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == call]
    assert len(calls) == 1, text
    return {kw.arg: ast.literal_eval(kw.value) for kw in calls[0].keywords}


def darknet_sections(text: str) -> list[tuple[str, dict[str, str]]]:
    """Sections of a darknet cfg as darknet's ``read_cfg`` reads them: all whitespace removed, ``#``/``;`` comments."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            sections.append((line, {}))
        else:
            key, value = line.split("=", 1)
            sections[-1][1][key] = value
    return sections


def darknet_levels(text: str) -> list[list[list[float]]]:
    """Per ``[yolo]`` section, in file order, the anchors its ``mask`` picks from ``anchors``."""
    levels = []
    for name, options in darknet_sections(text):
        assert name == "[yolo]"
        values = [float(v) for v in options["anchors"].split(",")]
        pairs = [values[i:i + 2] for i in range(0, len(values), 2)]
        assert int(options["num"]) == len(pairs)
        levels.append([pairs[int(i)] for i in options["mask"].split(",")])
    return levels


@pytest.mark.parametrize("anchors", [YOLOV5, UNEVEN], ids=["yolov5", "uneven"])
def test_yolo_yaml_loads_back(anchors: list[torch.Tensor]) -> None:
    strides = [8, 16, 32]
    text = yolo_yaml(anchors, strides, comments=["fitted to test data"])
    assert text.startswith("# fitted to test data\n")
    rows = yaml.safe_load(text)["anchors"]
    assert [[row[i:i + 2] for i in range(0, len(row), 2)] for row in rows] == as_lists(anchors)


def test_yolo_yaml_rounds_as_yolo_configs_do() -> None:
    anchors = torch.tensor([[[3.14159, 7.77], [12.4, 99.6]]])
    rows = yaml.safe_load(yolo_yaml(anchors, [8]))["anchors"]
    assert rows == [[3.1, 7.8, 12, 100]]


def test_anchors_yaml_still_comes_from_reporting() -> None:
    assert reporting.anchors_yaml is anchors_yaml
    assert anchors_yaml(YOLOV5.reshape(-1, 2), 3) == yolo_yaml(YOLOV5, [8, 16, 32])


@pytest.mark.parametrize("anchors", [YOLOV5, UNEVEN], ids=["yolov5", "uneven"])
def test_mmdet_prior_generator_evaluates_back(anchors: list[torch.Tensor]) -> None:
    text = mmdet_prior_generator(anchors, [8, 16, 32], comments=["fitted"])
    compile(text, "<config>", "exec")  # the whole text is valid Python, as MMEngine configs must be
    args = keywords(text, "dict")
    assert args["type"] == "mmdet.YOLOAnchorGenerator"
    assert args["strides"] == [8, 16, 32]
    assert [[list(wh) for wh in level] for level in args["base_sizes"]] == as_lists(anchors)


@pytest.mark.parametrize("coarse_first", [True, False])
@pytest.mark.parametrize("anchors", [YOLOV5, UNEVEN], ids=["yolov5", "uneven"])
def test_darknet_cfg_reads_back(anchors: list[torch.Tensor], coarse_first: bool) -> None:
    text = darknet_cfg(anchors, [8, 16, 32], comments=["fitted"], coarse_first=coarse_first)
    expected = as_lists(anchors)
    assert darknet_levels(text) == (expected[::-1] if coarse_first else expected)
    all_pairs = darknet_sections(text)[0][1]["anchors"]
    assert all(options["anchors"] == all_pairs for _, options in darknet_sections(text))


def test_darknet_lists_anchors_from_the_finest_level_whatever_the_given_order() -> None:
    text = darknet_cfg(list(reversed(UNEVEN)), [32, 16, 8])  # a head listing its coarsest level first
    first = darknet_sections(text)[0][1]
    assert first["mask"] == "5,6,7,8"  # the coarsest level's four anchors come last in anchors=
    assert darknet_levels(text) == as_lists(reversed(UNEVEN))


def grid_anchors(sizes: list[list[float]], ratios: list[list[float]]) -> list[torch.Tensor]:
    """Per level, the anchors torchvision's ``AnchorGenerator`` makes (before its rounding): ratio-major."""
    return [torch.tensor([[s / math.sqrt(r), s * math.sqrt(r)] for r in level_ratios for s in level_sizes])
            for level_sizes, level_ratios in zip(sizes, ratios, strict=True)]


SIZES = [[32.0, 40.32, 50.8], [64.0, 80.63, 101.6]]
RATIOS = [[0.5, 1.0, 2.0], [0.45, 1.2]]


def test_torchvision_arguments_evaluate_back_to_the_grid() -> None:
    anchors = grid_anchors(SIZES, RATIOS)
    shuffled = [level[torch.randperm(len(level), generator=torch.Generator().manual_seed(0))] for level in anchors]
    text = export_anchors("torchvision", shuffled, [8, 16], comments=["fitted"])
    args = keywords(text, "AnchorGenerator")
    assert args["sizes"] == tuple(map(tuple, SIZES)) and args["aspect_ratios"] == tuple(map(tuple, RATIOS))
    rebuilt = grid_anchors(args["sizes"], args["aspect_ratios"])
    for got, want in zip(rebuilt, anchors, strict=True):
        torch.testing.assert_close(got, want)


def test_torchvision_arguments_build_the_real_generator() -> None:
    anchor_utils = pytest.importorskip("torchvision.models.detection.anchor_utils")
    args = keywords(torchvision_anchor_generator(SIZES, RATIOS), "AnchorGenerator")
    generator = anchor_utils.AnchorGenerator(**args)
    for cell, want in zip(generator.cell_anchors, grid_anchors(SIZES, RATIOS), strict=True):
        torch.testing.assert_close(cell[:, 2:] - cell[:, :2], want, atol=1.0, rtol=0)  # torchvision rounds corners


def test_torchvision_refuses_free_anchors_clearly() -> None:
    with pytest.raises(ConfigError, match="does not apply to these anchors: level 0 holds 3 free"):
        export_anchors("torchvision", YOLOV5, [8, 16, 32])
    with pytest.raises(ConfigError, match="does not apply"):  # 4 = 2 sizes x 2 ratios, but one corner is missing
        torchvision_grid([torch.tensor([[10.0, 10], [20, 20], [10, 20], [10, 20.0]])])
    sizes, ratios = torchvision_grid(list(YOLOV5[:, :1]))  # one anchor per level is always a grid
    assert ratios[0] == [pytest.approx(1.3)] and sizes[0] == [pytest.approx(math.sqrt(130))]


@pytest.mark.parametrize("fmt", FORMATS[:3])
def test_bad_input_is_refused(fmt: str) -> None:
    with pytest.raises(ConfigError, match="levels of anchors need as many strides"):
        export_anchors(fmt, YOLOV5, [8, 16])
    with pytest.raises(ConfigError, match="positive and finite"):
        export_anchors(fmt, YOLOV5 * torch.tensor([1.0, -1.0]), [8, 16, 32])
    with pytest.raises(ConfigError, match="format must be one of"):
        export_anchors("yolov8", YOLOV5, [8, 16, 32])


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_autoanchor.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("fmt", ["mmdet", "darknet"])
def test_cli_writes_and_prints_the_format(fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"anchors.{fmt}"
    proc = run_cli("compute", DEMO, "--img-size", 160, "--generations", 100, "--format", fmt, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.rstrip() in proc.stdout and f"wrote anchors ({fmt}): {out}" in proc.stdout
    data = json.loads(run_cli("compute", DEMO, "--img-size", 160, "--generations", 100, "--json", "--quiet",
                              "--format", fmt).stdout)
    fitted = torch.tensor(data["anchors"]).view(3, 3, 2)
    parsed = (darknet_levels(text)[::-1] if fmt == "darknet"
              else [[list(wh) for wh in level] for level in keywords(text, "dict")["base_sizes"]])
    torch.testing.assert_close(torch.tensor(parsed), fitted, atol=0.5, rtol=0)  # yolo_number's rounding
    assert data["format"] == fmt


def test_cli_torchvision_format_of_free_anchors_is_one_line() -> None:
    proc = run_cli("compute", DEMO, "--img-size", 160, "--generations", 0, "--format", "torchvision", "--quiet")
    assert proc.returncode == 1
    assert proc.stderr.startswith("lightning-autoanchor: error: --format torchvision does not apply")
    assert proc.stderr.count("\n") == 1
