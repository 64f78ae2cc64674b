"""YOLO labels (``read_yolo``): Ultralytics dataset YAMLs and label folders with real image files,
the cache of image sizes, and bad lines, images and dataset YAMLs."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import PROBLEMS, load_boxes, read_voc, read_yolo

from .conftest import (
    KNOWN_COUNTS,
    SLICES,
    assert_same_boxes,
    check_policy,
    load_slice,
    make_special,
    read_clean,
    read_elsewhere,
    read_warned,
    same_box_sets,
    small_yolo,
    voc_xml,
    write_image,
    write_yolo,
)


@pytest.fixture(scope="module")
def yolo_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each slice written once as an Ultralytics dataset (images are real files)."""
    return {name: write_yolo(load_slice(name), tmp_path_factory.mktemp(f"yolo-{name}")) for name in SLICES}


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


# ----------------------------------------------------------------------------------------------------------
# B. Bad input: YOLO
# ----------------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("where", ["label", "image"])
def test_yolo_special_files_are_skipped_unopened(where: str, kind: str, workers: int, tmp_path: Path) -> None:
    """A FIFO, socket or device where a label file or an image should be: skipped with a warning (strict refuses
    it), never opened, so the read cannot hang; also in worker processes. Each read runs in a subprocess."""
    yaml_path = small_yolo(tmp_path)
    images, labels = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    if where == "label":
        write_image(images / "d.jpg", 30, 40)
        special = labels / "d.txt"
    else:
        (labels / "d.txt").write_text("0 0.5 0.5 0.2 0.4\n")
        special = images / "d.jpg"
    make_special(special, kind)
    what = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device"}[kind]
    for path in (yaml_path, labels):
        out = read_elsewhere("read_yolo", path, cache=False, workers=workers)
        assert (out["n_images"], out["n_boxes"], out["skipped"]) == (4, 3, {"special_file": 1}), out
        assert out["warnings"] == [f"{path}: 1 {PROBLEMS['special_file']}. First: {special}: not a regular file "
                                   f"but {what}"]
        refused = read_elsewhere("read_yolo", path, cache=False, workers=workers, strict=True)
        assert refused["error"].startswith(f"{special}: not a regular file but {what} (strict mode refuses"), refused


def test_yolo_symlink_loops_are_walked_once(tmp_path: Path) -> None:
    """Links from inside the dataset back up its tree (and a link to itself): no loop, no traceback; every
    folder is listed once, so the read is the one without the links but for the self-link's warning."""
    yaml_path = small_yolo(tmp_path)
    labels = tmp_path / "labels" / "train"
    expected = read_clean(read_yolo, yaml_path, cache=False)
    (labels / "up").symlink_to("..", target_is_directory=True)
    (labels / "root").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "images" / "train" / "again").symlink_to("../train", target_is_directory=True)
    (tmp_path / "images" / "train" / "twice").symlink_to("../../images", target_is_directory=True)
    for reader, path in (("read_yolo", yaml_path), ("read_yolo", labels), ("read_yolo", tmp_path),
                         ("load_boxes", tmp_path)):
        out = read_elsewhere(reader, path, **({"cache": False} if reader == "read_yolo" else {}))
        assert (out["n_images"], out["n_boxes"], out["skipped"], out["warnings"]) == (3, 3, {}, []), out
        assert out["names"] == list(expected.image_names)
    (labels / "self.txt").symlink_to("self.txt")
    out = read_elsewhere("read_yolo", labels, cache=False)
    assert (out["n_boxes"], out["skipped"]) == (3, {"unreadable_file": 1, "unreadable_image": 1}), out
    shown = " | ".join(out["warnings"])
    assert f"{labels / 'self.txt'}: cannot read: [Errno 40] Too many levels of symbolic links" in shown


def test_yolo_cache_that_cannot_be_written_leaves_no_file(tmp_path: Path) -> None:
    """Writing the cache fails for real (a file size limit, as a full disk would): the read goes on, and neither
    the cache nor its temporary file is left beside the dataset."""
    yaml_path = small_yolo(tmp_path)
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))\n"
            "from lightning_autoanchor.sources import read_yolo\nprint(len(read_yolo(sys.argv[1])))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(yaml_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "3\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.yaml", "images", "labels"]
    read_clean(read_yolo, yaml_path)  # without the limit, the cache is written
    assert sorted(p.name for p in tmp_path.iterdir())[0] == ".data.yaml.train.autoanchor-cache.npz"
