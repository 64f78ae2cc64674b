"""Pascal VOC XML annotations: one XML file per image with ``<size>`` and ``<object><bndbox>``.

``path`` is a folder of XML files, or a VOC year folder (``VOC2007/``) holding ``Annotations/``
(with ``ImageSets/Main/<split>.txt`` naming the images of a split, when a split is asked for).
Image sizes come from ``<size>``; when it is missing or zero, from the image file's header in
``JPEGImages/``. Corners are 1-based and inclusive, so a box is ``xmax - xmin + 1`` pixels wide.
Objects marked ``difficult`` are kept: they are objects of the dataset all the same.
"""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path

import numpy as np

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.progress import progress_bar
from lightning_autoanchor.sources._files import read_voc_xml
from lightning_autoanchor.sources._log import ReadLog
from lightning_autoanchor.sources._workers import map_files

__all__ = ["read_voc"]


def _xml_files(path: Path, split: str | None) -> tuple[list[str], str | None]:
    annotations = path / "Annotations" if (path / "Annotations").is_dir() else path
    images_dir = annotations.parent / "JPEGImages"
    if split is not None:
        listing = annotations.parent / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"{path}: no split list {listing} for split '{split}'")
        try:
            text = listing.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{listing}: cannot read the split list: {err}") from None
        ids = [line.split()[0] for line in text.splitlines() if line.strip()]
        files = [str(annotations / f"{i}.xml") for i in ids]
    else:
        try:
            names = os.listdir(annotations)
        except OSError as err:
            raise DataError(f"{annotations}: cannot list the folder: {err.strerror or err}") from None
        files = sorted(str(annotations / name) for name in names if name.lower().endswith(".xml"))
    if not files:
        raise DataError(f"{path}: no .xml annotation files found")
    return files, str(images_dir) if images_dir.is_dir() else None


def read_voc(path: str | Path, *, split: str | None = None, strict: bool = False, workers: int | None = None,
             progress: bool = False) -> BoxSet:
    """Read a folder of Pascal VOC XML files into a :class:`BoxSet`.

    Args:
        path: a folder of XML files, or a VOC year folder with ``Annotations/``.
        split: read only the images listed in ``ImageSets/Main/<split>.txt`` (default: all files).
        strict: refuse any bad file or object instead of skipping it with a warning.
        workers: processes parsing files (default: all cores, for 2,000 files or more).
        progress: show a progress bar on a terminal.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder of VOC XML files")
    files, images_dir = _xml_files(path, split)
    log = ReadLog(str(path), strict)
    sizes = np.full((len(files), 2), np.nan)
    names: list[str] = []
    xywh: list[np.ndarray] = []
    index: list[np.ndarray] = []
    with closing(map_files(read_voc_xml, [(f, images_dir) for f in files], workers=workers)) as results:
        bar = progress_bar(results, desc="Reading XML", enabled=progress, total=len(files), unit="file")
        for i, (size, name, boxes, problems) in enumerate(bar):
            names.append(name)
            for kind, where, message in problems:
                log.problem(kind, where, message)
            if size is None:
                continue
            sizes[i] = size
            xywh.append(boxes)
            index.append(np.full(len(boxes), i, dtype=np.int64))
    log.warn()
    sizes = np.where(np.isfinite(sizes), sizes, 1.0)  # stand-in size: unreadable files keep no boxes
    rows = np.concatenate(xywh) if xywh else np.zeros((0, 4))
    return BoxSet(image_sizes=sizes, wh=rows[:, 2:], xy=rows[:, :2],
                  image_index=np.concatenate(index) if index else np.zeros(0, np.int64),
                  image_names=tuple(names), source=str(path), skipped=dict(log.counts))
