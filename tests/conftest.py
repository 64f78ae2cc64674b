"""Shared test data and helpers: real box data shipped in ``tests/data`` (see its README for sources and
licenses), writers of the annotation formats (COCO JSON, YOLO labels and images, Pascal VOC XML), and
readers' checks of the data policy (``lightning_autoanchor.sources.PROBLEMS``).

Test modules import the helpers with ``from tests.conftest import ...``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import PROBLEMS, DataWarning

DATA = Path(__file__).parent / "data"
DEMO_COCO = Path(__file__).parents[1] / "lightning_autoanchor" / "demo" / "coco_val2017_sample.json.gz"
SLICES = {"voc2007": DATA / "voc2007_trainval_150.json.gz", "coco2017": DATA / "coco2017_val_150.json.gz"}
KNOWN_COUNTS = {"voc2007": (150, 444), "coco2017": (150, 1078)}

YOLOV5_DEFAULT_ANCHORS = np.array([10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326],
                                  dtype=np.float32).reshape(9, 2)


@pytest.fixture(scope="session")
def voc2007() -> BoxSet:
    """All 15,662 boxes of PASCAL VOC 2007 trainval (5,011 images) with their image sizes."""
    z = np.load(DATA / "voc2007_trainval_boxes.npz")
    return BoxSet(z["image_sizes"], z["box_wh"], z["image_index"], source="VOC2007 trainval")


@pytest.fixture(scope="module", params=sorted(SLICES))
def real(request: pytest.FixtureRequest) -> tuple[str, dict]:
    """Each shipped slice (VOC 2007, COCO 2017) as a COCO-style dict."""
    return request.param, load_slice(request.param)


# ----------------------------------------------------------------------------------------------------------
# Writing a COCO-style dict into each format
# ----------------------------------------------------------------------------------------------------------

def load_slice(name: str) -> dict:
    with gzip.open(SLICES[name], "rt", encoding="utf-8") as f:
        return json.load(f)


def by_image(d: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {im["id"]: [] for im in d["images"]}
    for a in d["annotations"]:
        if a["image_id"] in out:
            out[a["image_id"]].append(a)
    return out


def expected_by_name(d: dict) -> dict[str, tuple[float, float, np.ndarray]]:
    """``stem of file_name -> (width, height, (n, 2) box sizes in annotation order)``."""
    boxes = by_image(d)
    return {Path(im["file_name"]).stem: (im["width"], im["height"],
                                         np.array([a["bbox"][2:] for a in boxes[im["id"]]], float).reshape(-1, 2))
            for im in d["images"]}


def write_coco(d: dict, path: Path, indent: int | None = None) -> Path:
    raw = json.dumps(d, indent=indent).encode()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_image(path: Path, width: int, height: int, orientation: int | None = None) -> None:
    """A real, tiny-content image file (solid colour) of the given size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (int(width), int(height)), (90, 120, 150))
    if orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, exif=exif)


def yolo_line(cls: int, bbox: list[float], width: float, height: float) -> str:
    x, y, w, h = bbox
    return f"{cls} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}"


def write_yolo(d: dict, root: Path, split: str = "train") -> Path:
    """Ultralytics layout: ``images/<split>/*.jpg|png`` (real files), ``labels/<split>/*.txt``, ``data.yaml``."""
    classes = {c["id"]: i for i, c in enumerate(d["categories"])}
    boxes = by_image(d)
    for k, im in enumerate(d["images"]):
        stem = Path(im["file_name"]).stem
        write_image(root / "images" / split / f"{stem}{'.jpg' if k % 2 == 0 else '.png'}", im["width"], im["height"])
        lines = [yolo_line(classes[a["category_id"]], a["bbox"], im["width"], im["height"]) for a in boxes[im["id"]]]
        label = root / "labels" / split / f"{stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines))
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: {root}\ntrain: images/{split}\nval: images/{split}\n"
                         f"names: {[c['name'] for c in d['categories']]}\n")
    return yaml_path


def voc_xml(file_name: str, size: tuple[Any, Any] | None, objects: list[tuple[str, Any, Any, Any, Any]]) -> str:
    """A Pascal VOC annotation; ``objects`` are ``(name, xmin, ymin, xmax, ymax)``, 1-based inclusive."""
    parts = [f"<annotation><folder>VOC2007</folder><filename>{file_name}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, *corners in objects:
        tags = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), corners, strict=True))
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox>{tags}</bndbox></object>")
    return "\n".join([*parts, "</annotation>"]) + "\n"


def write_voc(d: dict, root: Path, split_every: int = 2) -> Path:
    """A VOC year folder: ``Annotations/*.xml`` (``xmin = x + 1``, ``xmax = x + w``) and ``ImageSets/Main``."""
    names = {c["id"]: c["name"] for c in d["categories"]}
    boxes = by_image(d)
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    stems = []
    for im in d["images"]:
        stem = Path(im["file_name"]).stem
        stems.append(stem)
        objects = [(names[a["category_id"]], repr(a["bbox"][0] + 1), repr(a["bbox"][1] + 1),
                    repr(a["bbox"][0] + a["bbox"][2]), repr(a["bbox"][1] + a["bbox"][3])) for a in boxes[im["id"]]]
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(im["file_name"], (im["width"], im["height"]),
                                                                   objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(s + "\n" for s in stems[::split_every]))
    return root


def assert_same_boxes(box_set: BoxSet, d: dict, rtol: float, atol: float = 0.0,
                      images: list[str] | None = None) -> None:
    """Image count, box count, names, sizes and every box's size (per image, in order) match ``d``."""
    expected = expected_by_name(d)
    if images is not None:
        expected = {k: expected[k] for k in images}
    names = [Path(n).stem for n in box_set.image_names]
    assert sorted(names) == sorted(expected)
    assert box_set.num_images == len(expected)
    assert len(box_set) == sum(len(e[2]) for e in expected.values())
    assert dict(box_set.skipped) == {}
    for i, name in enumerate(names):
        width, height, wh = expected[name]
        assert box_set.image_sizes[i].tolist() == [width, height], name
        np.testing.assert_allclose(box_set.wh[box_set.image_index == i], wh, rtol=rtol, atol=atol, err_msg=name)


def same_box_sets(a: BoxSet, b: BoxSet) -> None:
    np.testing.assert_array_equal(a.image_sizes, b.image_sizes)
    np.testing.assert_array_equal(a.wh, b.wh)
    np.testing.assert_array_equal(a.image_index, b.image_index)
    assert tuple(a.image_names) == tuple(b.image_names)
    assert dict(a.skipped) == dict(b.skipped)
    assert a.source == b.source


def coco_lines(images: list, annotations: list, order: tuple[str, ...] = ("images", "annotations")
               ) -> tuple[str, dict[tuple[str, int], int]]:
    """COCO JSON with one record per line (``json.dumps``: NaN stays ``NaN``), and the line of each record."""
    lines, where = ["{"], {}
    for n, key in enumerate(order):
        items = {"images": images, "annotations": annotations}[key]
        lines.append(f'"{key}": [')
        for k, item in enumerate(items):
            where[key, k] = len(lines) + 1
            lines.append(json.dumps(item) + ("," if k < len(items) - 1 else ""))
        lines.append("]" + ("," if n < len(order) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n", where


def small_yolo(root: Path, extra: bytes = b"", lines_a: bytes | None = None) -> Path:
    """Three images (100x50 jpg, 80x60 png, 64x64 jpg) with one box each; ``extra`` appended to a.txt."""
    for name, (w, h) in {"a.jpg": (100, 50), "b.png": (80, 60), "c.jpg": (64, 64)}.items():
        write_image(root / "images" / "train" / name, w, h)
        label = root / "labels" / "train" / f"{Path(name).stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_bytes(b"0 0.5 0.5 0.2 0.4\n")
    (root / "labels" / "train" / "a.txt").write_bytes((b"0 0.5 0.5 0.2 0.4\n" if lines_a is None else lines_a) + extra)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\n")
    return root / "data.yaml"


def small_voc(root: Path, a_xml: str | bytes | None = None) -> Path:
    """A VOC year folder with three images (a: 100x50, b: 80x60, c: 64x64), one 10x20 box each."""
    (root / "Annotations").mkdir(parents=True)
    for name, size in {"a": (100, 50), "b": (80, 60), "c": (64, 64)}.items():
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", size, [("dog", 1, 1, 10, 20)]))
    if a_xml is not None:
        content = a_xml.encode() if isinstance(a_xml, str) else a_xml
        (root / "Annotations" / "a.xml").write_bytes(content)
    return root


def make_special(path: Path, kind: str) -> None:
    """A FIFO, a Unix socket or a link to a character device at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(path.parent)  # a socket's path must be short
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(cwd)
    else:
        path.symlink_to(os.devnull)


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` if the block runs longer than ``seconds`` (a hang becomes a failure)."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------------
# Reading, with the warnings it gives
# ----------------------------------------------------------------------------------------------------------

def read_warned(read: Callable[..., BoxSet], *args: Any, **kwargs: Any) -> tuple[BoxSet, dict[str, str]]:
    """Read, and return the box set and the DataWarning message of each problem kind (no other warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        box_set = read(*args, **kwargs)
    messages: dict[str, str] = {}
    for w in caught:
        assert issubclass(w.category, DataWarning), f"unexpected {w.category.__name__}: {w.message}"
        kinds = [k for k, text in PROBLEMS.items() if text in str(w.message)]
        assert len(kinds) == 1, str(w.message)
        assert kinds[0] not in messages, "one warning per kind"
        messages[kinds[0]] = str(w.message)
    return box_set, messages


def check_policy(read: Callable[..., BoxSet], path: Path, expected: dict[str, int], where: list[str], n_boxes: int,
                 strict_names: str | None = None, **kwargs: Any) -> BoxSet:
    """``read(path)`` skips exactly ``expected``, warns naming ``where``, keeps ``n_boxes``; strict refuses."""
    box_set, messages = read_warned(read, path, **kwargs)
    assert dict(box_set.skipped) == expected
    assert set(messages) == set(expected) - {"crowd"}
    for kind, count in expected.items():
        if kind != "crowd":
            assert messages[kind].startswith(f"{path}: {count} {PROBLEMS[kind]}. First: "), messages[kind]
    shown = " | ".join(messages.values())
    for text in where:
        assert text in shown, f"{text!r} not in {shown!r}"
    assert len(box_set) == n_boxes
    assert np.isfinite(box_set.wh).all() and (box_set.wh > 0).all()
    if set(expected) - {"crowd"}:
        with pytest.raises(DataError, match=re.escape(strict_names or str(path))) as err:
            read(path, strict=True, **kwargs)
        assert "strict mode refuses" in str(err.value)
    return box_set


def read_clean(read: Callable[..., BoxSet], *args: Any, **kwargs: Any) -> BoxSet:
    """Read with no warning at all."""
    box_set, messages = read_warned(read, *args, **kwargs)
    assert messages == {}
    return box_set


_READ_ELSEWHERE = """
import json, sys, warnings
from lightning_autoanchor import sources
from lightning_autoanchor.errors import DataError
reader, path, kwargs = json.loads(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        box_set = getattr(sources, reader)(path, **kwargs)
    except DataError as err:
        print(json.dumps({"error": str(err)}))
        sys.exit()
print(json.dumps({"n_images": box_set.num_images, "n_boxes": len(box_set), "skipped": dict(box_set.skipped),
                  "names": list(box_set.image_names), "warnings": [str(w.message) for w in caught]}))
"""


def read_elsewhere(reader: str, path: Path, timeout: float = 60, **kwargs: Any) -> dict[str, Any]:
    """``reader(path, **kwargs)`` (a reader of ``lightning_autoanchor.sources``, by name) run in a fresh Python
    process, so that a read that hangs fails the test after ``timeout`` seconds instead of stalling it.

    Returns the image and box counts, the skips, the image names and the warnings' messages; or, for a
    ``DataError``, ``{"error": message}``. Anything else the reader raises fails the test.
    """
    proc = subprocess.run([sys.executable, "-c", _READ_ELSEWHERE, json.dumps([reader, str(path), kwargs])],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return json.loads(proc.stdout)
