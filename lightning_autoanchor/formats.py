"""Anchors as the config text of detection frameworks: YOLOv5/YOLOv7 model YAML, MMDetection / MMYOLO,
darknet cfg, and torchvision's ``AnchorGenerator`` arguments.

Each writer takes the anchors per level, a ``(levels, per_level, 2)`` tensor (or a sequence of ``(n_l, 2)``
tensors, one per level) of widths and heights in pixels at the training size, in the head's level order,
with the stride of each level in pixels, and returns text to paste into that framework's config, with
``comments`` as comment lines on top. :func:`export_anchors` picks the writer by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.levels import Levels, default_strides, level_counts

__all__ = [
    "FORMATS",
    "anchors_per_level",
    "anchors_yaml",
    "darknet_cfg",
    "export_anchors",
    "mmdet_prior_generator",
    "torchvision_anchor_generator",
    "torchvision_grid",
    "yolo_number",
    "yolo_yaml",
]

FORMATS = ("yolov5", "mmdet", "darknet", "torchvision")
"""Names :func:`export_anchors` (and the CLI's ``--format``) accepts."""


def anchors_per_level(anchors: Tensor, levels: Levels) -> list[Tensor]:
    """Split anchors sorted by area into ``levels`` equal groups, or groups of the given counts, small to large."""
    if isinstance(levels, int) and (levels < 1 or len(anchors) % levels):
        raise ConfigError(f"{len(anchors)} anchors cannot be split evenly over {levels} levels")
    return list(anchors.split(list(level_counts(len(anchors), levels))))


def yolo_number(value: float) -> str:
    """Whole pixels as YOLO configs write anchors; one decimal under 10 px, where whole pixels are too coarse."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _level_name(index: int, stride: float) -> str:
    """``P3/8`` for stride 8 (the level's downsampling power of two), else ``level 0/12``."""
    power = math.log2(stride) if stride > 0 else 0.5
    return f"P{int(power)}/{stride:g}" if power == int(power) else f"level {index}/{stride:g}"


def anchors_yaml(anchors: Tensor, levels: Levels, *, strides: Sequence[float] | None = None,
                 comments: Sequence[str] = ()) -> str:
    """The ``anchors:`` block of a YOLO model config, one row per level, with ``comments`` on top.

    ``levels``: a number of levels with equal counts, or the count of each level (small to large).

    >>> print(anchors_yaml(torch.tensor([[10., 13], [16, 30], [33, 23]]), 1))
    anchors:
      - [10,13, 16,30, 33,23]  # P3/8
    <BLANKLINE>
    """
    n_levels = levels if isinstance(levels, int) else len(levels)
    strides = list(strides) if strides is not None else default_strides(n_levels)
    if len(strides) != n_levels:
        raise ConfigError(f"{n_levels} levels need {n_levels} strides, got {strides}")
    lines = [f"# {c}" for c in comments] + ["anchors:"]
    for i, (level, stride) in enumerate(zip(anchors_per_level(anchors, levels), strides, strict=True)):
        pairs = ", ".join(f"{yolo_number(w)},{yolo_number(h)}" for w, h in level.tolist())
        lines.append(f"  - [{pairs}]  # {_level_name(i, stride)}")
    return "\n".join(lines) + "\n"


def _checked(anchors: Sequence[Tensor], strides: Sequence[float]) -> list[list[tuple[float, float]]]:
    """Per level, the anchors as ``(w, h)`` floats; refuses mismatched strides and non-positive sizes."""
    levels = [[(float(w), float(h)) for w, h in torch.as_tensor(level).reshape(-1, 2).tolist()] for level in anchors]
    if len(levels) != len(strides) or not levels:
        raise ConfigError(f"{len(levels)} levels of anchors need as many strides, got {list(strides)}")
    if any(not level for level in levels):
        raise ConfigError("every level needs at least one anchor")
    bad = [v for level in levels for wh in level for v in wh if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"anchor sizes must be positive and finite, got {bad[0]}")
    return levels


def _comment_lines(comments: Sequence[str], mark: str = "#") -> list[str]:
    return [f"{mark} {c}" for c in comments]


def yolo_yaml(anchors: Sequence[Tensor], strides: Sequence[float], comments: Sequence[str] = ()) -> str:
    """YOLOv5 / YOLOv7 model YAML: ``anchors:`` with one row of ``w,h`` pairs per level, in level order."""
    levels = _checked(anchors, strides)
    lines = [*_comment_lines(comments), "anchors:"]
    for i, (level, stride) in enumerate(zip(levels, strides, strict=True)):
        pairs = ", ".join(f"{yolo_number(w)},{yolo_number(h)}" for w, h in level)
        lines.append(f"  - [{pairs}]  # {_level_name(i, stride)}")
    return "\n".join(lines) + "\n"


def mmdet_prior_generator(anchors: Sequence[Tensor], strides: Sequence[float], comments: Sequence[str] = ()) -> str:
    """MMYOLO's ``prior_generator`` (``mmdet.YOLOAnchorGenerator``) for a YOLO head's config, in level order.

    MMDetection's own ``YOLOV3Head`` takes the same ``base_sizes`` and ``strides`` as
    ``anchor_generator=dict(type='YOLOAnchorGenerator', ...)``, with its levels in the order of its
    ``featmap_strides`` (``[32, 16, 8]`` in its configs): pass the anchors and strides in that order.
    """
    levels = _checked(anchors, strides)
    rows = [f"        [{', '.join(f'({yolo_number(w)}, {yolo_number(h)})' for w, h in level)}],  # {_level_name(i, s)}"
            for i, (level, s) in enumerate(zip(levels, strides, strict=True))]
    return "\n".join([
        *_comment_lines(comments),
        "prior_generator=dict(",
        "    type='mmdet.YOLOAnchorGenerator',",
        "    base_sizes=[",
        *rows,
        "    ],",
        f"    strides=[{', '.join(f'{s:g}' for s in strides)}])",
    ]) + "\n"


def darknet_cfg(anchors: Sequence[Tensor], strides: Sequence[float], comments: Sequence[str] = (),
                coarse_first: bool = True) -> str:
    """The ``mask=``, ``anchors=`` and ``num=`` lines of every ``[yolo]`` section of a darknet cfg.

    ``anchors=`` lists all pairs from the finest level to the coarsest (each level's in the given order);
    each ``[yolo]`` section's ``mask=`` picks its level's pairs by index. Sections come in the order they
    appear in the cfg: coarsest level first as in ``yolov3.cfg``, ``yolov3-tiny.cfg`` and ``yolov4-tiny.cfg``
    (``coarse_first=True``), finest first as in ``yolov4.cfg`` (``coarse_first=False``). Darknet reads
    anchors in pixels at the ``[net]`` ``width``/``height``.
    """
    levels = _checked(anchors, strides)
    fine_to_coarse = sorted(range(len(levels)), key=lambda i: strides[i])
    pairs: list[tuple[float, float]] = []
    masks: dict[int, list[int]] = {}
    for i in fine_to_coarse:
        masks[i] = list(range(len(pairs), len(pairs) + len(levels[i])))
        pairs.extend(levels[i])
    all_pairs = ",  ".join(f"{yolo_number(w)},{yolo_number(h)}" for w, h in pairs)
    lines = _comment_lines(comments)
    for i in reversed(fine_to_coarse) if coarse_first else fine_to_coarse:
        lines += ["", f"# the [yolo] section of stride {strides[i]:g} ({_level_name(i, strides[i])})", "[yolo]",
                  f"mask = {','.join(map(str, masks[i]))}", f"anchors = {all_pairs}", f"num = {len(pairs)}"]
    return "\n".join(lines).lstrip("\n") + "\n"


def torchvision_anchor_generator(sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                                 comments: Sequence[str] = ()) -> str:
    """torchvision's ``AnchorGenerator(sizes=..., aspect_ratios=...)`` arguments, one tuple per level.

    torchvision builds every level's anchors as all its ``sizes`` (square roots of the areas, pixels)
    times all its ``aspect_ratios`` (height / width): this writes such a grid; free ``(w, h)`` anchors
    are not one (see :func:`torchvision_grid`).
    """
    if len(sizes) != len(aspect_ratios) or not sizes:
        raise ConfigError(f"torchvision needs sizes and aspect ratios for every level, got {len(sizes)} levels of "
                          f"sizes and {len(aspect_ratios)} of aspect ratios")
    values = [v for level in (*sizes, *aspect_ratios) for v in level]
    if any(not level for level in (*sizes, *aspect_ratios)) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"every level needs positive finite sizes and aspect ratios, got {sizes}, {aspect_ratios}")

    def tuples(rows: Sequence[Sequence[float]]) -> str:
        return _python_tuple(_python_tuple(f"{v:.4g}" for v in row) for row in rows)

    return "\n".join([*_comment_lines(comments), "AnchorGenerator(", f"    sizes={tuples(sizes)},",
                      f"    aspect_ratios={tuples(aspect_ratios)},", ")"]) + "\n"


def _python_tuple(items: Iterable[str]) -> str:
    """``(a, b)``, or ``(a,)`` for one item: a tuple as Python writes it."""
    items = list(items)
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"


def torchvision_grid(anchors: Sequence[Tensor], tol: float = 1e-3) -> tuple[list[list[float]], list[list[float]]]:
    """Per level, the sizes and aspect ratios whose grid (all sizes x all ratios) is the level's anchors.

    Sizes and ratios within a relative ``tol`` (a difference of logs) count as equal.

    Raises:
        ConfigError: some level's anchors are free ``(w, h)`` pairs, not such a grid (e.g. anchors
            fitted for a YOLO head), so torchvision's ``AnchorGenerator`` cannot express them.
    """
    sizes, ratios = [], []
    for i, level in enumerate(anchors):
        log_wh = torch.as_tensor(level, dtype=torch.float64).reshape(-1, 2).log()
        log_size, log_ratio = log_wh.sum(dim=1) / 2, log_wh[:, 1] - log_wh[:, 0]
        level_sizes, level_ratios = _distinct(log_size, tol), _distinct(log_ratio, tol)
        grid = torch.cartesian_prod(torch.tensor(level_ratios), torch.tensor(level_sizes))  # (G, 2) ratio-major
        on_grid = (grid[:, None] - torch.stack([log_ratio, log_size], dim=1)[None]).abs().amax(dim=2) <= tol
        covered = len(grid) == len(log_wh) and bool(on_grid.any(dim=0).all() & on_grid.any(dim=1).all())
        if not covered:
            raise ConfigError(
                f"--format torchvision does not apply to these anchors: level {i} holds {len(log_wh)} free (w, h) "
                f"anchors, not every one of {len(level_sizes)} sizes x {len(level_ratios)} aspect ratios, which is "
                "all torchvision's AnchorGenerator can make; use a format of a head with free anchors "
                "(yolov5, mmdet, darknet), or fit the torchvision head's own sizes and aspect ratios")
        sizes.append([math.exp(v) for v in level_sizes])
        ratios.append([math.exp(v) for v in level_ratios])
    return sizes, ratios


def _distinct(values: Tensor, tol: float) -> list[float]:
    """Sorted values with those within ``tol`` of the previous kept one merged into it."""
    kept: list[float] = []
    for v in sorted(values.tolist()):
        if not kept or v - kept[-1] > tol:
            kept.append(v)
    return kept


def export_anchors(fmt: str, anchors: Sequence[Tensor], strides: Sequence[float],
                   comments: Sequence[str] = ()) -> str:
    """Anchors per level (pixels) and their strides as the config text of format ``fmt`` (see :data:`FORMATS`)."""
    if fmt == "yolov5":
        return yolo_yaml(anchors, strides, comments)
    if fmt == "mmdet":
        return mmdet_prior_generator(anchors, strides, comments)
    if fmt == "darknet":
        return darknet_cfg(anchors, strides, comments)
    if fmt == "torchvision":
        _checked(anchors, strides)
        return torchvision_anchor_generator(*torchvision_grid(anchors), comments=comments)
    raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
