"""Pascal VOC XML (``read_voc``): year folders, bare XML folders and split lists; bad objects and files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import PROBLEMS, load_boxes, read_voc

from .conftest import (
    KNOWN_COUNTS,
    assert_same_boxes,
    check_policy,
    make_special,
    read_clean,
    read_elsewhere,
    small_voc,
    voc_xml,
    write_image,
    write_voc,
)


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


# ----------------------------------------------------------------------------------------------------------
# B. Bad input: Pascal VOC
# ----------------------------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("where", ["xml", "image"])
def test_voc_special_files_are_skipped_unopened(where: str, kind: str, workers: int, tmp_path: Path) -> None:
    """A FIFO, socket or device as an XML file, or as the image a sizeless XML needs: skipped with a warning
    (strict refuses it), never opened, so the read cannot hang; also in worker processes (in a subprocess)."""
    root = small_voc(tmp_path / "VOC2007")
    if where == "xml":
        special = root / "Annotations" / "d.xml"
    else:
        (root / "Annotations" / "a.xml").write_text(voc_xml("a.jpg", None, [("dog", 1, 1, 10, 20)]))
        (root / "JPEGImages").mkdir()
        special = root / "JPEGImages" / "a.jpg"
    make_special(special, kind)
    what = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device"}[kind]
    out = read_elsewhere("read_voc", root, workers=workers)
    n_images, n_boxes = (3, 2) if where == "image" else (4, 3)  # a sizeless a.xml; or d.xml, an image too
    assert (out["n_images"], out["n_boxes"], out["skipped"]) == (n_images, n_boxes, {"special_file": 1}), out
    assert out["warnings"] == [f"{root}: 1 {PROBLEMS['special_file']}. First: {special}: not a regular file but {what}"]
    refused = read_elsewhere("read_voc", root, workers=workers, strict=True)
    assert refused["error"].startswith(f"{special}: not a regular file but {what} (strict mode refuses"), refused
