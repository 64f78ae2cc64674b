"""COCO detection JSON (``.json`` or ``.json.gz``): ``images`` with sizes, ``annotations`` with ``bbox``.

A gzip file is told by its first bytes, not its name (``DATA.JSON.GZ``, or a ``.json`` that is gzip).

Read as a stream (see :mod:`._json_stream`): memory stays bounded by the boxes kept, not the file.
Only ``images[].id/width/height/file_name`` and ``annotations[].id/image_id/bbox/iscrowd`` are read;
``bbox`` is ``[x, y, w, h]`` in pixels. Crowd regions (``iscrowd: 1``) are not objects and are left out.
"""

from __future__ import annotations

import gzip
import zlib
from contextlib import nullcontext
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources._files import SpecialFileError, open_regular
from lightning_autoanchor.sources._geometry import box_centres, clip_to_image
from lightning_autoanchor.sources._json_stream import Elements, stream_arrays
from lightning_autoanchor.sources._log import ReadLog

__all__ = ["read_coco"]

Id = int | str


class _Image(msgspec.Struct, gc=False):
    id: Id
    width: float | None = None
    height: float | None = None
    file_name: str | None = None


class _Annotation(msgspec.Struct, gc=False):
    image_id: Id
    bbox: tuple[float, float, float, float]
    id: Any = None  # only named in messages
    iscrowd: int | bool = 0


_BBOX, _ISCROWD = attrgetter("bbox"), attrgetter("iscrowd")
_DECODERS = {"images": msgspec.json.Decoder(list[_Image]), "annotations": msgspec.json.Decoder(list[_Annotation])}
_GZIP_MAGIC = b"\x1f\x8b"
_CODE_BASE = 1 << 62  # string ids (and huge integer ids) get integer codes from here on
_MIN_ID = -(1 << 63)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _salvage_image(raw: Any) -> _Image | None:
    """An image record with a usable id but mistyped other fields: keep it, without what is mistyped."""
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), int | str) or isinstance(raw.get("id"), bool):
        return None
    name = raw.get("file_name")
    return _Image(raw["id"], _number(raw.get("width")), _number(raw.get("height")),
                  name if isinstance(name, str) else None)


class _Collector:
    """Turns runs of decoded elements into columns, checking each record."""

    def __init__(self, path: str, log: ReadLog):
        self.path, self.log = path, log
        self.other_ids: dict[Id, int] = {}
        self.image_ids: list[np.ndarray] = []
        self.image_sizes: list[np.ndarray] = []
        self.image_names: list[str] = []
        self.box_image_ids: list[np.ndarray] = []
        self.box_positions: list[np.ndarray] = []  # index of each kept box in 'annotations', for messages
        self.boxes: list[np.ndarray] = []
        self.crowd = 0

    def code(self, value: Id) -> int:
        """An int64 code of an image id: the id itself for integers below ``_CODE_BASE``, else a new code.

        Strings never share a code with an integer (``"12"`` is not ``12``) nor with another string.
        """
        if type(value) is int and _MIN_ID <= value < _CODE_BASE:
            return value
        return self.other_ids.setdefault(value, _CODE_BASE + len(self.other_ids))

    def codes(self, values: list[Id]) -> np.ndarray:
        if not values:
            return np.zeros(0, np.int64)
        ids = np.array(values)  # integers only give an integer dtype; any string gives a string dtype
        if ids.dtype == np.int64 and ids.max() < _CODE_BASE:
            return ids
        return np.fromiter(map(self.code, values), np.int64, len(values))

    def __call__(self, run: Elements) -> None:
        if run.key == "images":
            self.add_images(run)
        else:
            self.add_annotations(run)

    def where(self, run: Elements, j: int) -> str:
        return f"{self.path}, line {run.line_of(j)}: {run.key}[{run.first + j}]"

    def add_images(self, run: Elements) -> None:
        items = run.items if run.typed else self.checked_images(run)
        if not items:
            return
        self.image_ids.append(self.codes([im.id for im in items]))
        sizes = np.array([(im.width, im.height) for im in items], dtype=np.float64)  # None -> nan
        self.image_sizes.append(sizes)
        self.image_names.extend(im.file_name if im.file_name is not None else str(im.id) for im in items)

    def checked_images(self, run: Elements) -> list[_Image]:
        out = []
        for j, raw in enumerate(run.items):
            try:
                out.append(msgspec.convert(raw, _Image))
            except msgspec.ValidationError as err:
                image = _salvage_image(raw)  # a mistyped size is then counted as a missing size
                if image is None:
                    self.log.problem("bad_record", self.where(run, j), f"not an image record: {err}")
                else:
                    out.append(image)
        return out

    def add_annotations(self, run: Elements) -> None:
        if run.typed:
            items, lines = run.items, None
        else:
            items, lines = self.checked_annotations(run)
        crowd = np.fromiter(map(bool, map(_ISCROWD, items)), bool, len(items))
        self.crowd += int(crowd.sum())
        with np.errstate(over="ignore"):  # beyond float32: inf, refused below
            bbox = np.fromiter(chain.from_iterable(map(_BBOX, items)), np.float64, 4 * len(items))
            bbox = bbox.reshape(-1, 4).astype(np.float32)
        image_ids = self.codes([a.image_id for a in items])
        positions = run.first + (np.arange(len(items)) if lines is None else np.array(lines, dtype=np.int64))
        bad = ~(np.isfinite(bbox).all(axis=1) & (bbox[:, 2:] > 0).all(axis=1)) & ~crowd
        rows = np.flatnonzero(bad)
        self.log.problems("bad_box", len(rows), [
            (self.where(run, j if lines is None else lines[j]),
             f"bbox {list(items[j].bbox)} (annotation id {items[j].id!r}) must be finite, with a positive width "
             "and height")
            for j in rows[:3]])
        keep = ~(bad | crowd)
        if not keep.all():
            bbox, image_ids, positions = bbox[keep], image_ids[keep], positions[keep]
        self.box_image_ids.append(image_ids)
        self.box_positions.append(positions)
        self.boxes.append(bbox)

    def checked_annotations(self, run: Elements) -> tuple[list[_Annotation], list[int]]:
        out, lines = [], []
        for j, raw in enumerate(run.items):
            bbox = raw.get("bbox") if isinstance(raw, dict) else None
            if isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
                raw = {**raw, "bbox": [float(v) for v in bbox]}  # keeps NaN/inf for the box check
            try:
                out.append(msgspec.convert(raw, _Annotation))
                lines.append(j)
            except msgspec.ValidationError as err:
                self.log.problem("bad_record", self.where(run, j), f"not a box annotation: {err}")
        return out, lines

    def box_set(self) -> BoxSet:
        if not self.image_ids:
            bad = self.log.counts["bad_record"]
            why = f" ({bad} records skipped as bad)" if bad else ""
            raise DataError(f"{self.path}: no image records in an 'images' list{why}; a COCO detection file "
                            "needs 'images' with id, width and height")
        ids = np.concatenate(self.image_ids)
        sizes = np.concatenate(self.image_sizes)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(dup):
            raise DataError(f"{self.path}: image id {self.name_of_id(sorted_ids[dup[0]])} appears more than once "
                            f"in 'images' ({len(dup)} duplicate ids); ids must be unique")
        box_ids = np.concatenate(self.box_image_ids) if self.boxes else np.zeros(0, np.int64)
        positions = np.concatenate(self.box_positions) if self.boxes else np.zeros(0, np.int64)
        boxes = np.concatenate(self.boxes) if self.boxes else np.zeros((0, 4), np.float32)
        self.box_image_ids, self.box_positions, self.boxes = [], [], []
        slot = np.searchsorted(sorted_ids, box_ids).clip(max=len(ids) - 1)
        known = sorted_ids[slot] == box_ids
        unknown = np.flatnonzero(~known)
        self.log.problems("unknown_image", len(unknown), [
            (f"{self.path}: annotations[{positions[j]}]",
             f"image_id {self.name_of_id(box_ids[j])} has no entry in 'images'") for j in unknown[:3]])
        del box_ids, positions
        index = order[slot]
        del slot
        missing = ~(np.isfinite(sizes).all(axis=1) & (sizes > 0).all(axis=1))
        rows = np.flatnonzero(missing)
        self.log.problems("missing_size", len(rows), [
            (self.path, f"image {self.image_names[i]} has width, height {sizes[i].tolist()}") for i in rows[:3]])
        sizes[missing] = 1.0  # stand-in size: these images keep no boxes
        keep = known & ~missing[index]
        if not keep.all():
            index, boxes = index[keep], boxes[keep]
        wh = clip_to_image(boxes, sizes, index, self.log, self.image_names)
        xy = box_centres(boxes, wh, sizes, index)
        del boxes
        kept = (wh > 0).all(axis=1)
        if not kept.all():
            wh, xy, index = wh[kept], xy[kept], index[kept]
        skipped = dict(self.log.counts)
        if self.crowd:
            skipped["crowd"] = self.crowd
        return BoxSet(image_sizes=sizes, wh=wh, image_index=index, image_names=tuple(self.image_names),
                      source=self.path, skipped=skipped, xy=xy)

    def name_of_id(self, code: int) -> str:
        if code >= _CODE_BASE:
            return repr(next(k for k, v in self.other_ids.items() if v == code))
        return str(int(code))


def read_coco(path: str | Path, *, strict: bool = False) -> BoxSet:
    """Read a COCO detection JSON file (``.json`` or gzip ``.json.gz``) into a :class:`BoxSet`.

    Bad records are skipped with a :class:`~lightning_autoanchor.sources.DataWarning` (see the README's
    data policy); with ``strict=True`` the first one raises :class:`DataError` instead. A file that is
    not JSON, is truncated, or repeats an image id raises :class:`DataError` naming the line.
    """
    path = Path(path)
    log = ReadLog(str(path), strict)
    collector = _Collector(str(path), log)
    try:
        with open_regular(str(path)) as raw:
            packed = raw.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") if packed else nullcontext(raw) as stream:
                stream_arrays(stream, str(path), _DECODERS, collector)
    except (OSError, EOFError, zlib.error) as err:  # missing file, FIFO, permission, corrupt or truncated gzip
        raise DataError(f"{path}: cannot read: {err.strerror if isinstance(err, SpecialFileError) else err}") from None
    box_set = collector.box_set()
    log.warn()
    return box_set

