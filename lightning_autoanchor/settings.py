"""The settings of a check and fit, validated once: shared by the callback, ``refit_anchors``,
``fit_anchors`` and the command line.

:class:`AnchorSettings` is frozen and refuses a bad value when it is made, with a message naming the
argument and its allowed range, so a mistake in a config surfaces when the callback is built, never
at fit start (and never as a warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from numbers import Integral, Real
from typing import Any, Literal

from lightning_autoanchor.errors import ConfigError

__all__ = ["DEFAULT_THR", "MAX_IMG_SIZE", "MAX_SEED", "OBJECTIVES", "AnchorSettings", "Metric", "Objective", "Resize"]

Metric = Literal["ratio", "iou"]
Resize = Literal["letterbox", "stretch"]
Objective = Literal["fitness", "avg_iou"]
OBJECTIVES: tuple[str, ...] = ("fitness", "avg_iou")

DEFAULT_THR: dict[str, float] = {"ratio": 4.0, "iou": 0.5}
"""The match threshold each metric takes when none is given: YOLOv5's ``anchor_t``, an IoU of 0.5."""
MAX_IMG_SIZE = 100_000
"""Largest training image size accepted, in pixels (far above any detector's; catches ``1e300``)."""
MAX_SEED = 2**63 - 1
"""Largest seed: every generator the library seeds (torch's and NumPy's) takes 0 to this."""
_MAX_GENERATIONS = 2**31 - 1


def _number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                what: str = "a number") -> float:
    """``value`` as a float if it is a real number in the range, else a :class:`ConfigError` naming ``name``."""
    lower = "(" if low_open else "["
    upper = ")" if high_open else "]"
    allowed = f"{what} in {lower}{low:g}, {high:g}{upper}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    value = float(value)
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not inside:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    return value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an integer in ``[low, high]`` (not a bool, not ``2.5``), else a :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _img_size(value: Any) -> float | tuple[float, float] | None:
    """``img_size`` checked: ``None``, a number of pixels, or a ``(width, height)`` pair of them."""
    if value is None:
        return None
    pair = isinstance(value, list | tuple)
    if pair and len(value) != 2:
        raise ConfigError(f"img_size must be a number of pixels or a (width, height) pair of them, got {value!r}")
    sizes = tuple(_number("img_size", v, 0, MAX_IMG_SIZE, low_open=True, what="a number of pixels")
                  for v in (value if pair else [value]))
    return sizes if pair else sizes[0]  # type: ignore[return-value]


def _min_size(value: Any) -> tuple[int, ...] | None:
    """``min_size`` checked: ``None``, or one or several whole numbers of pixels (as a tuple)."""
    if value is None:
        return None
    sizes = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not sizes:
        raise ConfigError("min_size must be a number of pixels or a non-empty list of them, got []")
    return tuple(_integer("min_size", v, 1, MAX_IMG_SIZE) for v in sizes)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class AnchorSettings:
    """How boxes are sized, how anchors are matched and scored, and how new ones are searched.

    Attributes:
        img_size: training image size in pixels (the longer side for ``"letterbox"``), a
            ``(width, height)`` pair for a non-square one, or ``None`` where it is found later (the
            callback asks the datamodule).
        resize: ``"letterbox"`` (longer side to ``img_size``) or ``"stretch"`` (both sides).
        metric: ``"ratio"`` (YOLOv5's side-ratio rule) or ``"iou"`` (width/height IoU).
        thr: match threshold: a side ratio above 1 for ``"ratio"``, an IoU in ``[0, 1)`` for ``"iou"``;
            ``None`` takes the metric's default (:data:`DEFAULT_THR`), so :attr:`thr` is always set
            after construction.
        bpr_threshold: re-fit when the best possible recall is under this.
        scale_jitter: per-image scale jitter of the recall check (YOLOv5's 0.1: factors 0.9-1.1).
        generations: mutants the evolution scores in all (YOLOv5: 1000; 0 skips it).
        mutation_prob: probability that a mutant changes each anchor side.
        sigma: mutation strength (standard deviation of the log-size step).
        seed: seed of every private random generator of the check and fit.
        objective: what the fit maximises: ``"fitness"`` (YOLOv5's, under ``metric`` and ``thr``) or
            ``"avg_iou"`` (YOLOv2's mean best width/height IoU, every box counting).
        min_stride_ratio: smallest anchor size ``sqrt(w * h)`` as a multiple of its level's stride,
            kept inside the fit (1.0: no anchor under its stride); ``None``: no limit.
        scale_aug: the training's scale augmentation ``a`` in ``[0, 1)``: each image scaled by a factor
            uniform on ``[1 - a, 1 + a]`` (YOLOv5's hyperparameter ``scale``); the check and the fit
            score the boxes as the network sees them under it (0: none).
        min_size, max_size: for heads that resize like torchvision's detectors: the shorter-side
            target(s) and the longer-side cap in pixels, in place of the model's own (``None``: read
            from the model).
        iou_threshold: for heads that match by IoU on their grid (torchvision's): the foreground IoU
            in place of the model's matcher's (``None``: read from the model).
    """

    img_size: float | tuple[float, float] | None = None
    resize: Resize = "letterbox"
    metric: Metric = "ratio"
    thr: float | None = None
    bpr_threshold: float = 0.98
    scale_jitter: float = 0.1
    generations: int = 1000
    mutation_prob: float = 0.9
    sigma: float = 0.1
    seed: int = 0
    objective: Objective = "fitness"
    min_stride_ratio: float | None = None
    scale_aug: float = 0.0
    min_size: int | tuple[int, ...] | None = None
    max_size: int | None = None
    iou_threshold: float | None = None

    def __post_init__(self) -> None:
        checked = {
            "img_size": _img_size(self.img_size),
            "resize": _choice("resize", self.resize, ("letterbox", "stretch")),
            "metric": _choice("metric", self.metric, tuple(DEFAULT_THR)),
            "bpr_threshold": _number("bpr_threshold", self.bpr_threshold, 0, 1),
            "scale_jitter": _number("scale_jitter", self.scale_jitter, 0, 1, high_open=True),
            "generations": _integer("generations", self.generations, 0, _MAX_GENERATIONS),
            "mutation_prob": _number("mutation_prob", self.mutation_prob, 0, 1, what="a probability"),
            "sigma": _number("sigma", self.sigma, 0, 10),
            "seed": _integer("seed", self.seed, 0, MAX_SEED),
            "objective": _choice("objective", self.objective, OBJECTIVES),
            "min_stride_ratio": None if self.min_stride_ratio is None else _number(
                "min_stride_ratio", self.min_stride_ratio, 0, 100, low_open=True,
                what="a multiple of the level's stride (1.0: no anchor under its stride)"),
            "scale_aug": _number("scale_aug", self.scale_aug, 0, 1, high_open=True,
                                 what="a scale augmentation (YOLOv5's scale: 0.5 for factors 0.5-1.5)"),
            "min_size": _min_size(self.min_size),
            "max_size": None if self.max_size is None else _integer("max_size", self.max_size, 1, MAX_IMG_SIZE),
            "iou_threshold": None if self.iou_threshold is None else _number(
                "iou_threshold", self.iou_threshold, 0, 1, low_open=True, what="an IoU"),
        }
        thr = DEFAULT_THR[self.metric] if self.thr is None else self.thr
        if self.metric == "ratio":
            checked["thr"] = _number("thr", thr, 1, math.inf, low_open=True, high_open=True,
                                     what="a side ratio (metric='ratio'; YOLOv5 uses 4.0)")
        else:
            checked["thr"] = _number("thr", thr, 0, 1, high_open=True, what="an IoU (metric='iou')")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def match_cut(self) -> float:
        """The match-quality threshold in ``[0, 1)``: a box matches when its quality is above it
        (``1 / thr`` for ``"ratio"``, ``thr`` for ``"iou"``)."""
        return 1.0 / self.thr if self.metric == "ratio" else self.thr  # type: ignore[operator,return-value]

    def but(self, **changes: Any) -> AnchorSettings:
        """A copy with ``changes`` (field names of this class), validated again.

        Changing ``metric`` without ``thr`` takes the new metric's default threshold.
        """
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        if "metric" in changes and "thr" not in changes and changes["metric"] != self.metric:
            changes["thr"] = None
        return replace(self, **changes)

    @classmethod
    def of(cls, settings: AnchorSettings | None = None, **changes: Any) -> AnchorSettings:
        """``settings`` (default: all defaults) with ``changes``: how functions take both."""
        base = settings if settings is not None else cls()
        return base.but(**changes) if changes else base

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
