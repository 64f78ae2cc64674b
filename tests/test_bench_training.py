"""The training benchmark's pieces on tiny budgets: the small-objects slice, one tiny training of each
arm, the scores, the summary. The full benchmark is run by hand (``benchmarks/bench_training.py``)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_autoanchor.demo.model import DEFAULT_ANCHORS
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_training"] = bench  # its dataclasses look their module up
_spec.loader.exec_module(bench)

COCO = DATA / "coco2017_val_150.json.gz"
TINY = {"epochs": 1, "width": 4, "batch_size": 4, "limit_batches": 2}


def needs_map_backend() -> None:
    """mAP needs the bench extra: torchvision (NMS, and torchmetrics' detection metrics) and pycocotools."""
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bench.small_objects_slice(COCO, tmp_path_factory.mktemp("small") / "small.json.gz", images=40)


@pytest.fixture(scope="module")
def trained(small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One tiny training of each arm on the small-objects slice, seed 0."""
    return {arm: bench.train_arm(small, arm, 0, save_dir=tmp_path_factory.mktemp(arm), **TINY) for arm in bench.ARMS}


def test_small_objects_slice_keeps_the_first_images_with_small_boxes(small: Path) -> None:
    with gzip.open(COCO, "rt") as f:
        source = json.load(f)
    with gzip.open(small, "rt") as f:
        sliced = json.load(f)
    scale = {im["id"]: 640 / max(im["width"], im["height"]) for im in source["images"]}
    longer = {a["id"]: max(a["bbox"][2:]) * scale[a["image_id"]] for a in source["annotations"]}
    with_small = sorted({a["image_id"] for a in source["annotations"] if longer[a["id"]] < 64})
    assert [im["id"] for im in sliced["images"]] == with_small[:40]
    expected = [a["id"] for a in source["annotations"] if longer[a["id"]] < 64 and a["image_id"] in with_small[:40]]
    assert [a["id"] for a in sliced["annotations"]] == expected and expected
    assert sliced["categories"] == source["categories"]
    dm = bench.data_module(small)
    dm.setup("fit")
    assert len(dm.train_rows) == 32 and len(dm.val_rows) == 8  # 80/20


def test_each_arm_trains_on_a_tiny_budget(trained: dict[str, object]) -> None:
    default, fitted = trained["default"], trained["fitted"]
    pixels = [(t.model.head.anchors * t.model.head.stride.view(-1, 1, 1)) for t in (default, fitted)]
    assert default.update is None
    torch.testing.assert_close(pixels[0], torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32).view(3, 3, 2))
    assert fitted.update.replaced and fitted.update.before.bpr < 0.98 <= fitted.update.after.bpr
    torch.testing.assert_close(pixels[1], fitted.update.anchors_after)
    loader = fitted.data.val_dataloader()
    assert 0 <= bench.match_rate(default.model, loader) < bench.match_rate(fitted.model, loader) <= 1
    assert fitted.seconds > 0


def test_an_arm_is_reproducible_and_leaves_the_global_random_state(small: Path, tmp_path: Path,
                                                                    trained: dict[str, object]) -> None:
    state = torch.get_rng_state()
    again = bench.train_arm(small, "default", 0, save_dir=tmp_path, **TINY)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), b in zip(again.model.state_dict().items(), trained["default"].model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    other = bench.train_arm(small, "default", 1, save_dir=tmp_path, **TINY)
    assert not torch.equal(other.model.head.m[0].weight, again.model.head.m[0].weight)
    with pytest.raises(ValueError, match="arm must be one of"):
        bench.train_arm(small, "random", 0, save_dir=tmp_path, **TINY)


def test_mean_ap_of_the_ground_truth_is_one_and_of_a_model_in_range(trained: dict[str, object]) -> None:
    needs_map_backend()
    from torchmetrics.detection import MeanAveragePrecision

    fitted = trained["fitted"]
    images, targets = next(iter(fitted.data.val_dataloader()))
    truth = bench.ground_truth(targets, len(images), classes=False)
    assert sum(len(t["boxes"]) for t in truth) == len(targets)
    assert all(bool((t["boxes"][:, 2:] > t["boxes"][:, :2]).all()) and not t["labels"].any() for t in truth)
    metric = MeanAveragePrecision(box_format="xyxy", backend="pycocotools")
    metric.update([{**t, "scores": torch.ones(len(t["boxes"]))} for t in truth], truth)
    assert float(metric.compute()["map_50"]) == pytest.approx(1.0)
    predicted = bench.predictions(fitted.model.eval(), images)
    assert len(predicted) == len(images) and all(len(p["boxes"]) <= 100 for p in predicted)
    scores = bench.mean_ap(fitted.model, fitted.data.val_dataloader())
    assert 0.0 <= scores["map"] <= scores["map_50"] <= 1.0


def test_summary_gives_mean_and_spread_over_seeds() -> None:
    def run(arm: str, seed: int, value: float) -> object:
        return bench.RunResult(data="coco", arm=arm, seed=seed, match_rate=value, map_50=value / 2, map=value / 4,
                               replaced=arm == "fitted", bpr_before=math.nan, bpr_after=math.nan, anchors=[],
                               train_seconds=10.0)

    rows = bench.summarise([run("default", 0, 0.5), run("default", 1, 0.7), run("fitted", 0, 0.9)])
    assert [(r["arm"], r["seeds"]) for r in rows] == [("default", [0, 1]), ("fitted", [0])]
    assert rows[0]["match_rate"] == pytest.approx(0.6) and rows[0]["match_rate_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[0]["map"] == pytest.approx(0.15) and rows[1]["map_50_std"] == 0.0
    table = bench.markdown_table(rows).splitlines()
    assert table[2] == "| coco | default | 2 | 0.600 ± 0.141 | 0.300 ± 0.071 | 0.150 ± 0.035 | 10 |"


def test_the_script_runs_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    """The real command, two runs side by side in worker processes."""
    needs_map_backend()
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_training.py"), "--coco", str(COCO),
                           "--data", "coco-small", "--seeds", "0", "--epochs", "1", "--limit-batches", "2",
                           "--width", "4", "--jobs", "2", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())["summary"]
    assert [row["arm"] for row in summary] == ["default", "fitted"]
    assert "| coco-small | fitted | 1 |" in proc.stdout
