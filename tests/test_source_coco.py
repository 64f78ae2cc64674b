"""COCO JSON (``read_coco``): the shipped slices read back exactly, and bad input of every kind.

Each problem kind of ``lightning_autoanchor.sources.PROBLEMS`` is skipped, counted and warned about once,
naming the file, line and record; ``strict=True`` refuses it. A file that is not JSON, is truncated, is not
UTF-8 or repeats an image id is always refused with a ``DataError`` naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import load_boxes, read_coco

from .conftest import (
    DEMO_COCO,
    KNOWN_COUNTS,
    SLICES,
    assert_same_boxes,
    check_policy,
    coco_lines,
    load_slice,
    read_clean,
    read_elsewhere,
    write_coco,
)


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
    with gzip.open(DEMO_COCO, "rt") as f:
        demo = json.load(f)
    box_set = read_clean(load_boxes, DEMO_COCO)
    assert (box_set.num_images, len(box_set)) == (1000, 7179)
    assert_same_boxes(box_set, demo, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# B. Bad input: COCO
# ----------------------------------------------------------------------------------------------------------

IMAGES = [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"},
          {"id": 2, "width": 320, "height": 240, "file_name": "b.jpg"}]
GOOD = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 50, 60]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [100, 100, 8, 9]}]


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
    """Missing file, a folder, corrupt gzip: DataError naming the path; a FIFO is refused, not opened."""
    corrupt = tmp_path / "corrupt.json.gz"
    packed = gzip.compress(VALID.encode())
    corrupt.write_bytes(packed[:12] + bytes(len(packed) - 12))
    for path in (tmp_path / "missing.json", tmp_path, corrupt):
        with pytest.raises(DataError, match=re.escape(str(path))):
            read_coco(path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert read_elsewhere("read_coco", fifo) == {"error": f"{fifo}: cannot read: not a regular file but a FIFO"}
    assert read_elsewhere("load_boxes", fifo)["error"].startswith(f"{fifo}: not a recognised annotation source")
    with pytest.raises(DataError, match="no such file"):
        load_boxes(tmp_path / "missing.json")
    with pytest.raises(DataError, match="not a recognised annotation source"):
        load_boxes(tmp_path)


@pytest.mark.parametrize("name", ["plain.json.gz", "packed.json", "PACKED.JSON.GZ", "packed.Json.Gz"])
def test_coco_gzip_is_told_by_its_bytes(name: str, tmp_path: Path) -> None:
    """A file is read as gzip when it starts with gzip's magic bytes, whatever its name says."""
    path = tmp_path / name
    path.write_bytes(VALID.encode() if name.startswith("plain") else gzip.compress(VALID.encode()))
    for read in (read_coco, load_boxes):
        box_set = read_clean(read, path, strict=True)
        assert len(box_set) == 3 and box_set.image_names == ("a.jpg", "b.jpg")
