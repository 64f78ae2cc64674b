"""Readers of annotation formats into a :class:`~lightning_autoanchor.boxes.BoxSet`.

:func:`load_boxes` picks the reader from the path: a ``.json`` / ``.json.gz`` file is COCO, a
``.yaml`` / ``.yml`` file an Ultralytics dataset YAML, a folder of ``.xml`` files (or a VOC year
folder) Pascal VOC, a folder of ``.txt`` files YOLO labels.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.sources._log import PROBLEMS, DataWarning
from lightning_autoanchor.sources.coco import read_coco
from lightning_autoanchor.sources.voc import read_voc
from lightning_autoanchor.sources.yolo import read_yolo

__all__ = ["PROBLEMS", "DataWarning", "load_boxes", "read_coco", "read_voc", "read_yolo"]


def _folder_kind(path: Path) -> str | None:
    if (path / "Annotations").is_dir():
        return "voc"
    for _, _, files in os.walk(path):
        names = [f.lower() for f in files]
        if any(f.endswith(".xml") for f in names):
            return "voc"
        if any(f.endswith(".txt") and f != "classes.txt" for f in names):
            return "yolo"
    return None


def load_boxes(path: str | Path, *, split: str | None = None, strict: bool = False, progress: bool = False) -> BoxSet:
    """Read the boxes of an annotation file or folder, whatever its format (see module doc).

    Args:
        path: COCO JSON, Ultralytics dataset YAML, VOC folder or YOLO labels folder.
        split: for a dataset YAML, the split to read (default ``train``); for a VOC year folder, the
            ``ImageSets/Main`` list to read (default: every XML file).
        strict: refuse bad records instead of skipping them with a :class:`DataWarning`.
        progress: show a progress bar on a terminal for large folders.

    Raises:
        DataError: the path does not exist, its format is not recognised, or it cannot be read.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and (name.endswith(".json") or name.endswith(".json.gz")):
        return read_coco(path, strict=strict)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return read_yolo(path, split=split or "train", strict=strict, progress=progress)
    if path.is_dir():
        kind = _folder_kind(path)
        if kind == "voc":
            return read_voc(path, split=split, strict=strict, progress=progress)
        if kind == "yolo":
            return read_yolo(path, strict=strict, progress=progress)
    raise DataError(f"{path}: not a recognised annotation source; give a COCO .json/.json.gz file, an "
                    "Ultralytics dataset .yaml, a folder of Pascal VOC .xml files or a folder of YOLO .txt labels")
