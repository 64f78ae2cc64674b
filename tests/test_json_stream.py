"""The streaming reader of top-level JSON arrays under COCO files, at every block boundary."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources import read_coco
from lightning_autoanchor.sources._json_stream import Elements, stream_arrays
from lightning_autoanchor.sources._log import ReadLog
from lightning_autoanchor.sources.coco import _DECODERS, _Collector

from .conftest import load_slice, read_warned, same_box_sets

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
