"""YOLO txt labels: an Ultralytics-style dataset YAML, or a folder of label files.

Each label file holds one object per line, ``class x_center y_center width height``, normalised
by the image size. Image sizes come from the image files' headers (no pixel is decoded; EXIF
rotation is applied), read in parallel worker processes for large sets and cached in a small file
keyed by the paths, sizes and modification times of every image and label file, so a second read
of an unchanged dataset only lists the folders.

Label paths follow Ultralytics: ``.../images/.../x.jpg`` has its labels in ``.../labels/.../x.txt``;
images outside an ``images`` folder have ``x.txt`` beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import closing
from pathlib import Path

import numpy as np
import yaml

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import DataError
from lightning_autoanchor.progress import progress_bar
from lightning_autoanchor.sources._files import file_stats, read_yolo_label
from lightning_autoanchor.sources._geometry import box_centres, clip_to_image
from lightning_autoanchor.sources._log import ReadLog
from lightning_autoanchor.sources._workers import map_files

__all__ = ["CACHE_VERSION", "IMAGE_SUFFIXES", "label_path", "read_yolo"]

IMAGE_SUFFIXES = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm")
CACHE_VERSION = 1

_STAT_TASK_SIZE = 10_000
_PARALLEL_MIN_STATS = 50_000
_IMAGES_DIR, _LABELS_DIR = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"


def _walk(root: str, suffixes: tuple[str, ...], log: ReadLog) -> list[str]:
    """Files under ``root`` (recursively) whose name ends in one of ``suffixes``, sorted.

    Symbolic links to folders are followed, but no folder is listed twice (folders are told apart by
    device and inode), so a link back up the tree ends the walk rather than looping. A folder that
    cannot be listed is an ``unreadable_file`` problem.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name, reverse=True)  # depth first, in name order
        except OSError as err:
            log.problem("unreadable_file", folder, f"cannot list the folder: {err.strerror or err}")
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:  # e.g. a link to itself: not a folder; reading it says why
                is_dir = False
            if is_dir:
                stack.append(entry.path)
            elif entry.name.lower().endswith(suffixes):
                found.append(entry.path)
    return sorted(found)


def label_path(image_path: str) -> str:
    """The label file of an image, as Ultralytics finds it."""
    head, images, tail = image_path.rpartition(_IMAGES_DIR)
    return os.path.splitext(head + _LABELS_DIR + tail if images else image_path)[0] + ".txt"


def _split_images(yaml_path: Path, split: str, log: ReadLog) -> list[str]:
    """Image paths of ``split`` in an Ultralytics dataset YAML."""
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"{yaml_path}: cannot read the dataset YAML: {err}") from None
    if not isinstance(config, dict) or split not in config:
        keys = sorted(config) if isinstance(config, dict) else []
        raise DataError(f"{yaml_path}: no '{split}' entry (the dataset YAML has {keys}); "
                        f"name the split with --split")
    if not isinstance(config.get("path") or ".", str):
        raise DataError(f"{yaml_path}: 'path' must be a folder name, got {config['path']!r}")
    root = Path(config.get("path") or ".")
    if not root.is_absolute():
        root = (yaml_path.parent / root) if (yaml_path.parent / root).exists() else root.resolve()
    entries = config[split] if isinstance(config[split], list) else [config[split]]
    images: list[str] = []
    for entry in entries:
        where = root / str(entry)
        if where.is_dir():
            images.extend(_walk(str(where), IMAGE_SUFFIXES, log))
        elif where.is_file() and where.suffix == ".txt":
            try:
                listing = where.read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise DataError(f"{yaml_path}: cannot read the '{split}' list {where}: {err.strerror or err}") from None
            for line in listing.splitlines():
                line = line.strip()
                if line:
                    p = Path(line)
                    images.append(str(p if p.is_absolute() else (where.parent / p if line.startswith("./")
                                                                  else root / p)))
        else:
            raise DataError(f"{yaml_path}: '{split}' entry {entry!r} is neither a folder of images nor a .txt "
                            f"list of images (looked for {where})")
    return images


def _label_folder_pairs(labels_dir: Path, log: ReadLog) -> list[tuple[str, str | None]]:
    """(label file, image file) pairs of a folder of label files; images are looked up by name in the
    mirrored ``images`` folder and beside the labels."""
    labels = [p for p in _walk(str(labels_dir), (".txt",), log) if os.path.basename(p) != "classes.txt"]
    if not labels:
        raise DataError(f"{labels_dir}: no .txt label files found")
    search = [str(labels_dir)]
    parts = labels_dir.resolve().parts
    if "labels" in parts:
        i = len(parts) - 1 - parts[::-1].index("labels")
        search.insert(0, str(Path(*parts[:i], "images", *parts[i + 1:])))
    stems: dict[str, str] = {}
    for folder in reversed(search):
        if os.path.isdir(folder):
            for p in _walk(folder, IMAGE_SUFFIXES, log):
                stems[os.path.splitext(os.path.relpath(p, folder))[0]] = p
    return [(lb, stems.get(os.path.splitext(os.path.relpath(lb, labels_dir))[0])) for lb in labels]


def _cache_file(source: Path, split: str, key: str) -> Path:
    """The cache beside the dataset when writable, else in the user's cache folder."""
    name = f".{source.name}.{split}.autoanchor-cache.npz"
    beside = source.parent / name
    if os.access(source.parent, os.W_OK):
        return beside
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning-autoanchor"
    return base / f"{hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]}-{name[1:]}"


def _cache_key(pairs: list[tuple[str, str | None]]) -> str:
    """Hash of every label and image path with its modification time and size."""
    labels = [label for label, _ in pairs]
    images = [image or "" for _, image in pairs]
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for paths in (labels, images):
        h.update("\n".join(paths).encode("utf-8", "surrogateescape") + b"\0")
    h.update(_file_stats(labels + [image for image in images if image]).tobytes())
    return h.hexdigest()


def _file_stats(paths: list[str], workers: int | None = None) -> np.ndarray:
    """``(len(paths), 2)`` int64 modification times (ns) and sizes, ``-1`` where a file cannot be looked
    at; in forked worker processes for 50,000 files or more (each look costs microseconds in the kernel)."""
    chunks = [(paths[i:i + _STAT_TASK_SIZE],) for i in range(0, len(paths), _STAT_TASK_SIZE)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(paths) >= _PARALLEL_MIN_STATS else 1
    stats = [st for chunk in map_files(file_stats, chunks, workers=workers) for st in chunk]
    return np.array(stats, dtype=np.int64).reshape(-1, 2)


def _load_cache(path: Path, key: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in z.files}
    except (OSError, KeyError, ValueError):
        return None


def _save_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically; a cache that cannot be written is not an error, and leaves no temporary file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise


def read_yolo(path: str | Path, *, split: str = "train", strict: bool = False, cache: bool = True,
              workers: int | None = None, progress: bool = False) -> BoxSet:
    """Read YOLO labels into a :class:`BoxSet`.

    Args:
        path: an Ultralytics dataset YAML (its ``split`` entry is read), a folder of label files, or a
            dataset folder with a ``labels`` folder in it (all its label files are read).
        split: the YAML entry to read (``train``, ``val``, ``test``).
        strict: refuse any bad line, image or file instead of skipping it with a warning.
        cache: reuse (and write) the cache of image sizes and labels.
        workers: processes reading files (default: all cores, for 2,000 files or more).
        progress: show a progress bar on a terminal.
    """
    path = Path(path)
    log = ReadLog(str(path), strict)  # problems found while listing files; those of reading them are cached
    if path.suffix.lower() in (".yaml", ".yml"):
        pairs = [(label_path(im), im) for im in _split_images(path, split, log)]
        if not pairs:
            raise DataError(f"{path}: the '{split}' split lists no images")
    elif path.is_dir():  # a dataset folder holding labels/ (and images/) stands for all its labels
        nested = path / "labels"
        pairs = _label_folder_pairs(nested if nested.is_dir() and path.name != "labels" else path, log)
        split = "labels"
    else:
        raise DataError(f"{path}: not a dataset YAML nor a folder of YOLO label files")
    key = _cache_key(pairs)
    cache_path = _cache_file(path, split, key)
    cached = _load_cache(cache_path, key) if cache and not strict else None
    if cached is None:
        cached = _read_pairs(pairs, ReadLog(str(path), strict), workers, progress)
        if cache:
            _save_cache(cache_path, key=np.array(key), **cached)
    log_state = json.loads(str(cached["log"]))
    for kind, count in log_state["counts"].items():
        log.problems(kind, count, [tuple(e) for e in log_state["examples"][kind]])
    sizes, boxes, index = cached["sizes"], cached["boxes"], cached["index"]
    names = tuple(str(cached["names"]).split("\n")) if len(sizes) else ()
    usable = np.isfinite(sizes).all(axis=1)
    sizes = np.where(usable[:, None], sizes, 1.0)  # stand-in size: unreadable images keep no boxes
    pixels = boxes * np.tile(sizes[index], 2)
    pixels[:, :2] -= pixels[:, 2:] / 2  # centre -> top-left corner
    pixels = pixels.astype(np.float32)
    wh = clip_to_image(pixels, sizes, index, log, names)
    xy = box_centres(pixels, wh, sizes, index)
    kept = (wh > 0).all(axis=1)
    log.warn()
    return BoxSet(image_sizes=sizes, wh=wh[kept], image_index=index[kept], image_names=names, source=str(path),
                  skipped=dict(log.counts), xy=xy[kept])


def _read_pairs(pairs: list[tuple[str, str | None]], log: ReadLog, workers: int | None,
                progress: bool) -> dict[str, np.ndarray]:
    """Read every (label, image) pair: sizes ``(M, 2)`` (nan if unreadable), normalised boxes ``(N, 4)``,
    their image ``index`` ``(N,)``, image ``names`` and the problems found, as cacheable arrays."""
    sizes = np.full((len(pairs), 2), np.nan)
    boxes: list[np.ndarray] = []
    index: list[np.ndarray] = []
    examples: dict[str, list[tuple[str, str]]] = {}  # the first few of each kind, kept for the cache
    with closing(map_files(read_yolo_label, pairs, workers=workers)) as results:
        bar = progress_bar(results, desc="Reading labels", enabled=progress, total=len(pairs), unit="file")
        for i, (size, file_boxes, problems) in enumerate(bar):
            for kind, where, message in problems:
                if where:
                    log.problem(kind, where, message)  # raises when strict
                    shown = examples.setdefault(kind, [])
                    if len(shown) < 3:
                        shown.append((where, message))
                else:
                    log.counts[kind] += 1
            if size is None:
                continue
            sizes[i] = size
            boxes.append(file_boxes)
            index.append(np.full(len(file_boxes), i, dtype=np.int64))
    names = "\n".join((image or label) for label, image in pairs)
    return {
        "sizes": sizes,
        "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        "index": np.concatenate(index) if index else np.zeros(0, np.int64),
        "names": np.array(names),
        "log": np.array(json.dumps({"counts": dict(log.counts), "examples": examples})),
    }
