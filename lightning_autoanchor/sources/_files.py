"""Per-file work of the folder readers (YOLO labels, images, VOC XML), run in worker processes.

This module imports neither torch nor the package's heavy modules, so worker processes start fast.
Every function returns plain data and a list of problems ``(kind, where, message)`` instead of
raising, so one bad file never stops the read. Files are opened with :func:`open_regular`, which
never blocks: a FIFO (or a socket or device) in a dataset folder is reported, not read.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

__all__ = ["Problem", "SpecialFileError", "file_stats", "image_size", "open_regular", "read_voc_xml",
           "read_yolo_label"]

Problem = tuple[str, str, str]

_EXIF_ORIENTATION = 0x0112
_MAX_SIDE = float(np.finfo(np.float32).max)  # box sizes are kept in float32
_MAX_PROBLEMS_PER_FILE = 3


_NOT_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


class SpecialFileError(OSError):
    """A path names a FIFO, socket or device, not a regular file; reading it could block forever."""


def open_regular(path: str) -> IO[bytes]:
    """Open a regular file for reading (binary); raise :class:`SpecialFileError` for anything else.

    The file is opened without blocking (``O_NONBLOCK``: a FIFO would otherwise wait for a writer)
    and checked on the open descriptor, so nothing can swap it between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        if err.errno == errno.ENXIO:  # opening a socket
            raise SpecialFileError(errno.ENXIO, "not a regular file but a socket", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _NOT_FILES.get(stat.S_IFMT(mode), "not a file")
            raise SpecialFileError(errno.EINVAL, f"not a regular file but {kind}", path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def image_size(path: str) -> tuple[float, float]:
    """Width and height of an image as it is displayed (EXIF rotation applied), from its header only.

    Raises ``OSError`` (or a subclass; :class:`SpecialFileError` for a FIFO, socket or device) when
    the file is missing or not a readable image.
    """
    with open_regular(path) as f, _open_image(f) as im:
        w, h = im.size
        if im.format in ("JPEG", "MPO", "TIFF", "WEBP"):  # PNG would decode the whole image
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                w, h = h, w
    if w <= 0 or h <= 0:
        raise OSError(f"image header gives size {w}x{h}")
    return float(w), float(h)


def _open_image(f: IO[bytes]) -> Any:
    """``PIL.Image.open`` without its decompression-bomb limit: only the header is read, never the pixels."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(f)
        except Image.DecompressionBombError:  # very large images (aerial, medical) are fine here
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                f.seek(0)
                return Image.open(f)
            finally:
                Image.MAX_IMAGE_PIXELS = limit


def read_yolo_label(label_path: str, image_path: str | None) -> tuple[tuple[float, float] | None, np.ndarray,
                                                                       list[Problem]]:
    """Read one YOLO label file and the size of its image.

    Each line is ``class x_center y_center width height`` (normalised to ``[0, 1]``), or
    ``class x1 y1 x2 y2 ...`` (a polygon, whose bounding box is used). Returns the image size
    (``None`` if it cannot be read: then the boxes are not used), an ``(n, 4)`` float64 array of
    normalised ``[x_center, y_center, w, h]``, and the problems found.
    """
    problems: list[Problem] = []
    size = None
    if image_path is None:
        problems.append(("unreadable_image", label_path, "no image with this name was found beside or "
                                                         "in the matching 'images' folder"))
    else:
        try:
            size = image_size(image_path)
        except SpecialFileError as err:
            problems.append(("special_file", image_path, err.strerror))
        except Exception as err:  # PIL raises many kinds for broken files
            problems.append(("unreadable_image", image_path, f"cannot read the image size: {err}"))
    boxes: list[list[float]] = []
    try:
        with open_regular(label_path) as f:
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return size, np.zeros((0, 4)), problems  # a background image without a label file
    except SpecialFileError as err:
        problems.append(("special_file", label_path, err.strerror))
        return size, np.zeros((0, 4)), problems
    except OSError as err:
        problems.append(("unreadable_file", label_path, f"cannot read: {err}"))
        return size, np.zeros((0, 4)), problems
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        box, why = _parse_label_line(fields)
        if box is None:
            if len(problems) < _MAX_PROBLEMS_PER_FILE:
                problems.append(("bad_line", f"{label_path}, line {number}", f"{why}: {line.strip()[:80]!r}"))
            else:
                problems.append(("bad_line", "", ""))  # counted, not shown
            continue
        boxes.append(box)
    return size, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), problems


def _parse_label_line(fields: list[str]) -> tuple[list[float] | None, str]:
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return None, f"{len(fields)} fields (expected 'class x y w h' or a polygon 'class x1 y1 x2 y2 ...')"
    try:
        values = [float(v) for v in fields[1:]]
        cls = float(fields[0])
    except ValueError:
        return None, "not a number"
    if not 0.0 <= cls < float("inf"):  # also rejects nan
        return None, "the class must be a non-negative number"
    if not all(0.0 <= v <= 1.0 for v in values):  # also rejects nan
        return None, "coordinates must be normalised to [0, 1]"
    if len(fields) == 5:
        xc, yc, w, h = values
        if not (w > 0 and h > 0):
            return None, "width and height must be positive"
        return [xc, yc, w, h], ""
    xs, ys = values[0::2], values[1::2]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    if not (w > 0 and h > 0):
        return None, "polygon has no area"
    return [(max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2, w, h], ""


def read_voc_xml(xml_path: str, images_dir: str | None) -> tuple[tuple[float, float] | None, str, np.ndarray,
                                                                  list[Problem]]:
    """Read one Pascal VOC XML file.

    Returns the image size (from ``<size>``, else from the image file in ``images_dir``; ``None`` if
    neither works), the image file name, an ``(n, 4)`` float64 array of box centres, widths and heights
    ``[x, y, w, h]`` in pixels (VOC corners are 1-based and inclusive: pixel ``xmin`` spans
    ``[xmin - 1, xmin]``, so ``w = xmax - xmin + 1`` and ``x = (xmin - 1 + xmax) / 2``; of the clipped box
    for boxes reaching outside the image), and the problems found.
    """
    problems: list[Problem] = []
    try:
        with open_regular(xml_path) as f:
            root = ET.parse(f).getroot()
    except SpecialFileError as err:
        return None, os.path.basename(xml_path), np.zeros((0, 2)), [("special_file", xml_path, err.strerror)]
    except (ET.ParseError, OSError, UnicodeDecodeError) as err:
        problem = ("unreadable_file", xml_path, f"cannot parse: {err}")
        return None, os.path.basename(xml_path), np.zeros((0, 4)), [problem]
    name = (root.findtext("filename") or "").strip() or os.path.splitext(os.path.basename(xml_path))[0] + ".jpg"
    size = None
    try:
        w, h = float(root.findtext("size/width", "")), float(root.findtext("size/height", ""))
        if w > 0 and h > 0 and np.isfinite([w, h]).all():
            size = (w, h)
    except ValueError:
        pass
    if size is None:
        image_path = os.path.join(images_dir, name) if images_dir else None
        try:
            if image_path is None:
                raise OSError("no image folder")
            size = image_size(image_path)
        except SpecialFileError as err:
            problems.append(("special_file", image_path, err.strerror))
        except Exception as err:
            problems.append(("missing_size", xml_path, f"no usable <size> and the image cannot be read ({err})"))
    boxes = []
    for i, obj in enumerate(root.iter("object"), start=1):
        where = f"{xml_path}, object {i} ({(obj.findtext('name') or '?').strip()})"
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}", "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            problems.append(("bad_record", where, "<bndbox> needs numeric xmin, ymin, xmax, ymax"))
            continue
        w, h = xmax - xmin + 1, ymax - ymin + 1
        if not (0 < w <= _MAX_SIDE and 0 < h <= _MAX_SIDE):  # also rejects nan
            problems.append(("bad_box", where, f"corners {xmin, ymin, xmax, ymax} give no positive, finite size"))
            continue
        if size is not None and (xmin < 0 or ymin < 0 or xmax > size[0] + 1 or ymax > size[1] + 1):
            xmin, ymin, xmax, ymax = max(xmin, 1), max(ymin, 1), min(xmax, size[0]), min(ymax, size[1])
            w, h = xmax - xmin + 1, ymax - ymin + 1
            if w <= 0 or h <= 0:
                problems.append(("outside_box", where, f"box lies outside the {size[0]:g}x{size[1]:g} image"))
                continue
            problems.append(("clipped_box", where, f"box reaches outside the {size[0]:g}x{size[1]:g} image"))
        boxes.append(((xmin - 1 + xmax) / 2, (ymin - 1 + ymax) / 2, w, h))
    return size, name, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), problems


def file_stats(paths: Sequence[str]) -> list[tuple[int, int]]:
    """``(modification time in ns, size in bytes)`` of each file; ``(-1, -1)`` where it cannot be looked at."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
            stats.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append((-1, -1))
    return stats
