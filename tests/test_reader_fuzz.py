"""Fuzzing the readers with malformed files: each read returns sound boxes or raises ``DataError``, promptly.

Sound boxes: finite, positive widths and heights with finite, positive image sizes. Where Python's
``json`` module says a COCO file is not JSON, the reader must refuse it too. Every example runs under
an alarm, so a hang fails the test instead of stalling it. Examples are derandomised (the same cases on
every run); ``FUZZ_SCALE=10`` runs ten times as many, freshly random.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import PROBLEMS, DataWarning, read_coco, read_voc, read_yolo
from lightning_autoanchor.sources._json_stream import Elements, stream_arrays

from .conftest import alarm, load_slice, voc_xml, write_image, yolo_line

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
TIME_LIMIT_S = 10.0  # per example; far above the few milliseconds each takes


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(read: Any, *args: Any, **kwargs: Any) -> BoxSet | DataError:
    """The box set read, or the ``DataError`` raised; any other exception or warning fails the test."""
    with alarm(TIME_LIMIT_S), warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DataWarning)
        try:
            box_set = read(*args, **kwargs)
        except DataError as err:
            assert str(err), "a DataError must say what is wrong"
            event(f"{read.__name__}: DataError")
            return err
    event(f"{read.__name__}: BoxSet" + (" with skips" if box_set.skipped else ""))
    assert isinstance(box_set, BoxSet)
    assert np.isfinite(box_set.wh).all() and (box_set.wh > 0).all()
    assert np.isfinite(box_set.image_sizes).all() and (box_set.image_sizes > 0).all()
    assert len(box_set.image_index) == len(box_set.wh)
    assert set(box_set.skipped) <= set(PROBLEMS) | {"crowd"}
    assert all(n > 0 for n in box_set.skipped.values())
    return box_set


def json_refuses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return False


# ----------------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------------

def coco_sample() -> dict:
    """Real records (COCO val2017 slice) plus the awkward parts of real files: crowd, nested, unicode."""
    d = load_slice("coco2017")
    images = d["images"][:6]
    ids = {im["id"] for im in images}
    annotations = [dict(a) for a in d["annotations"] if a["image_id"] in ids][:24]
    for k, a in enumerate(annotations):
        if k % 4 == 0:
            a["segmentation"] = {"counts": "Q]1}, {5]", "size": [10, 20]}
        if k % 5 == 1:
            a["iscrowd"] = 1
        if k % 6 == 2:
            a["attributes"] = [{"occluded": False}, {"name": "ä €"}]
    return {"info": {"description": "fuzz"}, "licenses": [{"id": 1, "name": "CC BY 4.0"}], "images": images,
            "annotations": annotations, "categories": d["categories"][:4]}


SAMPLE = coco_sample()
TEXTS = {"compact": json.dumps(SAMPLE, separators=(",", ":"), ensure_ascii=False).encode(),
         "pretty": json.dumps(SAMPLE, indent=2, ensure_ascii=False).encode()}


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        yield Path(d)


def check_coco(raw: bytes, scratch: Path, name: str = "f.json", plain: bytes | None = None) -> BoxSet | DataError:
    """Read ``raw`` as a COCO file; ``plain``: its uncompressed text when ``raw`` is gzip."""
    path = scratch / name
    path.write_bytes(raw)
    result = outcome(read_coco, path)
    plain = raw if plain is None else plain
    if name.endswith(".json") and json_refuses(raw):
        assert isinstance(result, DataError), "json refuses this file, so must the reader"
    if isinstance(result, BoxSet):
        assert len(result) <= plain.count(b"bbox")
        assert result.num_images <= plain.count(b'"id"')
    return result


@fuzz(300)
@given(layout=st.sampled_from(sorted(TEXTS)), cut=st.floats(0, 1))
def test_coco_truncated_anywhere(layout: str, cut: float, scratch: Path) -> None:
    """Cut at any byte (inside keys, strings, numbers, nested objects, UTF-8 sequences): always a DataError."""
    raw = TEXTS[layout]
    at = min(int(cut * len(raw)), len(raw) - 1)
    assert isinstance(check_coco(raw[:at], scratch), DataError)


@fuzz(300)
@given(layout=st.sampled_from(sorted(TEXTS)), data=st.data())
def test_coco_byte_edits(layout: str, data: st.DataObject, scratch: Path) -> None:
    """Random byte flips, insertions and deletions: a DataError, or sound boxes (and json agrees)."""
    raw = bytearray(TEXTS[layout])
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        edit = data.draw(st.sampled_from(["flip", "insert", "delete", "structural"]), label="edit")
        if edit == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif edit == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        elif edit == "delete":
            del raw[at:at + data.draw(st.integers(1, 8), label="n")]
        else:
            raw[at:at] = data.draw(st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"NaN", b"-",
                                                    b"1e999", b"null", b"\n", b"\xc3", b"\xff"]), label="token")
    check_coco(bytes(raw), scratch)


@fuzz(100)
@given(data=st.data())
def test_coco_gzip_corruption(data: st.DataObject, scratch: Path) -> None:
    """Corrupt or truncated gzip streams are refused with a DataError (or decode to something sound)."""
    raw = bytearray(gzip.compress(TEXTS["compact"]))
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    check_coco(bytes(raw), scratch, "f.json.gz", plain=TEXTS["compact"])


def records() -> st.SearchStrategy[Any]:
    """Annotation-like records with every kind of field value, sane or not."""
    number = st.one_of(st.integers(-10, 1000), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0, -0.0, 1e-50, 1e39, 2**63, 10**30]))
    value = st.one_of(number, st.none(), st.booleans(), st.text(max_size=5), st.lists(number, max_size=6))
    return st.one_of(
        st.fixed_dictionaries({"image_id": st.one_of(st.integers(0, 4), st.sampled_from(["1", "a", 2**70])),
                               "bbox": st.one_of(st.lists(number, min_size=4, max_size=4), value)},
                              optional={"id": value, "iscrowd": value, "segmentation": value}),
        value)


@fuzz(200)
@given(images=st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(0, 40), st.sampled_from(["1", "a"]))},
                                             optional={"width": st.one_of(st.integers(-5, 700), st.floats(),
                                                                          st.text(max_size=3), st.none()),
                                                       "height": st.one_of(st.integers(-5, 700), st.floats()),
                                                       "file_name": st.one_of(st.text(max_size=8), st.integers())}),
                       min_size=1, max_size=6, unique_by=lambda im: repr(im["id"])),
       annotations=st.lists(records(), max_size=12), indent=st.sampled_from([None, 1]), repeat=st.integers(0, 9))
def test_coco_random_records(images: list, annotations: list, indent: int | None, repeat: int, scratch: Path) -> None:
    """Valid JSON with random, often wrong, records: refused only for no images or repeated ids, else sound."""
    if images and repeat == 0:
        images.append(dict(images[-1]))
    raw = json.dumps({"images": images, "annotations": annotations}, indent=indent).encode()
    result = check_coco(raw, scratch)
    ids = [repr(im["id"]) for im in images]
    if not images:
        assert isinstance(result, DataError) and "no image records" in str(result)
    elif len(set(ids)) < len(ids):
        assert isinstance(result, DataError) and "appears more than once" in str(result)
    else:
        assert isinstance(result, BoxSet), result
        assert result.num_images == len(images)
        assert len(result) <= sum(isinstance(a, dict) for a in annotations)
        assert result.skipped.get("missing_size", 0) <= len(images)


# ----------------------------------------------------------------------------------------------------------
# The stream reader itself: any JSON, any block size, same values as json
# ----------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
              st.text(alphabet=st.sampled_from('ab}{][,:"\\ ä€😀\n\t'), max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=12)


@fuzz(200)
@given(doc=st.dictionaries(st.sampled_from(["images", "annotations", "info", "x", "}, {"]),
                           st.lists(st.one_of(st.dictionaries(st.text(max_size=3), json_values, max_size=4),
                                              json_values), max_size=6), min_size=1),
       extra=st.dictionaries(st.text(max_size=4), json_values, max_size=3),
       indent=st.sampled_from([None, 0, 2]), block_size=st.integers(1, 300))
def test_stream_any_json_any_block_size(doc: dict, extra: dict, indent: int | None, block_size: int) -> None:
    """For any JSON object, every block size yields exactly the array elements ``json.loads`` sees."""
    doc = {**extra, **doc}
    raw = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    expected = json.loads(raw)
    got: dict[str, list[Any]] = {}

    def collect(run: Elements) -> None:
        got.setdefault(run.key, []).extend(run.items)
        assert all(1 <= run.line_of(j) <= raw.count(b"\n") + 1 for j in range(len(run.items)))

    keys = [k for k, v in expected.items() if isinstance(v, list)]
    with alarm(TIME_LIMIT_S):
        stream_arrays(io.BytesIO(raw), "f.json", dict.fromkeys(keys, msgspec.json.Decoder(list[Any])), collect,
                      block_size=block_size)
    assert {k: v for k, v in got.items()} == {k: expected[k] for k in keys if expected[k]}


# ----------------------------------------------------------------------------------------------------------
# YOLO
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def yolo_root(scratch: Path) -> Path:
    """Two real images; their label files are rewritten by each example."""
    root = scratch / "yolo"
    write_image(root / "images" / "a.jpg", 120, 80)
    write_image(root / "images" / "b.png", 64, 96)
    (root / "labels").mkdir(parents=True)
    return root


garbage_line = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(["0", "1", "-1", "0.5", "1.0", "1.5", "0.0", "nan", "inf", "-inf", "1e-9", "2e308",
                              "x", "0x1", "1_0", "½", "٣", "", "\x00", "0.5,"]),
             max_size=9).map(" ".join).map(str.encode),
    st.tuples(st.integers(0, 79), *[st.floats(-0.2, 1.2)] * 4).map(lambda t: " ".join(map(str, t)).encode()),
)
good_line = st.tuples(st.integers(0, 79), st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.01, 0.1),
                      st.floats(0.01, 0.1)).map(lambda t: yolo_line(t[0], [t[1], t[2], t[3], t[4]], 1, 1).encode())


@fuzz(150)
@given(a=st.lists(st.one_of(good_line, garbage_line), max_size=12), b=st.lists(garbage_line, max_size=4),
       newline=st.sampled_from([b"\n", b"\r\n"]))
def test_yolo_garbage_lines(a: list[bytes], b: list[bytes], newline: bytes, yolo_root: Path) -> None:
    """Random label lines: every non-blank line is a box or a counted bad line; strict refuses iff any is bad."""
    labels = yolo_root / "labels"
    (labels / "a.txt").write_bytes(newline.join(a))
    (labels / "b.txt").write_bytes(newline.join(b))
    result = outcome(read_yolo, labels, cache=False)
    assert isinstance(result, BoxSet), result
    lines = [line for content in (a, b) for chunk in content for line in chunk.split(b"\n")]
    non_blank = sum(1 for line in lines if line.decode("utf-8", "replace").split())
    assert len(result) + result.skipped.get("bad_line", 0) + result.skipped.get("outside_box", 0) == non_blank
    strict = outcome(read_yolo, labels, cache=False, strict=True)
    assert isinstance(strict, DataError) == bool(result.skipped)
    if isinstance(strict, BoxSet):
        np.testing.assert_array_equal(strict.wh, result.wh)


@fuzz(60)
@given(content=st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"]).flatmap(
    lambda head: st.binary(max_size=32).map(lambda tail: head + tail))))
def test_yolo_broken_images(content: bytes, yolo_root: Path) -> None:
    """Random bytes as an image file: its boxes are skipped as an unreadable image, the others are read."""
    root = yolo_root.parent / "yolo-broken"
    write_image(root / "images" / "ok.jpg", 50, 40)
    (root / "images" / "bad.jpg").write_bytes(content)
    (root / "labels").mkdir(exist_ok=True)
    for stem in ("ok", "bad"):
        (root / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    result = outcome(read_yolo, root / "labels", cache=False)
    assert isinstance(result, BoxSet)
    assert result.skipped in ({"unreadable_image": 1}, {})  # random bytes might still make an image header
    assert len(result) == 2 - len(result.skipped)


# ----------------------------------------------------------------------------------------------------------
# Pascal VOC
# ----------------------------------------------------------------------------------------------------------

def voc_sample() -> bytes:
    d = load_slice("voc2007")
    im = d["images"][3]
    names = {c["id"]: c["name"] for c in d["categories"]}
    objects = [(names[a["category_id"]], a["bbox"][0] + 1, a["bbox"][1] + 1, a["bbox"][0] + a["bbox"][2],
                a["bbox"][1] + a["bbox"][3]) for a in d["annotations"] if a["image_id"] == im["id"]]
    return voc_xml(im["file_name"], (im["width"], im["height"]), objects).encode()


VOC = voc_sample()
XML_BITS = [b"<", b">", b"</", b"/>", b"&", b"&amp;", b"&#0;", b"<object>", b"</object>", b"<bndbox>", b"<xmin>",
            b"</xmax>", b"<size>", b"nan", b"-1e309", b"1e999", b"\xff", b"\xc3", b"<!--", b"<![CDATA[", b"<?xml",
            b"<!DOCTYPE a [<!ENTITY e 'x'>]>", b"&e;"]


@fuzz(200)
@given(data=st.data())
def test_voc_xml_corruption(data: st.DataObject, scratch: Path) -> None:
    """Random XML edits (truncation, byte flips, stray tags, bad numbers): sound boxes or a DataError."""
    raw = bytearray(VOC)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        edit = data.draw(st.sampled_from(["truncate", "flip", "delete", "insert", "number"]), label="edit")
        if edit == "truncate":
            del raw[at:]
        elif edit == "flip" and at < len(raw):
            raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif edit == "delete":
            del raw[at:at + data.draw(st.integers(1, 10), label="n")]
        elif edit == "insert":
            raw[at:at] = data.draw(st.sampled_from(XML_BITS), label="bit")
        else:
            raw[at:at] = str(data.draw(st.floats(), label="value")).encode()
    root = scratch / "voc"
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "x.xml").write_bytes(bytes(raw))
    (root / "Annotations" / "y.xml").write_bytes(VOC)
    result = outcome(read_voc, root)
    assert isinstance(result, BoxSet), result
    n_objects = VOC.count(b"<object>")
    assert n_objects <= len(result) <= n_objects + bytes(raw).count(b"<object")
