"""Box checks shared by the readers: clip boxes to their image, count the ones that do not fit."""

from __future__ import annotations

import numpy as np

from lightning_autoanchor.sources._log import ReadLog

__all__ = ["box_centres", "clip_to_image"]


def clip_to_image(boxes: np.ndarray, sizes: np.ndarray, index: np.ndarray, log: ReadLog,
                  names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Widths and heights of boxes clipped to their image, 0 for boxes entirely outside.

    Args:
        boxes: ``(N, 4)`` float32 ``[x, y, w, h]`` in pixels (``x, y``: top-left corner).
        sizes: ``(M, 2)`` image widths and heights in pixels.
        index: ``(N,)`` the image of each box.
        log: where boxes reaching more than 1 px outside (clipped) or lying outside (dropped) are told.
        names: image names, for messages.

    Returns:
        ``(N, 2)`` float32; boxes within 1 px of their image keep their annotated size.
    """
    wh = boxes[:, 2:].copy()
    with np.errstate(over="ignore"):  # sizes or corners beyond float32: inf, which the minimum settles
        image_wh = sizes.astype(np.float32)[index]
        np.minimum(wh, image_wh - boxes[:, :2], out=wh)  # right / bottom edge
        np.minimum(wh, boxes[:, :2] + boxes[:, 2:], out=wh)  # left / top edge
    np.minimum(wh, image_wh, out=wh)
    np.maximum(wh, 0, out=wh)
    outside = ~(wh > 0).all(axis=1)
    clipped = ~outside & ((boxes[:, 2:] - wh) > 1.0).any(axis=1)
    for mask, kind, what in ((outside, "outside_box", "lies outside"), (clipped, "clipped_box", "reaches outside")):
        rows = np.flatnonzero(mask)
        log.problems(kind, len(rows), [(log.source, f"box {[round(float(v), 2) for v in boxes[j]]} {what} image "
                                                    f"{names[index[j]]} of size {sizes[index[j]].tolist()}")
                                       for j in rows[:3]])
    inside = ~(clipped | outside)
    wh[inside] = boxes[inside, 2:]
    return wh


def box_centres(boxes: np.ndarray, wh: np.ndarray, sizes: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Centres of boxes after :func:`clip_to_image`: of the clipped box where it was clipped.

    Args:
        boxes: ``(N, 4)`` float32 ``[x, y, w, h]`` in pixels, as given to :func:`clip_to_image`.
        wh: ``(N, 2)`` what :func:`clip_to_image` returned for them.
        sizes: ``(M, 2)`` image widths and heights in pixels.
        index: ``(N,)`` the image of each box.

    Returns:
        ``(N, 2)`` float32 centres in pixels; boxes that kept their annotated size keep their annotated centre.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # boxes beyond float32 are dropped as outside anyway
        xy = boxes[:, :2] + boxes[:, 2:] / 2
        clipped = np.flatnonzero((wh != boxes[:, 2:]).any(axis=1))
        if len(clipped):
            corner = boxes[clipped, :2]
            low = np.maximum(corner, 0)
            high = np.minimum(corner + boxes[clipped, 2:], sizes.astype(np.float32)[index[clipped]])
            xy[clipped] = (low + high) / 2
    return xy
