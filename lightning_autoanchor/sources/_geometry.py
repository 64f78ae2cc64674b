"""Box checks shared by the readers: clip boxes to their image, count the ones that do not fit."""

from __future__ import annotations

import numpy as np

from lightning_autoanchor.sources._log import ReadLog


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
