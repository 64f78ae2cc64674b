"""The ``lightning-autoanchor`` command, run for real in subprocesses on the demo COCO val2017 slice.

Every run goes through ``python -m lightning_autoanchor.cli`` (one test also runs the installed
console script), and its output is checked against the library called in this process.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

import lightning_autoanchor
from lightning_autoanchor.metrics import score_anchors
from lightning_autoanchor.optimizer import prepare_boxes
from lightning_autoanchor.sources import load_boxes

DEMO = Path(lightning_autoanchor.__file__).parent / "demo" / "coco_val2017_sample.json.gz"
PROG = "lightning-autoanchor"
ANCHORS = "10,13, 16,30, 33,23, 30,61, 62,45, 59,119, 116,90, 156,198, 373,326"  # YOLOv5's P3-P5
COMPUTE = ["--n", "9", "--generations", "200", "--seed", "0"]
SCORE_KEYS = ("bpr", "aat", "fitness", "avg_iou")


# One thread per run: these short runs start side by side with other tests, and PyTorch's thread
# pool slows down badly on cores other processes are using.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command line tool to completion (``python -m lightning_autoanchor.cli`` by default)."""
    command = command or [sys.executable, "-m", "lightning_autoanchor.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=120, env=ENV)


def json_out(proc: subprocess.CompletedProcess[str]) -> dict:
    """The one JSON object a successful ``--json`` run prints, alone on one line of stdout."""
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.endswith("\n"), proc.stdout
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    return out


def boxes_at(img_size: float) -> torch.Tensor:
    """The demo boxes as the CLI fits and scores them: letterboxed to ``img_size``, tiny ones left out."""
    return prepare_boxes(load_boxes(DEMO).scaled(img_size))[0]


def anchor_tensor(text: str, scale: float = 1.0) -> torch.Tensor:
    return torch.tensor([float(v) * scale for v in text.replace(",", " ").split()]).reshape(-1, 2)


def assert_scores(out: dict, wh: torch.Tensor, anchors: torch.Tensor, thr: float, metric: str) -> None:
    expected = score_anchors(wh, anchors, thr, metric)
    assert out["n_boxes"] == expected.n_boxes == len(wh)
    for key in SCORE_KEYS:
        assert out[key] == pytest.approx(getattr(expected, key), abs=1e-9), key


@pytest.fixture(scope="module")
def checked() -> dict:
    """One ``check --json`` run of YOLOv5's default anchors at 640 px."""
    return json_out(cli("check", DEMO, "--anchors", ANCHORS, "--json"))


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """One ``compute --json`` run that also writes the anchors YAML and the plot."""
    folder = tmp_path_factory.mktemp("compute")
    yaml_path, png_path = folder / "anchors.yaml", folder / "anchors.png"
    plot = ["--plot", png_path] if importlib.util.find_spec("matplotlib") else []  # plots need the [plot] extra
    out = json_out(cli("compute", DEMO, "--json", *COMPUTE, "--out", yaml_path, *plot))
    return out, yaml_path, png_path


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{PROG} {lightning_autoanchor.__version__}"


def test_check_json_matches_the_library(checked: dict) -> None:
    out = checked
    assert {"anchors", "bpr", "fitness", "aat", "avg_iou", "n_boxes"} <= out.keys()
    anchors = anchor_tensor(ANCHORS)
    assert out["anchors"] == anchors.tolist()
    assert out["n_boxes_read"] == 7179 and out["n_images"] == 1000
    assert_scores(out, boxes_at(640), anchors, 4.0, "ratio")


def test_console_script_gives_the_same_result(checked: dict) -> None:
    script = Path(sys.executable).with_name(PROG)
    found = str(script) if script.exists() else shutil.which(PROG)
    if found is None:
        pytest.skip(f"the {PROG} console script is not installed beside {sys.executable}")
    assert json_out(cli("check", DEMO, "--anchors", ANCHORS, "--json", command=[found])) == checked


def test_compute_json(computed: tuple[dict, Path, Path]) -> None:
    out = computed[0]
    anchors = torch.tensor(out["anchors"])
    assert anchors.shape == (9, 2) and bool((anchors > 0).all())
    areas = anchors.prod(dim=1)
    assert bool((areas[1:] >= areas[:-1]).all()), "anchors are not sorted by area"
    assert out["seed"] == 0 and out["generations"] == 200 and out["metric"] == "ratio" and out["thr"] == 4.0
    assert_scores(out, boxes_at(640), anchors, 4.0, "ratio")
    assert out["fitness"] > 0.68  # YOLOv5's default anchors score 0.62 here; a fit must do better


def test_compute_is_reproducible(computed: tuple[dict, Path, Path]) -> None:
    again = json_out(cli("compute", DEMO, "--json", *COMPUTE))
    assert again["anchors"] == computed[0]["anchors"]
    assert again["fitness"] == computed[0]["fitness"]


def test_compute_writes_yolo_yaml(computed: tuple[dict, Path, Path]) -> None:
    out, yaml_path, _ = computed
    assert out["out"] == str(yaml_path)
    rows = yaml.safe_load(yaml_path.read_text())["anchors"]
    assert len(rows) == 3 and all(len(row) == 6 for row in rows)
    flat = itertools.chain.from_iterable
    for written, exact in zip(flat(rows), flat(out["anchors"]), strict=True):
        if exact >= 10:  # whole pixels
            assert written == int(written) and abs(written - exact) <= 0.5, (written, exact)
        else:  # one decimal under 10 px
            assert round(written, 1) == written and abs(written - exact) <= 0.05 + 1e-9, (written, exact)


def test_compute_writes_png(computed: tuple[dict, Path, Path]) -> None:
    pytest.importorskip("matplotlib")
    out, _, png_path = computed
    assert out["plot"] == str(png_path)
    data = png_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_compute_iou_metric() -> None:
    out = json_out(cli("compute", DEMO, "--json", *COMPUTE, "--metric", "iou", "--thr", "0.5"))
    assert out["metric"] == "iou" and out["thr"] == 0.5
    anchors = torch.tensor(out["anchors"])
    assert anchors.shape == (9, 2)
    assert_scores(out, boxes_at(640), anchors, 0.5, "iou")
    # under the IoU rule a box matches far fewer anchors than under the 4x size ratio
    assert out["aat"] < 2.0 and out["bpr"] > 0.5


def test_img_size_halves_the_boxes(checked: dict) -> None:
    full = checked
    half_anchors = " ".join(str(float(v) / 2) for v in ANCHORS.replace(",", " ").split())
    half = json_out(cli("check", DEMO, "--anchors", half_anchors, "--img-size", "320", "--json"))
    assert half["img_size"] == 320 and half["n_boxes_read"] == full["n_boxes_read"]
    # boxes under 2 px on both sides are left out: at 320 px that is every box under 4 px at 640 px
    wh640 = boxes_at(640)
    dropped = int((wh640 < 4).all(dim=1).sum())
    assert dropped > 0 and half["n_dropped"] == dropped and half["n_boxes"] == full["n_boxes"] - dropped
    assert_scores(half, boxes_at(320), anchor_tensor(ANCHORS, 0.5), 4.0, "ratio")
    # the ratio rule is scale-free: halved boxes and anchors match exactly as before, but for the boxes left out
    matched = (full["bpr"] * full["n_boxes"], half["bpr"] * half["n_boxes"])
    assert 0 <= matched[0] - matched[1] <= dropped + 1e-6
    pairs = (full["aat"] * full["n_boxes"], half["aat"] * half["n_boxes"])
    assert 0 <= pairs[0] - pairs[1] <= 9 * dropped + 1e-6


def line_with(text: str, start: str) -> str:
    """The first line of ``text`` that starts with ``start``."""
    found = [line for line in text.splitlines() if line.startswith(start)]
    assert found, f"no line starts with {start!r} in:\n{text}"
    return found[0]


def test_check_human_output() -> None:
    proc = cli("check", DEMO, "--anchors", ANCHORS)
    assert proc.returncode == 0, proc.stderr
    expected = score_anchors(boxes_at(640), anchor_tensor(ANCHORS))
    assert f"{expected.bpr:.4f}" in line_with(proc.stdout, "best possible recall")
    assert f"{expected.fitness:.4f}" in line_with(proc.stdout, "fitness")
    assert "7,179 boxes" in proc.stdout
    assert "{" not in proc.stdout  # no JSON without --json
    first_small = load_boxes(DEMO).small_boxes(640).images[0]
    assert first_small not in proc.stdout  # images with small boxes are named only on request
    listed = cli("check", DEMO, "--anchors", ANCHORS, "--list-small")
    assert listed.returncode == 0, listed.stderr
    assert first_small in listed.stdout


def test_compute_human_output(tmp_path: Path) -> None:
    proc = cli("compute", DEMO, *COMPUTE, "--out", tmp_path / "a.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "best possible recall" in proc.stdout and "fitness" in proc.stdout
    assert "anchors:\n  - [" in proc.stdout and "# P5/32" in proc.stdout
    assert f"wrote anchors YAML: {tmp_path / 'a.yaml'}" in proc.stdout


def test_list_small(checked: dict) -> None:
    out = json_out(cli("check", DEMO, "--anchors", ANCHORS, "--json", "--list-small"))
    small = load_boxes(DEMO).small_boxes(640)
    assert small.count == 29 and len(small.images) == 22
    assert out["n_small"] == small.count
    assert out["small_box_images"] == list(small.images)
    assert "small_box_images" not in checked


MISSING, NOT_JSON = "<missing file>", "<not JSON>"
BAD_INPUTS = {  # run id: (arguments, text the error line must contain)
    "missing-file": (["check", MISSING, "--anchors", ANCHORS], "missing.json"),
    "not-json": (["check", NOT_JSON, "--anchors", ANCHORS], "annotations.json"),
    "odd-anchors": (["check", DEMO, "--anchors", "1,2,3"], "even"),
    "text-anchors": (["check", DEMO, "--anchors", "a,b"], "numbers"),
    "n-0": (["compute", DEMO, "--n", "0"], "at least 1, got 0"),
    "levels-0": (["compute", DEMO, "--levels", "0"], "at least 1, got 9 and 0"),
    "levels-negative": (["compute", DEMO, "--levels", "-3"], "at least 1, got 9 and -3"),
    "unwritable-out": (["compute", DEMO, "--generations", "10", "--out", "/proc/no/anchors.yaml"],
                       "cannot write /proc/no/anchors.yaml"),
    "unwritable-plot": (["compute", DEMO, "--generations", "10", "--plot", "/proc/no/anchors.png"],
                        "cannot write /proc/no/anchors.png"),
    "n-10-levels-3": (["compute", DEMO, "--n", "10", "--levels", "3"], "--n 10"),
    "ratio-thr-0.5": (["check", DEMO, "--anchors", ANCHORS, "--thr", "0.5"], "thr"),
    "iou-thr-1.5": (["check", DEMO, "--anchors", ANCHORS, "--metric", "iou", "--thr", "1.5"], "thr"),
}
BAD_ARGUMENTS = {  # run id: arguments the parser itself refuses
    "metric-foo": ["compute", DEMO, "--metric", "foo"],
    "n-not-int": ["compute", DEMO, "--n", "many"],
    "no-such-command": ["frobnicate", DEMO],
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every bad-input run, started side by side (each is a short process that mostly imports)."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "annotations.json").write_text("this is not JSON\n")
    paths = {MISSING: folder / "missing.json", NOT_JSON: folder / "annotations.json"}
    runs = {key: [paths.get(a, a) for a in args] + ["--json"] for key, (args, _) in BAD_INPUTS.items()}
    runs.update(BAD_ARGUMENTS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(runs, pool.map(lambda args: cli(*args), runs.values()), strict=True))
    return done


@pytest.mark.parametrize("key", BAD_INPUTS)
def test_bad_input_is_one_error_line(bad_runs: dict, key: str) -> None:
    proc = bad_runs[key]
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{PROG}: error: ") and BAD_INPUTS[key][1] in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("key", BAD_ARGUMENTS)
def test_bad_arguments_are_usage_errors(bad_runs: dict, key: str) -> None:
    proc = bad_runs[key]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback (most recent call last)" not in proc.stderr
    assert "error:" in proc.stderr and "usage:" in proc.stderr
    assert proc.stdout == ""


def test_check_needs_anchors_for_yolo_heads() -> None:
    """``--anchors`` is optional for the torchvision families (they check the model's own), not for YOLO heads."""
    proc = cli("check", DEMO)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"{PROG}: error: check needs --anchors (w,h pairs in pixels at --img-size) for "
                           "--family yolo\n")


def test_readers_never_import_torch() -> None:
    """The readers (and the worker processes they fork) never load torch, which they do not need."""
    code = ("import sys\nfrom lightning_autoanchor.sources import load_boxes\n"
            f"boxes = load_boxes({str(DEMO)!r})\nboxes.small_boxes(640)\n"
            "print(len(boxes), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["7179", "False"]


def test_large_yolo_folder_read_by_worker_processes(tmp_path: Path) -> None:
    """2,000 label files, read by worker processes: the same scores as the library's read."""
    from PIL import Image

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    jpeg = io.BytesIO()
    Image.new("L", (640, 480), 114).save(jpeg, "JPEG")
    for i in range(2_000):
        (images / f"{i:04d}.jpg").write_bytes(jpeg.getvalue())
        w, h = 0.02 + (i % 40) / 50, 0.03 + (i % 23) / 30
        (labels / f"{i:04d}.txt").write_text(f"0 0.5 0.5 {w:.4f} {h:.4f}\n")
    out = json_out(cli("check", tmp_path, "--anchors", ANCHORS, "--json", "--quiet"))
    assert out["n_images"] == 2_000 and out["n_boxes_read"] == 2_000 and out["skipped"] == {}
    wh = prepare_boxes(load_boxes(tmp_path).scaled(640))[0]
    assert_scores(out, wh, anchor_tensor(ANCHORS), 4.0, "ratio")


def test_check_verdict(checked: dict) -> None:
    """``check`` says whether the anchors fit against ``--bpr-threshold`` (default 0.98, as YOLOv5)."""
    assert checked["fits"] is True and checked["bpr_threshold"] == 0.98 and checked["bpr"] >= 0.98
    strict = json_out(cli("check", DEMO, "--anchors", ANCHORS, "--json", "--bpr-threshold", "0.999"))
    assert strict["fits"] is False and strict["bpr_threshold"] == 0.999 and strict["bpr"] == checked["bpr"]
    human = cli("check", DEMO, "--anchors", ANCHORS, "--bpr-threshold", "0.999")
    assert human.returncode == 0, human.stderr
    assert line_with(human.stdout, "a re-fit is advised") == (
        f"a re-fit is advised: best possible recall {checked['bpr']:.4f} < 0.999 ({PROG} compute fits new anchors)")
    fits = cli("check", DEMO, "--anchors", ANCHORS)
    verdict = f"the anchors fit: best possible recall {checked['bpr']:.4f} >= 0.98"
    assert line_with(fits.stdout, "the anchors fit") == verdict
    bad = cli("check", DEMO, "--anchors", ANCHORS, "--bpr-threshold", "1.5")
    assert (bad.returncode, bad.stderr) == (1, f"{PROG}: error: --bpr-threshold must be a number in [0, 1], got 1.5\n")


@pytest.mark.parametrize(("n", "levels"), [(5, 1), (6, 3), (4, 1)])
def test_compute_infers_the_levels(n: int, levels: int, tmp_path: Path) -> None:
    """Without ``--levels``: 3 levels when ``--n`` divides by 3, else 1, said in the output and given in the JSON."""
    args = ["compute", DEMO, "--n", str(n), "--generations", "20", "--out", tmp_path / "a.yaml"]
    out = json_out(cli(*args, "--json"))
    assert out["levels"] == [n // levels] * levels and len(out["anchors"]) == n
    rows = yaml.safe_load((tmp_path / "a.yaml").read_text())["anchors"]
    assert len(rows) == levels and all(len(row) == 2 * n // levels for row in rows)
    human = cli(*args)
    assert human.returncode == 0 and human.stderr == "", human.stderr
    plural = "s" if levels > 1 else ""
    assert (f"note: {n} anchors on {levels} level{plural} (--levels not given: 3 levels when the count divides by 3, "
            "else 1)") in human.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "nonsense"])
def test_unusable_device_is_one_error_line(device: str) -> None:
    """``--device cuda`` on a CPU-only torch (or no such device) is one error line, before any data is read."""
    proc = cli("check", DEMO.parent / "missing.json", "--anchors", ANCHORS, "--device", device)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"{PROG}: error: --device {device!r} cannot be used: ")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["DATA.JSON.GZ", "data.json", "data.Json.Gz"])
def test_gzip_is_told_by_its_bytes(name: str, checked: dict, tmp_path: Path) -> None:
    """A gzip COCO file is read as gzip whatever its name's case, also when named ``.json``."""
    path = tmp_path / name
    path.write_bytes(DEMO.read_bytes())
    out = json_out(cli("check", path, "--anchors", ANCHORS, "--json"))
    assert {k: out[k] for k in SCORE_KEYS} == {k: checked[k] for k in SCORE_KEYS}
