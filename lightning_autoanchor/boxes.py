"""Box sets: the widths and heights of a dataset's boxes as the network sees them in training.

A :class:`BoxSet` keeps each box's size in pixels of its original image together with the size of
that image, so it can be resized the way the training pipeline resizes images:

``"letterbox"`` (YOLOv5, default)
    each image is scaled so that its longer side equals ``img_size``; aspect ratios are kept.
``"stretch"`` (darknet YOLOv2/v3, torchvision-style square resize)
    each image side is scaled to ``img_size``; with ``img_size=1`` boxes are normalised by image size.

``img_size`` may also be a training size ``(W, H)`` that is not square. Then ``"letterbox"`` scales
each image (``w x h`` pixels) by ``min(W / w, H / h)``: the largest size at which it fits in
``W x H`` with its aspect ratio kept, padded to ``W x H`` (YOLOv5's ``letterbox(img, new_shape=(H, W))``
with ``scaleup=True``, MMYOLO's ``LetterResize(scale=(W, H))``); a square ``(S, S)`` is the same as
``S``. ``"stretch"`` scales the width by ``W / w`` and the height by ``H / h``.

A :class:`BoxSet` holds NumPy arrays and this module loads torch only when a function returns a
tensor, so the readers, which build box sets, and their worker processes never import torch.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lightning_autoanchor.errors import ConfigError, DataError
from lightning_autoanchor.settings import Resize

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "MIN_FIT_SIZE",
    "SMALL_BOX_SIZE",
    "BoxSet",
    "ImgSize",
    "SmallBoxes",
    "describe_img_size",
    "fit_mask",
    "log_bins",
    "training_size",
]

ImgSize = float | tuple[float, float]
"""A square training size in pixels, or a training size ``(width, height)``."""

MIN_FIT_SIZE = 2.0
"""The 2 px rule, as YOLOv5's AutoAnchor has it: boxes smaller than this (pixels at the training size)
on both sides are left out of fitting and scoring (no anchor can be learned for them), and no fitted
anchor side is smaller."""

_MAX_DENSE_CELLS = 1 << 24

SMALL_BOX_SIZE = 3.0
"""Boxes smaller than this (pixels at the training size) on either side are counted and reported."""


@dataclass(frozen=True, eq=False)
class BoxSet:
    """Boxes of a dataset and the sizes of their images.

    Attributes:
        image_sizes: ``(M, 2)`` float64, width and height of every image in pixels.
        wh: ``(N, 2)`` float32, width and height of every box in pixels of its own image.
        image_index: ``(N,)`` int64, the row of ``image_sizes`` each box belongs to.
        image_names: ``M`` names (file names or ids) of the images, for reports; may be empty.
        source: where the boxes were read from (a path or a description).
        skipped: counts of annotations the reader skipped, by reason (see the README's data policy).
        xy: ``(N, 2)`` float32, centre of every box in pixels of its own image (of the clipped box, for
            boxes the reader clipped to their image), or ``None`` where the source does not give them.
            Sizes alone serve the centred measures; the placed measure of IoU-matching heads needs centres.
    """

    image_sizes: np.ndarray
    wh: np.ndarray
    image_index: np.ndarray
    image_names: Sequence[str] = ()
    source: str = ""
    skipped: Mapping[str, int] = field(default_factory=dict)
    xy: np.ndarray | None = None

    def __post_init__(self) -> None:
        sizes = np.asarray(self.image_sizes, dtype=np.float64).reshape(-1, 2)
        wh = np.asarray(self.wh, dtype=np.float32).reshape(-1, 2)
        index = np.asarray(self.image_index, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "image_sizes", sizes)
        object.__setattr__(self, "wh", wh)
        object.__setattr__(self, "image_index", index)
        where = f" in {self.source}" if self.source else ""
        if len(index) != len(wh):
            raise DataError(f"box set{where}: {len(wh)} boxes but {len(index)} image indices")
        if self.image_names and len(self.image_names) != len(sizes):
            raise DataError(f"box set{where}: {len(sizes)} images but {len(self.image_names)} image names")
        if len(index) and (index.min() < 0 or index.max() >= len(sizes)):
            raise DataError(f"box set{where}: image index out of range for {len(sizes)} images")
        bad_sizes = ~(np.isfinite(sizes).all(1) & (sizes > 0).all(1))
        if bad_sizes.any():
            i = int(np.flatnonzero(bad_sizes)[0])
            raise DataError(f"box set{where}: image {self.image_name(i)} has size {sizes[i].tolist()}; "
                            "image sizes must be positive and finite")
        bad_boxes = ~(np.isfinite(wh).all(1) & (wh > 0).all(1))
        if bad_boxes.any():
            i = int(np.flatnonzero(bad_boxes)[0])
            raise DataError(f"box set{where}: box {i} of image {self.image_name(int(index[i]))} has size "
                            f"{wh[i].tolist()}; box sizes must be positive and finite")
        if self.xy is not None:
            xy = np.asarray(self.xy, dtype=np.float32)
            if xy.shape != wh.shape:
                raise DataError(f"box set{where}: {len(wh)} boxes but box centres of shape {xy.shape}; "
                                f"expected ({len(wh)}, 2)")
            bad_centres = ~np.isfinite(xy).all(1)
            if bad_centres.any():
                i = int(np.flatnonzero(bad_centres)[0])
                raise DataError(f"box set{where}: box {i} of image {self.image_name(int(index[i]))} has centre "
                                f"{xy[i].tolist()}; box centres must be finite")
            object.__setattr__(self, "xy", xy)

    @classmethod
    def from_normalized(cls, image_sizes: np.ndarray, wh_normalized: np.ndarray, image_index: np.ndarray,
                        xy_normalized: np.ndarray | None = None, **kwargs: object) -> BoxSet:
        """Build from box sizes (and centres, when given) as fractions of their image's width and height
        (YOLO labels)."""
        sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
        index = np.asarray(image_index, dtype=np.int64).reshape(-1)
        wh = np.asarray(wh_normalized, dtype=np.float64).reshape(-1, 2) * sizes[index]
        xy = None
        if xy_normalized is not None:
            xy = np.asarray(xy_normalized, dtype=np.float64).reshape(-1, 2) * sizes[index]
        return cls(sizes, wh, index, xy=xy, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def concat(cls, parts: Sequence[BoxSet], source: str = "") -> BoxSet:
        """Join box sets (e.g. several annotation files) into one; it has centres if every part has."""
        offsets = np.cumsum([0] + [len(p.image_sizes) for p in parts])
        names: list[str] = []
        if all(p.image_names for p in parts):
            for p in parts:
                names.extend(p.image_names)
        skipped: dict[str, int] = {}
        for p in parts:
            for k, v in p.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        return cls(
            image_sizes=np.concatenate([p.image_sizes for p in parts]) if parts else np.zeros((0, 2)),
            wh=np.concatenate([p.wh for p in parts]) if parts else np.zeros((0, 2)),
            image_index=np.concatenate([p.image_index + o for p, o in zip(parts, offsets[:-1], strict=True)]) if parts
            else np.zeros(0),
            image_names=tuple(names),
            source=source or " + ".join(p.source for p in parts),
            skipped=skipped,
            xy=np.concatenate([p.xy for p in parts]) if parts and all(p.xy is not None for p in parts) else None,
        )

    def __len__(self) -> int:
        return len(self.wh)

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    def image_name(self, i: int) -> str:
        """Name of image ``i`` for messages: its file name when known, else its index."""
        return str(self.image_names[i]) if self.image_names else f"#{i}"

    def image_scales(self, img_size: ImgSize, resize: Resize = "letterbox") -> np.ndarray:
        """``(M, 2)`` factors from original image pixels to pixels at the training size (see module doc)."""
        width, height = training_size(img_size)
        if resize == "letterbox":
            if width == height:
                return np.repeat(width / self.image_sizes.max(axis=1, keepdims=True), 2, axis=1)
            fit = np.minimum(width / self.image_sizes[:, :1], height / self.image_sizes[:, 1:])
            return np.repeat(fit, 2, axis=1)
        if resize == "stretch":
            return np.array([width, height]) / self.image_sizes
        raise ConfigError(f"resize must be 'letterbox' or 'stretch', got {resize!r}")

    def scaled(self, img_size: ImgSize, resize: Resize = "letterbox", scale_jitter: float = 0.0,
               seed: int = 0) -> Tensor:
        """Box sizes as the network sees them.

        Args:
            img_size: training image size (pixels; the longer side for ``"letterbox"``), or
                ``(width, height)`` (see module doc).
            resize: ``"letterbox"`` or ``"stretch"`` (see module doc).
            scale_jitter: each image is further scaled by a factor drawn uniformly from
                ``[1 - scale_jitter, 1 + scale_jitter]`` (YOLOv5's recall check uses 0.1). The factor
                belongs to the image, not to its place in the file: it is drawn from its name (see
                :meth:`image_uniforms`), so one dataset in any format or order gives the same numbers.
            seed: seed of the draw.

        Returns:
            ``(N, 2)`` float32 tensor of widths and heights in pixels at ``img_size``.
        """
        import torch

        return torch.from_numpy(self._scaled_array(img_size, resize, scale_jitter, seed))

    def _scaled_array(self, img_size: ImgSize, resize: Resize, scale_jitter: float = 0.0, seed: int = 0) -> np.ndarray:
        """:meth:`scaled` as an ``(N, 2)`` float32 NumPy array."""
        factors = self.image_scales(img_size, resize)
        if scale_jitter:
            if not 0.0 <= scale_jitter < 1.0:
                raise ConfigError(f"scale_jitter must be in [0, 1), got {scale_jitter}")
            factors = factors * (1 - scale_jitter + 2 * scale_jitter * self.image_uniforms(seed))[:, None]
        return (self.wh * factors[self.image_index]).astype(np.float32)

    def image_uniforms(self, seed: int = 0) -> np.ndarray:
        """``(M,)`` float64 numbers in ``[0, 1)``, one per image, that depend only on the image and ``seed``.

        An image is known by the stem of its file name (``a/b/000139.jpg`` -> ``000139``: a COCO
        ``file_name``, a YOLO image path, a VOC ``<filename>``, also after a conversion to PNG), or by
        its index when the box set has no names. The stem's CRC-32 is mixed with the seed by two rounds
        of SplitMix64's output function (the finaliser of Java's ``SplittableRandom``), whose top 53
        bits make the number. Only the stems and their CRC-32 take a loop over the names: 0.5-0.7 s per
        million on 2 busy cores, where a generator seeded per image (``default_rng([seed, crc])``)
        takes 22 s.
        """
        keys = _name_keys(self.image_names) if self.image_names else np.arange(self.num_images, dtype=np.uint64)
        mixed = _splitmix64(keys ^ _splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64)))
        return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def small_boxes(self, img_size: ImgSize, resize: Resize = "letterbox",
                    min_side: float = SMALL_BOX_SIZE) -> SmallBoxes:
        """Which boxes are under ``min_side`` pixels on either side at the training size."""
        wh = self._scaled_array(img_size, resize)
        small = (wh < min_side).any(axis=1)
        tiny = (wh < MIN_FIT_SIZE).all(axis=1)
        images = np.unique(self.image_index[small])
        return SmallBoxes(
            count=int(small.sum()),
            unfit=int(tiny.sum()),
            total=len(wh),
            min_side=min_side,
            images=tuple(self.image_name(int(i)) for i in images),
        )


@dataclass(frozen=True)
class SmallBoxes:
    """Boxes under ``min_side`` pixels on either side, and the images they are in.

    ``unfit`` counts those under :data:`MIN_FIT_SIZE` on both sides, which fitting leaves out.
    """

    count: int
    unfit: int
    total: int
    min_side: float
    images: tuple[str, ...]

    def describe(self, max_images: int = 10) -> str:
        if not self.count:
            return f"no box is under {self.min_side:g} px"
        text = (f"{self.count} of {self.total} boxes are under {self.min_side:g} px on a side "
                f"({self.unfit} under {MIN_FIT_SIZE:g} px on both, left out of fitting), in {len(self.images)} images")
        if max_images < 1:
            return text
        more = f" and {len(self.images) - max_images} more" if len(self.images) > max_images else ""
        return f"{text}: {', '.join(self.images[:max_images])}{more}"


def _name_keys(names: Sequence[str]) -> np.ndarray:
    """``(M,)`` uint64 CRC-32 of each name's stem: ``a/b\\c.d.jpg`` -> ``c.d`` (no folders, ``/`` or ``\\``, no
    extension)."""
    bases = [name.rpartition("/")[2].rpartition("\\")[2] for name in names]
    stems = [base[:dot] if (dot := base.rfind(".")) > 0 else base for base in bases]
    parts = "\0".join(stems).encode("utf-8", "surrogateescape").split(b"\0")  # one encode: faster than M
    if len(parts) != len(stems):  # a name holding NUL
        parts = [stem.encode("utf-8", "surrogateescape") for stem in stems]
    return np.fromiter(map(zlib.crc32, parts), np.uint64, len(parts))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array: a bijection that scatters nearby inputs."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def describe_img_size(img_size: ImgSize) -> str:
    """``640`` for a square training size, ``1280x736`` for width x height."""
    width, height = training_size(img_size)
    return f"{width:g}" if width == height else f"{width:g}x{height:g}"


def training_size(img_size: ImgSize) -> tuple[float, float]:
    """``(width, height)`` of the training size ``img_size`` (a number: a square), checked.

    Raises:
        ConfigError: not one or two positive finite numbers of pixels.
    """
    sizes = tuple(img_size) if isinstance(img_size, Sequence | np.ndarray) else (img_size,)
    try:
        values = tuple(float(v) for v in sizes)
    except (TypeError, ValueError):
        values = ()
    if len(values) not in (1, 2) or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"img_size must be a positive number of pixels or a (width, height) pair of them, "
                          f"got {img_size!r}")
    return (values[0], values[-1])


def fit_mask(wh: Tensor) -> Tensor:
    """``(N,)`` bool mask of the boxes kept for fitting and scoring (at least 2 px on one side)."""
    return (wh >= MIN_FIT_SIZE).any(dim=1)


def log_bins(wh: Tensor, bin_width: float, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summarise boxes as weighted points on a grid in log space.

    Boxes whose ``(log w, log h)`` fall in the same square cell of side ``bin_width`` are replaced
    by one point at their (weighted) mean, weighted by their count. Both match metrics depend only
    on log-size differences, so the summary scores anchors to within about ``bin_width ** 2`` of
    the exact value, while its size is bounded by the range of sizes, not by the number of boxes.
    A summary can be summarised again (pass its points' sizes and its weights) into coarser cells.

    Args:
        wh: ``(N, 2)`` positive box widths and heights (pixels).
        bin_width: cell side in natural-log units (0.1 is a 10 % size step).
        weights: ``(N,)`` weight of each box (default 1).

    Returns:
        ``points``: ``(B, 2)`` float32 mean log sizes of the occupied cells;
        ``weights``: ``(B,)`` float32 total weight in each.
    """
    import torch

    log_wh = wh.to(torch.float32).log()
    cell = torch.floor(log_wh / bin_width).to(torch.int64)
    cell -= cell.amin(dim=0)
    n_cols = int(cell[:, 1].max()) + 1
    flat = cell[:, 0] * n_cols + cell[:, 1]
    size = int(flat.max()) + 1
    if size > _MAX_DENSE_CELLS:  # extreme size ranges: index only the occupied cells
        _, flat = torch.unique(flat, return_inverse=True)
        size = int(flat.max()) + 1
    w = None if weights is None else weights.to(torch.float64)
    log_wh = log_wh.to(torch.float64)
    if w is not None:
        log_wh = log_wh * w[:, None]
    mass = torch.bincount(flat, weights=w, minlength=size).to(torch.float64)
    sums_u = torch.bincount(flat, weights=log_wh[:, 0], minlength=size)
    sums_v = torch.bincount(flat, weights=log_wh[:, 1], minlength=size)
    occupied = mass > 0
    mass = mass[occupied]
    points = torch.stack([sums_u[occupied], sums_v[occupied]], dim=1) / mass[:, None]
    return points.to(torch.float32), mass.to(torch.float32)
