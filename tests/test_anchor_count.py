"""How many anchors: the knee rule on constructed curves, and the curve fitted on real boxes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_autoanchor.anchor_count import AnchorCountResult, fit_anchor_counts, recommend_count
from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.levels import anchor_levels
from lightning_autoanchor.optimizer import fit_anchors

from .conftest import DATA

COCO150 = DATA / "coco2017_val_150.json.gz"


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_autoanchor.cli", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def voc_curve(voc2007: BoxSet) -> AnchorCountResult:
    return fit_anchor_counts(voc2007.scaled(640), range(3, 13))


def test_knee_is_where_the_curve_bends_most() -> None:
    counts = list(range(1, 10))
    values = [0.0, 0.2, 0.4, 0.6, 0.8, 0.82, 0.84, 0.86, 0.88]  # steep up to 5, then nearly flat
    assert recommend_count(counts, values) == 5
    assert recommend_count(counts, [v * 3 + 1 for v in values]) == 5, "scale-free"
    assert recommend_count([3, 6, 9, 12, 15], [0.5, 0.64, 0.69, 0.72, 0.74]) == 6


def test_knee_ties_go_to_the_smaller_count() -> None:
    # 5 lies above the chord from 1 to 9 by 0.46, 4 by 0.45: within the tolerance (0.0083 on the 0-1 scale)
    counts = list(range(1, 10))
    values = [0.0, 0.3, 0.6, 0.9, 1.06, 1.08, 1.11, 1.14, 1.2]
    assert recommend_count(counts, values) == 4
    values[4] = 1.08  # now 0.03 / 1.2 = 0.025 higher: 5 wins
    assert recommend_count(counts, values) == 5


def test_curves_without_a_knee() -> None:
    assert recommend_count([3, 4, 5, 6], [0.7, 0.7, 0.70001, 0.7]) == 3, "flat: the smallest count"
    assert recommend_count([3, 4, 5, 6], [0.1, 0.2, 0.4, 0.8]) == 6, "gains grow: the largest count"
    assert recommend_count([3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4]) == 6, "a straight line: the largest count"
    assert recommend_count([3], [0.5]) == 3
    assert recommend_count([3, 6], [0.5, 0.6]) == 6


def test_knee_is_raised_to_the_first_count_reaching_the_bpr() -> None:
    counts = list(range(1, 10))
    values = [0.0, 0.2, 0.4, 0.6, 0.8, 0.82, 0.84, 0.86, 0.88]
    bpr = [0.5, 0.7, 0.9, 0.95, 0.96, 0.97, 0.981, 0.99, 0.995]
    assert recommend_count(counts, values, bpr) == 7
    assert recommend_count(counts, values, bpr, min_bpr=0.9) == 5
    assert recommend_count(counts, values, [0.5] * 9) == 5, "no count reaches it: the knee stands"


@pytest.mark.parametrize(("counts", "values"), [([3, 4], [0.5]), ([4, 3], [0.5, 0.6]), ([], [])])
def test_bad_curves_are_refused(counts: list[int], values: list[float]) -> None:
    with pytest.raises(ConfigError):
        recommend_count(counts, values)


def test_curve_on_voc2007_matches_full_fits(voc2007: BoxSet, voc_curve: AnchorCountResult) -> None:
    wh = voc2007.scaled(640)
    assert [r.n for r in voc_curve.rows] == list(range(3, 13))
    rows = voc_curve.rows
    assert voc_curve.recommended == recommend_count(voc_curve.counts, [r.objective_value for r in rows],
                                                    [r.scores.bpr for r in rows])
    assert 5 <= voc_curve.recommended <= 9
    for a, b in zip(voc_curve.rows, voc_curve.rows[1:], strict=False):
        assert b.objective_value > a.objective_value, "each anchor more fits better"
    for n in (3, 7, 12):
        row = voc_curve.row(n)
        assert row.anchors.shape == (n, 2) and row.objective_value == row.scores.fitness
        assert row.objective_value >= fit_anchors(wh, n).scores.fitness - 0.002


def test_advice_only_when_far_from_the_recommended_count(voc_curve: AnchorCountResult) -> None:
    best = voc_curve.recommended
    assert voc_curve.advice(best) is None and voc_curve.advice(best + 1) is None
    message = voc_curve.advice(best + 4)
    assert message is not None and f"{best + 4} anchors" in message and f"consider {best} anchors" in message
    assert "outside the counts tried" in (voc_curve.advice(30) or "")


def test_levels_limit_counts_to_multiples_and_keep_the_limits(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(320)
    curve = fit_anchor_counts(wh, levels=3, min_stride_ratio=3.0)
    assert [r.n for r in curve.rows] == [3, 6, 9, 12, 15] and curve.step == 3
    for row in curve.rows:
        size = row.anchors.prod(dim=1).sqrt()
        bound = torch.tensor([8.0, 16, 32])[anchor_levels((row.n // 3,) * 3)] * 3.0
        assert bool((size >= bound).all()), row.n


def test_avg_iou_objective_curve(voc2007: BoxSet) -> None:
    curve = fit_anchor_counts(voc2007.scaled(640), [4, 5, 6], objective="avg_iou")
    assert curve.objective == "avg_iou" and all(r.objective_value == r.scores.avg_iou for r in curve.rows)


def test_same_seed_same_curve(voc2007: BoxSet) -> None:
    wh = voc2007.scaled(320)
    a, b = fit_anchor_counts(wh, [4, 6], seed=3), fit_anchor_counts(wh, [4, 6], seed=3)
    assert all(torch.equal(x.anchors, y.anchors) for x, y in zip(a.rows, b.rows, strict=True))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"counts": [3, 0]}, "counts must be positive integers"),
    ({"counts": [4, 5], "levels": 3}, "no count in 4-5 is a multiple of levels=3"),
    ({"levels": (3, 3, 4)}, "levels must be a positive number of levels"),
    ({"min_stride_ratio": 1.0}, "needs levels"),
    ({"objective": "iou"}, "objective must be one of"),
    ({"bpr_threshold": 2.0}, "bpr_threshold must be a number in"),
])
def test_bad_settings_are_refused_by_name(voc2007: BoxSet, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fit_anchor_counts(voc2007.scaled(640), **kwargs)


def test_cli_auto_prints_the_table_marks_the_knee_and_plots(tmp_path: Path) -> None:
    png = tmp_path / "counts.png"
    proc = cli("compute", COCO150, "--n", "auto", "--plot", png)
    assert proc.returncode == 0, proc.stderr
    table = [line.split() for line in proc.stdout.splitlines() if line[3:5].strip().isdigit()]
    assert [int(row[-5]) for row in table] == list(range(3, 16))
    marked = [int(row[1]) for row in table if row[0] == "*"]
    assert len(marked) == 1 and f"recommended: {marked[0]} anchors" in proc.stdout
    assert png.read_bytes().startswith(b"\x89PNG")

    proc = cli("compute", COCO150, "--n", "3-12", "--levels", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    curve = out["curve"]
    assert [c["n"] for c in curve["counts"]] == [3, 6, 9, 12] and curve["levels"] == 3
    assert out["recommended"] == curve["recommended"] == len(out["anchors"])
    assert out["recommended"] == recommend_count([c["n"] for c in curve["counts"]],
                                                 [c["fitness"] for c in curve["counts"]],
                                                 [c["bpr"] for c in curve["counts"]])
    assert out["levels"] == [out["recommended"] // 3] * 3
    assert all({"bpr", "fitness", "avg_iou", "aat", "anchors"} <= set(c) for c in curve["counts"])


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "auto", "--levels", "3,3,4"], "not the anchors of each level"),
    (["--n", "3-15", "--min-stride-ratio", "1"], "needs --levels"),
    (["--n", "4-5", "--levels", "3"], "holds no multiple of --levels 3"),
])
def test_cli_bad_ranges_are_one_error_line(args: list[str], message: str) -> None:
    proc = cli("compute", COCO150, *args)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
