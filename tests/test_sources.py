"""Annotation readers: real slices written to every format and read back, and bad input of every kind.

The data policy under test is ``lightning_autoanchor.sources.PROBLEMS``: each kind there is skipped,
counted in ``BoxSet.skipped`` and reported in one ``DataWarning`` naming the file and the line or
object; ``strict=True`` refuses it with a ``DataError`` naming the file. A file that is not JSON, is
truncated, is not UTF-8 or repeats an image id (COCO), a dataset YAML that cannot be used, and missing
paths are always refused with a ``DataError``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from PIL import Image

import lightning_autoanchor.demo
from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import PROBLEMS, DataWarning, load_boxes, read_coco, read_voc, read_yolo
from lightning_autoanchor.sources._json_stream import Elements, stream_arrays
from lightning_autoanchor.sources._log import ReadLog
from lightning_autoanchor.sources.coco import _DECODERS, _Collector

DATA = Path(__file__).parent / "data"
SLICES = {"voc2007": DATA / "voc2007_trainval_150.json.gz", "coco2017": DATA / "coco2017_val_150.json.gz"}
KNOWN_COUNTS = {"voc2007": (150, 444), "coco2017": (150, 1078)}
DEMO = Path(lightning_autoanchor.demo.__file__).parent / "coco_val2017_sample.json.gz"


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


# ----------------------------------------------------------------------------------------------------------
# A. Real data in every format
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(SLICES))
def real(request: pytest.FixtureRequest) -> tuple[str, dict]:
    return request.param, load_slice(request.param)


@pytest.fixture(scope="module")
def yolo_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each slice written once as an Ultralytics dataset (images are real files)."""
    return {name: write_yolo(load_slice(name), tmp_path_factory.mktemp(f"yolo-{name}")) for name in SLICES}


def test_slices_have_known_counts() -> None:
    """The shipped slices hold the documented numbers of images and boxes, all boxes positive."""
    for name, (n_images, n_boxes) in KNOWN_COUNTS.items():
        d = load_slice(name)
        assert (len(d["images"]), len(d["annotations"])) == (n_images, n_boxes)
        assert len({im["id"] for im in d["images"]}) == n_images
        assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in d["annotations"])
        assert SLICES[name].stat().st_size < 100_000


@pytest.mark.parametrize("variant", ["plain.json", "packed.json.gz", "pretty.json"])
def test_coco_round_trip(real: tuple[str, dict], variant: str, tmp_path: Path) -> None:
    """COCO JSON (compact, gzip, indented) reads back with every image, size, name and box."""
    name, d = real
    path = write_coco(d, tmp_path / variant, indent=2 if variant.startswith("pretty") else None)
    for read in (read_coco, load_boxes):
        box_set = read_clean(read, path)
        assert (box_set.num_images, len(box_set)) == KNOWN_COUNTS[name]
        assert_same_boxes(box_set, d, rtol=1e-6)
        assert [Path(n).name for n in box_set.image_names] == [im["file_name"] for im in d["images"]]
        assert box_set.source == str(path)


def test_shipped_slices_and_demo_sample_read_directly() -> None:
    """The gzip files as shipped (and the demo's 1,000-image COCO slice) read with their known counts."""
    for name, path in SLICES.items():
        assert_same_boxes(read_clean(load_boxes, path), load_slice(name), rtol=1e-6)
    with gzip.open(DEMO, "rt") as f:
        demo = json.load(f)
    box_set = read_clean(load_boxes, DEMO)
    assert (box_set.num_images, len(box_set)) == (1000, 7179)
    assert_same_boxes(box_set, demo, rtol=1e-6)


def test_yolo_round_trip(real: tuple[str, dict], yolo_dirs: dict[str, Path]) -> None:
    """Ultralytics YAML and labels folder: counts, image sizes from the image files, boxes within 1e-3."""
    name, d = real
    yaml_path = yolo_dirs[name]
    labels = yaml_path.parent / "labels" / "train"
    for box_set in (read_clean(read_yolo, yaml_path, cache=False), read_clean(load_boxes, yaml_path),
                    read_clean(read_yolo, labels, cache=False), read_clean(load_boxes, labels)):
        assert (box_set.num_images, len(box_set)) == KNOWN_COUNTS[name]
        assert_same_boxes(box_set, d, rtol=1e-3, atol=1e-3)
        assert all(Path(n).parent == yaml_path.parent / "images" / "train" for n in box_set.image_names)


def test_yolo_dataset_folder_reads_its_labels_folder(tmp_path: Path) -> None:
    """A dataset folder (data.yaml, images/, labels/, a train.txt list) reads labels/ and images/ only."""
    yaml_path = small_yolo(tmp_path)
    (tmp_path / "train.txt").write_text("./images/train/a.jpg\n")
    reference = read_clean(read_yolo, yaml_path, cache=False)
    for box_set in (read_clean(load_boxes, tmp_path), read_clean(read_yolo, tmp_path, cache=False)):
        np.testing.assert_array_equal(box_set.wh, reference.wh)
        np.testing.assert_array_equal(box_set.image_sizes, reference.image_sizes)
        assert box_set.image_names == reference.image_names and box_set.source == str(tmp_path)


def test_yolo_split_as_image_list(tmp_path: Path) -> None:
    """A split given as a .txt list of image paths (Ultralytics ``./images/...`` lines) reads those images."""
    d = load_slice("voc2007")
    root = tmp_path / "ds"
    write_yolo(d, root)
    images = sorted((root / "images" / "train").iterdir())[:40]
    (root / "train.txt").write_text("".join(f"./images/train/{p.name}\n" for p in images))
    (root / "list.yaml").write_text(f"path: {root}\ntrain: train.txt\n")
    box_set = read_clean(read_yolo, root / "list.yaml", cache=False)
    assert_same_boxes(box_set, d, rtol=1e-3, atol=1e-3, images=[p.stem for p in images])


def test_voc_round_trip(real: tuple[str, dict], tmp_path: Path) -> None:
    """VOC year folder, a bare folder of XML files, and a split list, read back exactly."""
    name, d = real
    root = write_voc(d, tmp_path / "VOC2007")
    for box_set in (read_clean(read_voc, root), read_clean(load_boxes, root)):
        assert (box_set.num_images, len(box_set)) == KNOWN_COUNTS[name]
        assert_same_boxes(box_set, d, rtol=1e-5)
        assert sorted(box_set.image_names) == sorted(im["file_name"] for im in d["images"])
    bare = shutil.copytree(root / "Annotations", tmp_path / "xml")
    assert_same_boxes(read_clean(load_boxes, bare), d, rtol=1e-5)
    listed = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert len(listed) == 75
    for box_set in (read_clean(read_voc, root, split="train"), read_clean(load_boxes, root, split="train")):
        assert_same_boxes(box_set, d, rtol=1e-5, images=listed)


@pytest.mark.parametrize(("orientation", "swapped"), [(1, False), (3, False), (5, True), (6, True), (7, True),
                                                      (8, True)])
def test_exif_orientation(orientation: int, swapped: bool, tmp_path: Path) -> None:
    """A JPEG with EXIF rotation by 90/270 degrees has its displayed (swapped) size, as Ultralytics reads it."""
    write_image(tmp_path / "images" / "train" / "a.jpg", 100, 50, orientation=orientation)
    with Image.open(tmp_path / "images" / "train" / "a.jpg") as im:
        assert im.size == (100, 50) and im.getexif()[0x0112] == orientation
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    box_set = read_clean(read_yolo, tmp_path / "labels" / "train", cache=False)
    size = [50.0, 100.0] if swapped else [100.0, 50.0]
    assert box_set.image_sizes.tolist() == [size]
    np.testing.assert_allclose(box_set.wh, [[0.2 * size[0], 0.4 * size[1]]])
    # VOC without <size> falls back to the image file, with the same rotation
    voc = tmp_path / "VOC"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    shutil.copy(tmp_path / "images" / "train" / "a.jpg", voc / "JPEGImages" / "a.jpg")
    (voc / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", None, [("dog", 1, 1, 10, 20)]))
    assert read_clean(read_voc, voc).image_sizes.tolist() == [size]


def test_yolo_cache(tmp_path: Path) -> None:
    """The cache is written, gives the identical box set (warnings too), and a touched label file is re-read."""
    d = load_slice("voc2007")
    d = {**d, "images": d["images"][:20]}
    yaml_path = write_yolo(d, tmp_path)
    label = tmp_path / "labels" / "train" / f"{Path(d['images'][0]['file_name']).stem}.txt"
    label.write_text(label.read_text() + "0 0.5 0.5 1.5 0.5\n")  # one bad line: its warning must be cached too
    cache = tmp_path / ".data.yaml.train.autoanchor-cache.npz"
    assert not cache.exists()
    first, first_messages = read_warned(read_yolo, yaml_path)
    assert cache.is_file()
    assert first.skipped == {"bad_line": 1} and f"{label}, line" in first_messages["bad_line"]
    # Replace an image by garbage of the same size and modification time: only a cache hit keeps its size.
    image = next((tmp_path / "images" / "train").glob("*.png"))
    st = image.stat()
    image.write_bytes(b"\0" * st.st_size)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    second, second_messages = read_warned(read_yolo, yaml_path)
    same_box_sets(first, second)
    assert second_messages == first_messages
    assert read_warned(read_yolo, yaml_path, cache=False)[0].skipped == {"bad_line": 1, "unreadable_image": 1}
    # New label content with a new modification time invalidates the cache.
    label.write_text("0 0.5 0.5 0.1 0.1\n")
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third, _ = read_warned(read_yolo, yaml_path)
    assert third.skipped == {"unreadable_image": 1}
    row = [Path(n).stem for n in third.image_names].index(label.stem)
    w, h = third.image_sizes[row]
    np.testing.assert_allclose(third.wh[third.image_index == row], [[0.1 * w, 0.1 * h]], rtol=1e-6)
    # cache=False neither reads nor writes it
    cache.unlink()
    read_warned(read_yolo, yaml_path, cache=False)
    assert not cache.exists()


def test_parallel_reads_match_serial(tmp_path: Path) -> None:
    """``workers=2`` (forked worker processes) gives the same box set and problems as ``workers=1``."""
    d = load_slice("coco2017")
    d = {**d, "images": d["images"][:60]}
    yaml_path = write_yolo(d, tmp_path / "yolo")
    labels = tmp_path / "yolo" / "labels" / "train"
    first = sorted(labels.iterdir())
    first[5].write_text(first[5].read_text() + "0 0.5\n0 nan 0.5 0.1 0.1\n")
    first[50].write_text("0 0.5 0.5 0.1 0.1 7\n")
    voc = write_voc(d, tmp_path / "VOC2007")
    xmls = sorted((voc / "Annotations").iterdir())
    xmls[40].write_text("<annotation><size>")
    for read, path in ((read_yolo, yaml_path), (read_voc, voc)):
        kwargs = {"cache": False} if read is read_yolo else {}
        serial, serial_messages = read_warned(read, path, workers=1, **kwargs)
        parallel, parallel_messages = read_warned(read, path, workers=2, **kwargs)
        same_box_sets(serial, parallel)
        assert serial_messages == parallel_messages
        assert serial.num_images == 60
        assert serial.skipped == ({"bad_line": 3} if read is read_yolo else {"unreadable_file": 1})


def test_file_stats_in_workers_match_serial(tmp_path: Path) -> None:
    """The cache key's look at every file: the same times and sizes from worker processes, -1 for a missing file."""
    from lightning_autoanchor.sources.yolo import _file_stats

    paths = []
    for i in range(25):  # 25 files of distinct sizes, listed 1,000 times: 3 tasks of 10,000 paths
        path = tmp_path / f"{i}.txt"
        path.write_text("x" * i)
        paths.append(str(path))
    paths = paths * 1_000 + [str(tmp_path / "missing.txt")]
    serial, parallel = _file_stats(paths, workers=1), _file_stats(paths, workers=2)
    assert serial.shape == (25_001, 2) and serial.dtype == np.int64
    np.testing.assert_array_equal(serial, parallel)
    assert serial[:25, 1].tolist() == list(range(25)) and serial[-1].tolist() == [-1, -1]
    assert serial[:25, 0].tolist() == [os.stat(p).st_mtime_ns for p in paths[:25]]


@pytest.mark.parametrize("how", ["stdin", "script without a main guard"])
def test_parallel_reads_never_rerun_the_callers_script(how: str, tmp_path: Path) -> None:
    """Worker processes are forked: a script fed on stdin, or one without ``if __name__ == "__main__"``,
    is not run again in them (spawned workers would re-import it)."""
    d = {**load_slice("voc2007"), "images": load_slice("voc2007")["images"][:30]}
    yaml_path = write_yolo(d, tmp_path / "yolo")
    marker = tmp_path / "runs.txt"
    code = (f"from pathlib import Path\nfrom lightning_autoanchor.sources import read_yolo\n"
            f"with Path({str(marker)!r}).open('a') as f:\n    f.write('run\\n')\n"
            f"print(len(read_yolo({str(yaml_path)!r}, workers=2, cache=False)))\n")
    if how == "stdin":
        done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120)
    else:
        script = tmp_path / "script.py"
        script.write_text(code)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == sum(len(b) for b in by_image(d).values())
    assert marker.read_text() == "run\n"


# ----------------------------------------------------------------------------------------------------------
# B. Bad input: COCO
# ----------------------------------------------------------------------------------------------------------

IMAGES = [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"},
          {"id": 2, "width": 320, "height": 240, "file_name": "b.jpg"}]
GOOD = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 50, 60]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [100, 100, 8, 9]}]


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


def bad_annotation(bbox: Any = None, **fields: Any) -> dict:
    record = {"id": 99, "image_id": 1, "category_id": 1, "bbox": bbox}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not ...}


COCO_BAD_ANNOTATIONS = {
    "nan_width": (bad_annotation([10, 10, float("nan"), 10]), "bad_box"),
    "inf_height": (bad_annotation([10, 10, 10, float("inf")]), "bad_box"),
    "minus_inf_x": (bad_annotation([float("-inf"), 10, 10, 10]), "bad_box"),
    "nan_x": (bad_annotation([float("nan"), 10, 10, 10]), "bad_box"),
    "negative_width": (bad_annotation([10, 10, -5, 10]), "bad_box"),
    "zero_height": (bad_annotation([10, 10, 5, 0]), "bad_box"),
    "beyond_float32": (bad_annotation([10, 10, 1e39, 10]), "bad_box"),
    "bbox_3_numbers": (bad_annotation([10, 10, 5]), "bad_record"),
    "bbox_5_numbers": (bad_annotation([10, 10, 5, 5, 5]), "bad_record"),
    "bbox_string": (bad_annotation("10,10,5,5"), "bad_record"),
    "bbox_null_value": (bad_annotation([10, 10, None, 5]), "bad_record"),
    "bbox_bool_value": (bad_annotation([10, 10, True, 5]), "bad_record"),
    "bbox_missing": (bad_annotation(...), "bad_record"),
    "image_id_missing": (bad_annotation([10, 10, 5, 5], image_id=...), "bad_record"),
    "image_id_float": (bad_annotation([10, 10, 5, 5], image_id=1.5), "bad_record"),
    "not_an_object": (5, "bad_record"),
    "a_list": ([1, 10, 10, 5, 5], "bad_record"),
}


@pytest.mark.parametrize("case", sorted(COCO_BAD_ANNOTATIONS))
@pytest.mark.parametrize("position", [0, 1, 3])
def test_coco_bad_annotation(case: str, position: int, tmp_path: Path) -> None:
    """A bad annotation is skipped and counted as its kind, named by file, line and index; the rest is read."""
    record, kind = COCO_BAD_ANNOTATIONS[case]
    annotations = [*GOOD[:position], record, *GOOD[position:]]
    text, where = coco_lines(IMAGES, annotations)
    path = tmp_path / "bad.json"
    path.write_text(text)
    check_policy(read_coco, path, {kind: 1}, [f"{path}, line {where['annotations', position]}: "
                                              f"annotations[{position}]"], n_boxes=3)


@pytest.mark.parametrize("n_bad", [2, 5])
def test_coco_many_bad_boxes_are_all_counted(n_bad: int, tmp_path: Path) -> None:
    """Every bad record is counted; the warning shows the first three."""
    bad = [bad_annotation([1, 1, -1, 1]) for _ in range(n_bad)] + [bad_annotation("x") for _ in range(n_bad)]
    text, where = coco_lines(IMAGES, GOOD + bad)
    path = tmp_path / "many.json"
    path.write_text(text)
    box_set = check_policy(read_coco, path, {"bad_box": n_bad, "bad_record": n_bad},
                           [f"line {where['annotations', 3]}:", f"line {where['annotations', 4]}:"], n_boxes=3)
    assert len(box_set) == 3


COCO_BAD_IMAGES = {
    "no_width": ({"id": 2, "height": 240, "file_name": "b.jpg"}, {"missing_size": 1}, "image b.jpg has width"),
    "zero_width": ({"id": 2, "width": 0, "height": 240, "file_name": "b.jpg"}, {"missing_size": 1}, "b.jpg"),
    "negative_height": ({"id": 2, "width": 320, "height": -240, "file_name": "b.jpg"}, {"missing_size": 1}, "b.jpg"),
    "nan_width": ({"id": 2, "width": float("nan"), "height": 240, "file_name": "b.jpg"}, {"missing_size": 1},
                  "b.jpg"),
    "inf_height": ({"id": 2, "width": 320, "height": float("inf"), "file_name": "b.jpg"}, {"missing_size": 1},
                   "b.jpg"),
    "null_width": ({"id": 2, "width": None, "height": 240, "file_name": "b.jpg"}, {"missing_size": 1}, "b.jpg"),
    "string_width": ({"id": 2, "width": "320", "height": 240, "file_name": "b.jpg"}, {"missing_size": 1}, "b.jpg"),
    "no_id": ({"width": 320, "height": 240, "file_name": "b.jpg"}, {"bad_record": 1, "unknown_image": 1},
              "images[1]"),
    "float_id": ({"id": 2.0, "width": 320, "height": 240}, {"bad_record": 1, "unknown_image": 1}, "images[1]"),
    "not_an_object": ("b.jpg", {"bad_record": 1, "unknown_image": 1}, "images[1]"),
}


@pytest.mark.parametrize("case", sorted(COCO_BAD_IMAGES))
def test_coco_bad_image(case: str, tmp_path: Path) -> None:
    """An image without a usable size keeps no boxes (missing_size); one without an id is a bad record."""
    image, expected, named = COCO_BAD_IMAGES[case]
    text, where = coco_lines([IMAGES[0], image], GOOD)
    path = tmp_path / "bad.json"
    path.write_text(text)
    names = [named] + ([f"line {where['images', 1]}: images[1]"] if "bad_record" in expected else [])
    box_set = check_policy(read_coco, path, expected, names, n_boxes=2)
    assert box_set.num_images == (2 if "missing_size" in expected else 1)
    np.testing.assert_array_equal(box_set.wh, [[30, 40], [8, 9]])


def test_coco_unknown_image_id(tmp_path: Path) -> None:
    """Boxes of an image id not in 'images' are skipped, naming the annotation and the id."""
    text, _ = coco_lines(IMAGES, [*GOOD, bad_annotation([1, 1, 5, 5], image_id=7), bad_annotation([1, 1, 5, 5],
                                                                                                  image_id="1")])
    path = tmp_path / "unknown.json"
    path.write_text(text)
    check_policy(read_coco, path, {"unknown_image": 2}, ["annotations[3]: image_id 7 has no entry",
                                                         "annotations[4]: image_id '1' has no entry"], n_boxes=3)


@pytest.mark.parametrize(("bbox", "kind", "wh"), [
    ([630, 10, 20, 10], "clipped_box", [10, 10]),
    ([-5, 10, 20, 10], "clipped_box", [15, 10]),
    ([10, 470, 10, 30], "clipped_box", [10, 10]),
    ([-10, -10, 700, 500], "clipped_box", [640, 480]),
    ([700, 10, 10, 10], "outside_box", None),
    ([10, -50, 10, 10], "outside_box", None),
    ([640, 10, 10, 10], "outside_box", None),
])
def test_coco_boxes_at_the_border(bbox: list, kind: str, wh: list | None, tmp_path: Path) -> None:
    """Boxes more than 1 px outside are clipped (counted); boxes entirely outside are skipped (counted)."""
    text, _ = coco_lines(IMAGES, [*GOOD, bad_annotation(bbox)])
    path = tmp_path / "border.json"
    path.write_text(text)
    box_set = check_policy(read_coco, path, {kind: 1}, [f"box {[float(v) for v in bbox]}", "image a.jpg"],
                           n_boxes=4 if wh else 3)
    if wh:
        np.testing.assert_allclose(box_set.wh[-1], wh)


def test_coco_boxes_within_one_pixel_keep_their_size(tmp_path: Path) -> None:
    """Rounding slack of up to 1 px past the border is neither clipped nor reported."""
    text, _ = coco_lines(IMAGES, [bad_annotation([-0.9, -1, 640.5, 481]), bad_annotation([600, 0, 41, 10])])
    path = tmp_path / "slack.json"
    path.write_text(text)
    box_set = read_clean(read_coco, path, strict=True)
    np.testing.assert_allclose(box_set.wh, [[640.5, 481], [41, 10]])


def test_coco_crowd_regions_are_counted_not_warned(tmp_path: Path) -> None:
    """``iscrowd: 1`` (also ``true``) regions are left out and counted as 'crowd'; strict does not refuse them."""
    crowd = [bad_annotation([1, 1, 50, 50], iscrowd=1), bad_annotation([1, 1, 5, 5], iscrowd=True),
             bad_annotation([1, 1, 0, 0], iscrowd=2**63), bad_annotation([1, 1, 5, 5], iscrowd=0),
             bad_annotation([1, 1, 5, 5], iscrowd=False)]
    text, _ = coco_lines(IMAGES, GOOD + crowd)
    path = tmp_path / "crowd.json"
    path.write_text(text)
    for strict in (False, True):
        box_set = read_clean(read_coco, path, strict=strict)
        assert box_set.skipped == {"crowd": 3}
        assert len(box_set) == 5


def test_coco_absurd_image_sizes_are_read_quietly(tmp_path: Path) -> None:
    """Image sizes beyond float32 (a broken writer) give no numpy warning; their boxes are not clipped."""
    images = [{"id": 1, "width": 1e300, "height": 3.4028235677973366e38}, {"id": 2, "width": 10, "height": 10}]
    path = tmp_path / "huge.json"
    path.write_text(coco_lines(images, [bad_annotation([5, 5, 50, 50]), bad_annotation([1, 1, 5, 5], image_id=2)])[0])
    box_set = read_clean(read_coco, path, strict=True)
    np.testing.assert_array_equal(box_set.wh, [[50, 50], [5, 5]])


def test_coco_string_ids(tmp_path: Path) -> None:
    """String image ids work when consistent; '12' and 12 are different ids; huge integer ids work."""
    images = [{"id": "abc", "width": 100, "height": 100}] + [
        {"id": f"{i:06d}", "width": 100, "height": 100} for i in range(1, 40)] + [
        {"id": 12, "width": 200, "height": 200}, {"id": 2**70, "width": 300, "height": 300},
        {"id": 2**62, "width": 400, "height": 400}]
    annotations = [{"image_id": f"{i:06d}", "bbox": [1, 1, 10, 10]} for i in range(1, 40)] + [
        {"image_id": 12, "bbox": [1, 1, 20, 20]}, {"image_id": 2**70, "bbox": [1, 1, 30, 30]},
        {"image_id": "abc", "bbox": [1, 1, 5, 5]}, {"image_id": 2**62, "bbox": [1, 1, 40, 40]}]
    path = tmp_path / "ids.json"
    for order in (("images", "annotations"), ("annotations", "images")):
        path.write_text(coco_lines(images, annotations, order)[0])
        box_set = read_clean(read_coco, path, strict=True)
        assert box_set.num_images == 43 and len(box_set) == 43
        sizes = box_set.image_sizes[box_set.image_index]
        np.testing.assert_array_equal(box_set.wh[:, 0], [10] * 39 + [20, 30, 5, 40])
        np.testing.assert_array_equal(sizes[:, 0], [100] * 39 + [200, 300, 100, 400])
        assert box_set.image_names[0] == "abc"


@pytest.mark.parametrize(("ids", "named"), [([1, 2, 1], "image id 1 "), (["a", "b", "a"], "image id 'a' "),
                                            ([2**70, 2**70], f"image id {2**70} ")])
def test_coco_duplicate_image_ids_are_refused(ids: list, named: str, tmp_path: Path) -> None:
    """Repeated image ids make the file ambiguous: DataError naming the id, strict or not."""
    images = [{"id": i, "width": 10, "height": 10} for i in ids]
    path = tmp_path / "dup.json"
    path.write_text(coco_lines(images, [])[0])
    for strict in (False, True):
        with pytest.raises(DataError, match=re.escape(f"{path}: {named}appears more than once")):
            read_coco(path, strict=strict)


VALID = coco_lines(IMAGES, GOOD)[0]


def syntax_cases() -> dict[str, tuple[str, int]]:
    """Files with one syntax error, and the line it is on."""
    lines = VALID.split("\n")
    a0 = next(i for i, line in enumerate(lines) if '"id": 1, "image_id"' in line)

    def edit(i: int, old: str, new: str) -> str:
        changed = list(lines)
        assert old in changed[i]
        changed[i] = changed[i].replace(old, new, 1)
        return "\n".join(changed)

    return {
        "semicolon_in_annotation": (edit(a0, '"image_id": 1,', '"image_id": 1;'), a0 + 1),
        "missing_colon_in_annotation": (edit(a0 + 1, '"bbox":', '"bbox"'), a0 + 2),
        "unquoted_key": (edit(a0 + 2, '"bbox"', "bbox"), a0 + 3),
        "bad_number": (edit(a0 + 1, "50, 60", "50, 6-0"), a0 + 2),
        "missing_comma_between_records": (edit(a0, "]},", "]}"), a0 + 2),
        "unclosed_bracket_in_bbox": (edit(a0 + 2, "8, 9]", "8, 9"), a0 + 3),
        "trailing_comma": (edit(a0 + 2, "}", "},"), a0 + 4),
        "bad_literal_in_image": (edit(2, "640", "tru"), 3),
        "single_quotes_in_image": (edit(2, '"file_name": "a.jpg"', "'file_name': 'a.jpg'"), 3),
        "invalid_escape": (edit(2, "a.jpg", "a\\q.jpg"), 3),
        "missing_comma_between_keys": (edit(a0 - 2, "],", "]"), a0),
        "garbage_after_object": (VALID + "{}\n", len(lines)),
        "control_char_in_string": (edit(2, "a.jpg", "a\tb.jpg"), 3),
        "bad_value_of_other_key": (VALID.replace("{", '{\n"info": {"year" 2017},', 1), 2),
        "mismatched_bracket_in_other_key": (VALID.replace("{", '{\n"info": {"year": [2017}},', 1), 2),
        "bad_scalar_in_other_array": (VALID.replace("{", '{\n"licenses": [1, 2, x],', 1), 2),
    }


@pytest.mark.parametrize("case", sorted(syntax_cases()))
@pytest.mark.parametrize("compress", [False, True])
def test_coco_syntax_error_is_refused_with_its_line(case: str, compress: bool, tmp_path: Path) -> None:
    """Invalid JSON: DataError naming the file and the line of the error, strict or not."""
    text, line = syntax_cases()[case]
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    path = tmp_path / ("bad.json.gz" if compress else "bad.json")
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    for strict in (False, True):
        with pytest.raises(DataError, match=re.escape(f"{path}, line {line}: ")):
            read_coco(path, strict=strict)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.5, 0.77, 0.99, 0.999])
def test_coco_truncated_file_is_refused(fraction: float, tmp_path: Path) -> None:
    """A file cut anywhere (also compressed, also its gzip stream) raises a DataError saying so."""
    raw = json.dumps(load_slice("coco2017")).encode()
    cut = raw[:int(len(raw) * fraction)]
    cases = {"cut.json": cut, "cut.json.gz": gzip.compress(cut),
             "cutgz.json.gz": gzip.compress(raw)[:max(10, int(len(gzip.compress(raw)) * fraction))]}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError, match=re.escape(str(path))) as err:
            load_boxes(path)
        assert re.search(r"truncated|ends|end-of-stream|cannot read", str(err.value)), str(err.value)


@pytest.mark.parametrize("where", ["key", "info_string", "file_name", "category_name", "segmentation_string",
                                   "cut_sequence_at_end"])
def test_coco_non_utf8_is_refused(where: str, tmp_path: Path) -> None:
    """Bytes that are not UTF-8, anywhere in the file: DataError naming the file and the line."""
    d = {"info": {"description": "x"}, "images": [dict(im) for im in IMAGES], "annotations": [dict(a) for a in GOOD],
         "categories": [{"id": 1, "name": "cat"}]}
    d["annotations"][1]["segmentation"] = {"counts": "abc", "size": [1, 2]}
    text = json.dumps(d, indent=2)
    marker = {"key": '"info"', "info_string": '"x"', "file_name": '"b.jpg"', "category_name": '"cat"',
              "segmentation_string": '"abc"', "cut_sequence_at_end": None}[where]
    raw = text.encode()
    if marker is None:
        raw, line = raw + b"\n\xe2\x82", text.count("\n") + 2
    else:
        raw = raw.replace(marker.encode(), marker[:2].encode() + b"\xff\xfe" + marker[2:].encode(), 1)
        line = text[:text.index(marker)].count("\n") + 1
    path = tmp_path / "latin.json"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=re.escape(f"{path}, line {line}: the file is not valid UTF-8")):
        read_coco(path)


def test_coco_utf8_text_and_bom_are_read(tmp_path: Path) -> None:
    """Non-ASCII UTF-8 names (also cut by block boundaries) and a UTF-8 byte order mark are fine."""
    images = [{"id": i, "width": 10, "height": 10, "file_name": f"bild-ä-€-😀-{i}.jpg"} for i in range(200)]
    text, _ = coco_lines(images, [{"image_id": i, "bbox": [0, 0, 5, 5]} for i in range(200)])
    path = tmp_path / "utf8.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    box_set = read_clean(read_coco, path)
    assert box_set.image_names[7] == "bild-ä-€-😀-7.jpg" and len(box_set) == 200


@pytest.mark.parametrize(("content", "message"), [
    (b"", "ends before the JSON object is complete"),
    (b"   \n  ", "ends before the JSON object is complete"),
    (b"[]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not valid UTF-8"),
    ("{}".encode("utf-16"), "not valid UTF-8"),
    (b"{}", "no image records"),
    (b'{"annotations": []}', "no image records"),
    (b'{"images": []}', "no image records"),
    (b'{"images": {"id": 1}}', "the value of 'images' must be an array"),
    (b'{"images": [{"id": 1, "width": 9, "height": 9}], "annotations": 5}', "'annotations' must be an array"),
    (b'{"images": ["x"]}', "no image records in an 'images' list (1 records skipped as bad)"),
])
def test_coco_not_a_coco_file_is_refused(content: bytes, message: str, tmp_path: Path) -> None:
    """Files that are not COCO detection JSON: DataError naming the file and why."""
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        read_coco(path)


def test_coco_unreadable_paths_are_refused(tmp_path: Path) -> None:
    """Missing file, a folder, gzip name on plain text, corrupt gzip: DataError naming the path."""
    plain = tmp_path / "plain.json.gz"
    plain.write_text(VALID)
    corrupt = tmp_path / "corrupt.json.gz"
    packed = gzip.compress(VALID.encode())
    corrupt.write_bytes(packed[:12] + bytes(len(packed) - 12))
    for path in (tmp_path / "missing.json", tmp_path, plain, corrupt):
        with pytest.raises(DataError, match=re.escape(str(path))):
            read_coco(path)
    with pytest.raises(DataError, match="no such file"):
        load_boxes(tmp_path / "missing.json")
    with pytest.raises(DataError, match="not a recognised annotation source"):
        load_boxes(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# B. Bad input: YOLO
# ----------------------------------------------------------------------------------------------------------

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


YOLO_BAD_LINES = {
    "4_fields": b"0 0.5 0.5 0.2",
    "6_fields": b"0 0.5 0.5 0.2 0.2 0.1",
    "2_fields": b"0 0.5",
    "1_field": b"7",
    "polygon_even_fields": b"0 0.1 0.1 0.5 0.1 0.5 0.5 0.1",
    "polygon_no_area": b"0 0.1 0.1 0.5 0.1 0.9 0.1",
    "non_numeric": b"0 0.5 abc 0.2 0.2",
    "class_name": b"cat 0.5 0.5 0.2 0.2",
    "comma_separated": b"0,0.5,0.5,0.2,0.2",
    "above_1_width": b"0 0.5 0.5 1.2 0.2",
    "above_1_centre": b"0 1.5 0.5 0.1 0.1",
    "pixels_not_normalised": b"0 50 25 20 10",
    "negative_height": b"0 0.5 0.5 0.2 -0.2",
    "negative_centre": b"0 -0.1 0.5 0.2 0.2",
    "zero_width": b"0 0.5 0.5 0 0.2",
    "nan": b"0 nan 0.5 0.2 0.2",
    "nan_width": b"0 0.5 0.5 NaN 0.2",
    "inf": b"0 0.5 0.5 inf 0.2",
    "negative_class": b"-1 0.5 0.5 0.2 0.2",
    "nan_class": b"nan 0.5 0.5 0.2 0.2",
    "non_utf8": b"0 0.5\xff\xfe 0.5 0.2 0.2",
    "latin1_class": b"caf\xe9 0.5 0.5 0.2 0.2",
    "nul_bytes": b"\0\0\0\0",
}


@pytest.mark.parametrize("case", sorted(YOLO_BAD_LINES))
@pytest.mark.parametrize("source", ["yaml", "folder"])
def test_yolo_bad_line(case: str, source: str, tmp_path: Path) -> None:
    """A bad label line is skipped and counted (bad_line), named by file and line; the other boxes are read."""
    yaml_path = small_yolo(tmp_path, extra=b"\n" + YOLO_BAD_LINES[case] + b"\n0 0.5 0.5 0.1 0.1\n")
    label = tmp_path / "labels" / "train" / "a.txt"
    path = yaml_path if source == "yaml" else label.parent
    box_set = check_policy(read_yolo, path, {"bad_line": 1}, [f"{label}, line 3: "], n_boxes=4,
                           strict_names=f"{label}, line 3", cache=False)
    np.testing.assert_allclose(sorted(box_set.wh.tolist()), [[10, 5], [12.8, 25.6], [16, 24], [20, 20]], rtol=1e-6)


def test_yolo_polygon_lines_give_their_bounding_box(tmp_path: Path) -> None:
    """Segment lines (``class x1 y1 x2 y2 ...``) are read as the box around the polygon."""
    small_yolo(tmp_path, lines_a=b"3 0.1 0.2 0.5 0.2 0.4 0.8\n")
    box_set = read_clean(read_yolo, tmp_path / "labels" / "train", cache=False)
    np.testing.assert_allclose(box_set.wh[0], [40, 30])


def test_yolo_counts_every_bad_line_of_a_file(tmp_path: Path) -> None:
    """Beyond the three shown per file, bad lines are still counted (also from the cache)."""
    small_yolo(tmp_path, extra=b"x\n" * 7)
    labels = tmp_path / "labels" / "train"
    for _ in range(2):  # written to the cache, then read from it
        check_policy(read_yolo, labels, {"bad_line": 7}, [f"{labels / 'a.txt'}, line 2", "line 3", "line 4"],
                     n_boxes=3, strict_names=f"{labels / 'a.txt'}, line 2")


@pytest.mark.parametrize("content", [b"", b"\n\n", b"   \n\t\n", b"\r\n"])
def test_yolo_empty_label_file_is_a_background_image(content: bytes, tmp_path: Path) -> None:
    """Empty (or blank) label files and missing label files are images without boxes, not problems."""
    yaml_path = small_yolo(tmp_path, lines_a=content)
    write_image(tmp_path / "images" / "train" / "d.jpg", 30, 40)  # no label file at all
    box_set = read_clean(read_yolo, yaml_path, strict=True)
    assert box_set.num_images == 4 and len(box_set) == 2
    assert box_set.image_sizes.tolist() == [[100, 50], [80, 60], [64, 64], [30, 40]]


@pytest.mark.parametrize("content", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg", b"\x89PNG\r\n\x1a\n"])
def test_yolo_unreadable_image(content: bytes, tmp_path: Path) -> None:
    """An image whose size cannot be read keeps no boxes (unreadable_image, naming the image)."""
    yaml_path = small_yolo(tmp_path)
    image = tmp_path / "images" / "train" / "b.png"
    image.write_bytes(content)
    for path in (yaml_path, tmp_path / "labels" / "train"):
        box_set = check_policy(read_yolo, path, {"unreadable_image": 1}, [f"{image}: cannot read the image size"],
                               n_boxes=2, strict_names=str(image), cache=False)
        assert box_set.num_images == 3


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header of any size (no pixel data), as a very large image's file starts."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_yolo_very_large_images(tmp_path: Path) -> None:
    """Images beyond PIL's decompression-bomb limits (aerial, medical) have their size read, quietly."""
    yaml_path = small_yolo(tmp_path)
    (tmp_path / "images" / "train" / "b.png").write_bytes(header_only_png(20_000, 20_000))  # > 179 Mpx: an error
    (tmp_path / "images" / "train" / "d.png").write_bytes(header_only_png(10_000, 10_000))  # > 89 Mpx: a warning
    limit = Image.MAX_IMAGE_PIXELS
    box_set = read_clean(read_yolo, yaml_path, strict=True)
    assert limit == Image.MAX_IMAGE_PIXELS
    assert box_set.image_sizes.tolist() == [[100, 50], [20_000, 20_000], [64, 64], [10_000, 10_000]]
    np.testing.assert_allclose(box_set.wh[1], [4_000, 8_000])


def test_yolo_label_without_image(tmp_path: Path) -> None:
    """In a labels folder, a label file with no image of its name is skipped (unreadable_image)."""
    small_yolo(tmp_path)
    orphan = tmp_path / "labels" / "train" / "z.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    check_policy(read_yolo, tmp_path / "labels" / "train", {"unreadable_image": 1},
                 [f"{orphan}: no image with this name"], n_boxes=3, strict_names=str(orphan), cache=False)


@pytest.mark.parametrize(("line", "kind", "wh"), [
    (b"0 0.95 0.5 0.2 0.2", "clipped_box", [15, 10]),
    (b"0 0.02 0.5 0.2 0.2", "clipped_box", [12, 10]),
    (b"0 0.5 1.0 0.2 0.5", "clipped_box", [20, 12.5]),
    (b"0 0.995 0.5 0.02 0.2", None, [2, 10]),
])
def test_yolo_boxes_at_the_border(line: bytes, kind: str | None, wh: list, tmp_path: Path) -> None:
    """Boxes reaching more than 1 px outside are clipped and counted; up to 1 px they keep their size."""
    small_yolo(tmp_path, extra=line + b"\n")
    labels = tmp_path / "labels" / "train"
    if kind is None:
        box_set = read_clean(read_yolo, labels, strict=True)
    else:
        box_set = check_policy(read_yolo, labels, {kind: 1},
                               [f"reaches outside image {tmp_path / 'images' / 'train' / 'a.jpg'} of size"],
                               n_boxes=4, cache=False)
    np.testing.assert_allclose(box_set.wh[1], wh, rtol=1e-6)


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("train: [\n", "cannot read the dataset YAML"),
    ("train: images/train\n  bad: indent\n", "cannot read the dataset YAML"),
    ("- train\n- val\n", "no 'train' entry"),
    ("just a string\n", "no 'train' entry"),
    ("", "no 'train' entry"),
    ("val: images/train\n", "no 'train' entry (the dataset YAML has ['val'])"),
    ("train: images/missing\n", "'train' entry 'images/missing' is neither a folder"),
    ("train:\n", "'train' entry None is neither a folder"),
    ("path: [1, 2]\ntrain: images/train\n", "'path' must be a folder name"),
    ("train: empty\n", "the 'train' split lists no images"),
])
def test_yolo_unusable_dataset_yaml_is_refused(yaml_text: str, message: str, tmp_path: Path) -> None:
    """A dataset YAML that cannot be used: DataError naming the YAML and why."""
    small_yolo(tmp_path)
    (tmp_path / "empty").mkdir()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        read_yolo(path)
    with pytest.raises(DataError, match=re.escape(message)):
        load_boxes(path)


def test_yolo_unreadable_paths_are_refused(tmp_path: Path) -> None:
    """Non-UTF-8 or missing YAML, an empty labels folder, a single label file: DataError naming the path."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"path: caf\xe9\ntrain: x\n")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "classes.txt").write_text("cat\n")
    single = tmp_path / "one.txt"
    single.write_text("0 0.5 0.5 0.1 0.1\n")
    for path, message in ((latin, "cannot read the dataset YAML"), (tmp_path / "missing.yaml", "cannot read"),
                          (tmp_path / "labels", "no .txt label files"), (single, "not a dataset YAML")):
        with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + re.escape(message)):
            read_yolo(path)
    upper = small_yolo(tmp_path / "up").rename(tmp_path / "up" / "DATA.YAML")
    assert len(read_clean(load_boxes, upper)) == 3


# ----------------------------------------------------------------------------------------------------------
# B. Bad input: Pascal VOC
# ----------------------------------------------------------------------------------------------------------

def small_voc(root: Path, a_xml: str | bytes | None = None) -> Path:
    """A VOC year folder with three images (a: 100x50, b: 80x60, c: 64x64), one 10x20 box each."""
    (root / "Annotations").mkdir(parents=True)
    for name, size in {"a": (100, 50), "b": (80, 60), "c": (64, 64)}.items():
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(f"{name}.jpg", size, [("dog", 1, 1, 10, 20)]))
    if a_xml is not None:
        content = a_xml.encode() if isinstance(a_xml, str) else a_xml
        (root / "Annotations" / "a.xml").write_bytes(content)
    return root


def a_objects(*objects: tuple) -> str:
    return voc_xml("a.jpg", (100, 50), [("dog", 1, 1, 10, 20), *objects])


VOC_BAD_OBJECTS = {
    "no_bndbox": ("<annotation><filename>a.jpg</filename><size><width>100</width><height>50</height></size>"
                  "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax>"
                  "</bndbox></object><object><name>cat</name></object></annotation>", "bad_record"),
    "missing_corner": ("<annotation><filename>a.jpg</filename><size><width>100</width><height>50</height></size>"
                       "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax>"
                       "</bndbox></object><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                       "<xmax>10</xmax></bndbox></object></annotation>", "bad_record"),
    "non_numeric_corner": (a_objects(("cat", 1, "one", 10, 20)), "bad_record"),
    "empty_corner": (a_objects(("cat", 1, "", 10, 20)), "bad_record"),
    "nan_corner": (a_objects(("cat", 1, 1, "nan", 20)), "bad_box"),
    "inf_corner": (a_objects(("cat", 1, 1, 10, "inf")), "bad_box"),
    "inverted": (a_objects(("cat", 10, 1, 1, 20)), "bad_box"),
    "zero_width": (a_objects(("cat", 5, 1, 4, 20)), "bad_box"),
    "outside": (a_objects(("cat", 200, 1, 210, 20)), "outside_box"),
    "outside_below": (a_objects(("cat", 1, 60, 10, 70)), "outside_box"),
    "straddling": (a_objects(("cat", 90, 1, 110, 20)), "clipped_box"),
    "straddling_negative": (a_objects(("cat", -9, 1, 10, 20)), "clipped_box"),
    "beyond_float32": (a_objects(("cat", 1, 1, 10, "1e39")), "bad_box"),
}


@pytest.mark.parametrize("case", sorted(VOC_BAD_OBJECTS))
def test_voc_bad_object(case: str, tmp_path: Path) -> None:
    """A bad object is skipped (or clipped) and counted, named by file and object; the rest is read."""
    xml, kind = VOC_BAD_OBJECTS[case]
    root = small_voc(tmp_path / "VOC2007", xml)
    a = root / "Annotations" / "a.xml"
    box_set = check_policy(read_voc, root, {kind: 1}, [f"{a}, object 2 (cat)"],
                           n_boxes=4 if kind == "clipped_box" else 3, strict_names=f"{a}, object 2 (cat)")
    if kind == "clipped_box":
        assert box_set.wh[1].tolist() == ([11, 20] if case == "straddling" else [10, 20])


def test_voc_boxes_within_one_pixel_keep_their_size(tmp_path: Path) -> None:
    """Corners 0 or size + 1 (1 px slack) are neither clipped nor reported."""
    root = small_voc(tmp_path / "VOC2007", a_objects(("cat", 0, 0, 101, 51)))
    np.testing.assert_allclose(read_clean(read_voc, root, strict=True).wh[1], [102, 52])


VOC_BAD_FILES = {
    "truncated": (a_objects()[:60], "unreadable_file", "cannot parse"),
    "not_xml": (b"\x89PNG\r\n\x1a\n\0\0", "unreadable_file", "cannot parse"),
    "empty": (b"", "unreadable_file", "cannot parse"),
    "unclosed_tag": ("<annotation><size><width>5</width></annotation>", "unreadable_file", "cannot parse"),
    "non_utf8": (a_objects().replace("dog", "d\udcffg").encode("utf-8", "surrogateescape"), "unreadable_file",
                 "cannot parse"),
    "no_size": (voc_xml("a.jpg", None, [("dog", 1, 1, 10, 20)]), "missing_size", "no usable <size>"),
    "zero_size": (voc_xml("a.jpg", (0, 0), [("dog", 1, 1, 10, 20)]), "missing_size", "no usable <size>"),
    "nan_size": (voc_xml("a.jpg", ("nan", 50), [("dog", 1, 1, 10, 20)]), "missing_size", "no usable <size>"),
    "text_size": (voc_xml("a.jpg", ("wide", "tall"), [("dog", 1, 1, 10, 20)]), "missing_size", "no usable <size>"),
}


@pytest.mark.parametrize("case", sorted(VOC_BAD_FILES))
def test_voc_bad_file(case: str, tmp_path: Path) -> None:
    """An XML file that cannot be parsed, or has no usable size, keeps no boxes; counted and named."""
    xml, kind, why = VOC_BAD_FILES[case]
    root = small_voc(tmp_path / "VOC2007", xml)
    a = root / "Annotations" / "a.xml"
    box_set = check_policy(read_voc, root, {kind: 1}, [f"{a}: {why}"], n_boxes=2, strict_names=str(a))
    assert box_set.num_images == 3


def test_voc_size_from_the_image_file(tmp_path: Path) -> None:
    """Without <size>, the size comes from JPEGImages; a broken image there is a missing size."""
    root = small_voc(tmp_path / "VOC2007", voc_xml("a.jpg", None, [("dog", 1, 1, 10, 20)]))
    write_image(root / "JPEGImages" / "a.jpg", 120, 90)
    box_set = read_clean(read_voc, root, strict=True)
    assert box_set.image_sizes[0].tolist() == [120, 90] and len(box_set) == 3
    (root / "JPEGImages" / "a.jpg").write_bytes(b"broken")
    a = root / "Annotations" / "a.xml"
    check_policy(read_voc, root, {"missing_size": 1}, [f"{a}: no usable <size> and the image cannot be read"],
                 n_boxes=2, strict_names=str(a))


def test_voc_split_lists(tmp_path: Path) -> None:
    """A split list naming a missing XML counts it as unreadable; bad or missing lists are refused."""
    root = small_voc(tmp_path / "VOC2007")
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("a\nc\n\nz\n")
    box_set = check_policy(read_voc, root, {"unreadable_file": 1}, [f"{root / 'Annotations' / 'z.xml'}: cannot parse"],
                           n_boxes=2, split="train", strict_names=str(root / "Annotations" / "z.xml"))
    assert box_set.image_names[:2] == ("a.jpg", "c.jpg")
    (main / "val.txt").write_bytes(b"a\ncaf\xe9\n")
    (main / "test.txt").write_text("\n")
    for split, message in (("val", f"{main / 'val.txt'}: cannot read the split list"),
                           ("trainval", f"{root}: no split list"), ("test", f"{root}: no .xml annotation files")):
        with pytest.raises(DataError, match=re.escape(message)):
            read_voc(root, split=split)


def test_voc_unreadable_paths_are_refused(tmp_path: Path) -> None:
    """A missing folder, a file, or a folder without XML files: DataError naming the path."""
    (tmp_path / "empty" / "Annotations").mkdir(parents=True)
    (tmp_path / "file.xml").write_text(voc_xml("a.jpg", (10, 10), []))
    for path in (tmp_path / "missing", tmp_path / "file.xml", tmp_path / "empty"):
        with pytest.raises(DataError, match=re.escape(str(path))):
            read_voc(path)


# ----------------------------------------------------------------------------------------------------------
# C. The COCO stream reader at block boundaries
# ----------------------------------------------------------------------------------------------------------

ANY = msgspec.json.Decoder(list[Any])


def stream(raw: bytes, block_size: int, keys: tuple[str, ...] = ("images", "annotations")
           ) -> dict[str, list[tuple[int, Any, int]]]:
    """Every element of the arrays ``keys`` as ``(index, value, line)``, via ``stream_arrays``."""
    out: dict[str, list[tuple[int, Any, int]]] = {k: [] for k in keys}

    def collect(run: Elements) -> None:
        for j, item in enumerate(run.items):
            out[run.key].append((run.first + j, item, run.line_of(j)))

    stream_arrays(io.BytesIO(raw), "f.json", dict.fromkeys(keys, ANY), collect, block_size=block_size)
    return out


def element_lines(text: str, key: str) -> list[int]:
    """Lines on which the elements of the top-level array ``key`` start, found with ``json`` itself."""
    decoder = json.JSONDecoder()
    at = text.index("[", text.index(f'"{key}"') + len(key) + 2) + 1
    lines = []
    while True:
        while text[at] in " \t\r\n,":
            at += 1
        if text[at] == "]":
            return lines
        lines.append(text.count("\n", 0, at) + 1)
        at = decoder.raw_decode(text, at)[1]


def tricky_coco() -> dict:
    """Real records, with what can fool a cut: nested objects and arrays, '}, {' and ']' in strings."""
    d = load_slice("coco2017")
    d = {"info": {"note": 'text with "}, {" and "]" and "}]" inside', "nested": [{"a": [1, {"b": []}]}, {}]},
         "licenses": [{"id": 1, "name": "}, {\"x\": ["}, {"id": 2, "url": "a]b"}],
         "annotations": d["annotations"][:120], "extra": [[[], [{}]], {"k": "}, {"}],
         "images": d["images"][:40], "categories": d["categories"][:3], "tail": None}
    for k, a in enumerate(d["annotations"]):
        if k % 3 == 0:
            a["segmentation"] = {"counts": "}, {\"id\": 5}, {", "size": [a["image_id"], 7]}
        if k % 4 == 1:
            a["attributes"] = [{"a": 1}, {"b": 2}, {"c": [{"d": "}]"}]}]
        if k % 5 == 2:
            a["segmentation"] = [[1.5, 2.5, 3.5], [4.5]]
        if k % 7 == 3:
            a["caption"] = "ä ü € 😀 }, { ]"
    return d


@pytest.mark.parametrize("block_size", [1, 64, 100, 1000, 4096, 1 << 24])
@pytest.mark.parametrize("layout", ["compact", "indent2", "indent0", "crlf"])
def test_stream_blocks_equal_json_load(block_size: int, layout: str) -> None:
    """Any block size and layout gives exactly the elements, indices and start lines that ``json`` finds."""
    d = tricky_coco()
    text = {"compact": json.dumps(d, separators=(",", ":"), ensure_ascii=False),
            "indent2": json.dumps(d, indent=2, ensure_ascii=False),
            "indent0": json.dumps(d, indent=0),
            "crlf": json.dumps(d, indent=1).replace("\n", "\r\n")}[layout]
    got = stream(text.encode(), block_size)
    for key in ("images", "annotations"):
        assert [item for _, item, _ in got[key]] == d[key]
        assert [i for i, _, _ in got[key]] == list(range(len(d[key])))
        assert [line for _, _, line in got[key]] == element_lines(text, key)


@pytest.mark.parametrize("block_size", [64, 100, 1000, 4096])
def test_stream_falls_back_exactly_on_nan_records(block_size: int) -> None:
    """Records msgspec cannot decode (NaN, Infinity) come through the exact path with their lines."""
    d = tricky_coco()
    for a in d["annotations"][::9]:
        a["bbox"][2] = float("nan")
    d["annotations"][5]["bbox"][3] = float("-inf")
    text = json.dumps(d, indent=2)
    got = stream(text.encode(), block_size, keys=("annotations",))["annotations"]
    expected = json.loads(text)["annotations"]
    assert len(got) == len(expected)
    for (_, item, _), want in zip(got, expected, strict=True):
        assert json.dumps(item) == json.dumps(want)  # NaN == NaN as text
    assert [line for _, _, line in got] == element_lines(text, "annotations")


@pytest.mark.parametrize("block_size", [1, 64, 100, 1000, 4096])
def test_coco_box_set_is_independent_of_blocks_and_layout(block_size: int, tmp_path: Path) -> None:
    """The COCO records read through any block size give the box set (and problems) of ``read_coco``."""
    d = tricky_coco()
    for a in d["annotations"][::11]:
        a["bbox"][2] = float("nan")
    d["annotations"][3]["image_id"] = 4242
    d["annotations"][4]["bbox"] = "x"
    compact, pretty = tmp_path / "compact.json", tmp_path / "pretty.json"
    compact.write_text(json.dumps(d))
    pretty.write_text(json.dumps(d, indent=2))
    reference, _ = read_warned(read_coco, compact)
    assert reference.skipped["bad_box"] == 11 and reference.skipped["bad_record"] == 1
    assert reference.skipped["unknown_image"] >= 1
    for path in (compact, pretty):
        collector = _Collector(str(compact), ReadLog(str(compact)))
        with open(path, "rb") as f:
            stream_arrays(f, str(path), _DECODERS, collector, block_size=block_size)
        same_box_sets(collector.box_set(), reference)


@pytest.mark.parametrize("block_size", [1, 7, 64, 100, 1000, 4096, 1 << 24])
def test_stream_syntax_error_lines(block_size: int) -> None:
    """Syntax errors anywhere are reported on their own line, whatever the block size."""
    text = json.dumps(tricky_coco(), indent=2)
    lines = text.split("\n")
    targets = [i for i, line in enumerate(lines) if line.strip().startswith('"image_id"')][::17]
    targets += [i for i, line in enumerate(lines) if line.strip().startswith('"file_name"')][::13]
    targets += [i for i, line in enumerate(lines) if '"}, {\\"x\\": ["' in line or '"k":' in line]
    for i in targets:
        broken = list(lines)
        broken[i] = broken[i].replace('":', '" =', 1)
        with pytest.raises(DataError, match=rf"^f\.json, line {i + 1}: "):
            stream("\n".join(broken).encode(), block_size)


def test_stream_numbers_cut_by_blocks() -> None:
    """Arrays of numbers ('1.5e+110' cut as '1.5' + 'e+110') read the same at every block size."""
    numbers = [1.5e110, -2.460409575937589e110, 1e-5, 12345678901234567890, 0.5, -0.0, 7] * 6
    values = [{"nested": [{"a": 1}]}, *numbers]  # its '}]' sends the array to the exact decoder
    text = json.dumps({"x": values, "images": [{"id": 1, "n": numbers[:3]}]}, indent=1)
    for block_size in range(1, 160):
        got = stream(text.encode(), block_size, keys=("x", "images"))
        assert [v for _, v, _ in got["x"]] == values, block_size


def test_stream_large_string_cut_by_a_block(tmp_path: Path) -> None:
    """A string longer than the decoder's lookahead, cut by a block boundary, is not taken for an error."""
    big = "x" * (6 << 20)
    records = [{"id": 1, "image_id": 1, "bbox": [float("nan"), 0, 1, 1]},
               {"id": 2, "image_id": 1, "bbox": [0, 0, 1, 1], "segmentation": {"counts": big}},
               {"id": 3, "image_id": 1, "bbox": [0, 0, 2, 2]}]
    raw = json.dumps({"images": [{"id": 1, "width": 5, "height": 5}], "annotations": records}).encode()
    got = stream(raw, 2 << 20, keys=("annotations",))["annotations"]
    assert [item["id"] for _, item, _ in got] == [1, 2, 3]
    assert got[1][1]["segmentation"]["counts"] == big


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_progress_bar_starts_no_thread(terminal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's bar is drawn on a terminal only, and leaves the process single-threaded (so its workers can
    still be forked)."""
    import fcntl
    import pty
    import termios
    import threading

    from lightning_autoanchor.progress import progress_bar

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal of 80 columns
    with os.fdopen(follower, "w") if terminal else open(os.devnull, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        before = threading.active_count()
        assert list(progress_bar(range(500), desc="Reading labels", enabled=True, total=500)) == list(range(500))
        assert threading.active_count() == before
        stderr.flush()
        os.set_blocking(leader, False)
        try:
            drawn = os.read(leader, 65536).decode()
        except BlockingIOError:
            drawn = ""
    os.close(leader)
    assert ("Reading labels:   0%" in drawn) == terminal
