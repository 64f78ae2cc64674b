"""torchvision detectors' anchor generators, found in a model, read, laid out and written in place.

:func:`find_torchvision_anchors` finds torchvision's ``AnchorGenerator`` (RetinaNet:
``<detector>.anchor_generator``; Faster R-CNN, Mask R-CNN, Keypoint R-CNN and their mobile variants:
``<detector>.rpn.anchor_generator``) or ``DefaultBoxGenerator`` (SSD300, SSDlite:
``<detector>.anchor_generator``) anywhere in a LightningModule or bare ``nn.Module`` and returns an
adapter that speaks plain data (tuples, floats, NumPy arrays):

- :attr:`TorchvisionAnchors.settings`: what the detector does with boxes, read from the model
  (resize, matcher threshold, where anchor centres sit);
- :meth:`~TorchvisionAnchors.layout`: the grid of every level for a padded input size, as the model
  computes it (its real backbone, run on the meta device);
- :meth:`~TorchvisionAnchors.read_structure` / :meth:`~TorchvisionAnchors.write_structure`: the
  generator's own parameters (``sizes`` x ``aspect_ratios``, or SSD's ``scales`` and ratios), written
  together with the cell anchors the generator derives from them, all or nothing, never changing
  the count of anchors per location (the head's convolutions are built for it);
- :meth:`~TorchvisionAnchors.cell_wh`: the cell anchors exactly as the generator will place them;
- :meth:`~TorchvisionAnchors.constructor_args`: the values to paste into the model's constructor.

torchvision is imported only inside functions; the package imports without it.

Why the grid is probed, and how fast: torchvision computes each level's grid by running the backbone
and the strides as ``padded size // grid size``; the grid depends on every convolution's padding, so
it is read from the real backbone, run with meta tensors (shapes only, no data, no weights touched,
``torch.func.functional_call``). One such run of ``retinanet_resnet50_fpn``'s backbone costs 85 ms
on 2 cores at load 2 and 170 ms at load 4 (Python overhead, not arithmetic); ``FakeTensorMode`` was
4x slower per run and a deep copy on the meta device saves nothing per run. 100 distinct padded
sizes probed one by one took 8.9 s / 16.7 s. So up to ``_DIRECT_MAX`` distinct sizes are probed one
by one; more use a rule derived from two probes and verified: every chain of convolutions and
poolings maps an input length ``x`` to ``floor((x + c) / S)`` per level and axis (``S`` the product
of its strides), so ``g(x + S) = g(x) + 1``. Probes at ``K`` and ``2K`` (``K`` a multiple of every
plausible ``S``) give ``S = K / (g(2K) - g(K))``; one probe per residue of the needed lengths modulo
``lcm(S)`` (four at ``size_divisible=32`` and strides up to 128, one of them ``K`` itself) gives the
rest; the rule is then checked against direct probes of the smallest and the largest requested
sizes and, if it disagrees, or the backbone is not such a chain, every size is probed directly.
``benchmarks/bench_torchvision_layout.py`` (100 distinct padded sizes of multi-scale training,
load 3.5): ``retinanet_resnet50_fpn`` 7 probes, 1.2 s, instead of 100 probes, 16.7 s;
``fasterrcnn_mobilenet_v3_large_320_fpn`` 5 probes, 1.3 s, instead of 25.9 s; identical grids.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_autoanchor.errors import HeadError
from lightning_autoanchor.heads import in_averaged_model

__all__ = [
    "AnchorGeneratorAnchors",
    "DefaultBoxAnchors",
    "TorchvisionAnchors",
    "TorchvisionSettings",
    "find_torchvision_anchors",
    "torchvision_generator_paths",
]

_PROTOCOL_HINT = ("other heads plug in through the AnchorHead protocol in lightning_autoanchor.heads "
                  "(read_anchors() / write_anchors() / strides)")


@dataclass(frozen=True)
class TorchvisionSettings:
    """What a torchvision detector does with boxes, read from the model (override with ``dataclasses.replace``).

    Attributes:
        family: ``"retinanet"``, ``"fasterrcnn"`` (its RPN) or ``"ssd"``.
        min_size: the transform's shorter-side targets in pixels; in training one is drawn at random per
            image, in evaluation the last one is used.
        max_size: longest side in pixels after resizing.
        size_divisible: the batch is zero-padded (bottom/right) to a multiple of this.
        fixed_size: ``(w, h)`` every image is stretched to (SSD: ``(300, 300)`` / ``(320, 320)``), else ``None``.
        iou_threshold: the matcher's foreground IoU (RetinaNet 0.5, RPN 0.7, SSD 0.5); torchvision's
            ``Matcher`` takes a box for an anchor when their IoU is ``>=`` it.
        allow_low_quality: whether each box is also matched to its best anchor below the threshold
            (``Matcher(allow_low_quality_matches=True)``, and always for ``SSDMatcher``).
        center_offset: anchor centres sit at ``(i + center_offset) * stride`` along each axis, ``i``
            the cell index: 0.0 for ``AnchorGenerator``, 0.5 for ``DefaultBoxGenerator``.
    """

    family: str
    min_size: tuple[int, ...]
    max_size: int
    size_divisible: int
    fixed_size: tuple[int, int] | None
    iou_threshold: float
    allow_low_quality: bool
    center_offset: float


def _generator_types() -> tuple[type, type] | None:
    """torchvision's ``(AnchorGenerator, DefaultBoxGenerator)``, or ``None`` when no model can hold one.

    Nothing is imported: a model cannot contain instances of a class whose module was never loaded.
    """
    module = sys.modules.get("torchvision.models.detection.anchor_utils")
    return None if module is None else (module.AnchorGenerator, module.DefaultBoxGenerator)


def torchvision_generator_paths(model: nn.Module) -> list[str]:
    """Dotted paths of every torchvision ``AnchorGenerator`` / ``DefaultBoxGenerator`` inside ``model``.

    Copies inside a ``torch.optim.swa_utils.AveragedModel`` (an EMA model) are listed too.
    """
    types = _generator_types()
    if types is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def find_torchvision_anchors(model: nn.Module, name: str | None = None) -> TorchvisionAnchors:
    """The adapter for the one torchvision anchor generator in ``model``.

    Args:
        model: a LightningModule or any ``nn.Module`` holding a torchvision detector.
        name: dotted path of the generator (``"model.anchor_generator"``,
            ``"model.rpn.anchor_generator"``) or of a module holding exactly one (``"model"``);
            ``None`` searches all of ``model``. Copies inside an ``AveragedModel`` (EMA) are not
            counted (name them to get their adapters).

    Raises:
        HeadError: nothing or several found, ``name`` missing, or the detector is not one served
            here; the message names the paths.
    """
    where, scope, prefix = type(model).__name__, model, ""
    if name:
        try:
            scope = model.get_submodule(name)
        except AttributeError:
            raise HeadError(f"head {name!r} not found in {where}; torchvision anchor generators in it: "
                            f"{torchvision_generator_paths(model) or 'none'}") from None
        types = _generator_types()
        if types is not None and isinstance(scope, types):
            return _adapter(model, name)
        where, prefix = f"{where}.{name}", f"{name}."
    paths = [prefix + p for p in torchvision_generator_paths(scope) if not in_averaged_model(scope, p)]
    if len(paths) == 1:
        return _adapter(model, paths[0])
    if not paths:
        raise HeadError(f"no torchvision AnchorGenerator or DefaultBoxGenerator found in {where} (RetinaNet keeps it "
                        f"at <detector>.anchor_generator, Faster R-CNN at <detector>.rpn.anchor_generator, SSD at "
                        f"<detector>.anchor_generator); {_PROTOCOL_HINT}")
    raise HeadError(f"{len(paths)} torchvision anchor generators in {where}: {paths}; name one with head=... "
                    f"(a list writes the same anchors to several)")


def _adapter(model: nn.Module, path: str) -> TorchvisionAnchors:
    types = _generator_types()
    assert types is not None  # a generator was found, so torchvision is loaded
    cls = AnchorGeneratorAnchors if isinstance(model.get_submodule(path), types[0]) else DefaultBoxAnchors
    return cls(model, path)


_DIRECT_MAX = 8  # up to this many distinct padded sizes are probed one by one (see the module doc)
_BIG = 2**10 * 3**2 * 5**2  # probe length K: a multiple of every plausible product of strides S


class _FeatureGrids:
    """Each level's feature-map size for a padded input size, from the real backbone on the meta device.

    ``probes`` counts the backbone runs so far (each about 85 ms for ResNet-50-FPN on 2 cores).
    """

    def __init__(self, backbone: nn.Module, channels: int, levels: int, where: str):
        self._backbone = backbone
        self._channels = channels
        self._levels = levels
        self._where = where
        self._state: dict[str, Tensor] | None = None
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._period: np.ndarray | None = None  # (L, 2) products of strides S per level and axis (w, h)
        self._rule_failed = False
        self.probes = 0

    def __call__(self, sizes: np.ndarray) -> np.ndarray:
        """``(U, 2)`` distinct padded ``(w, h)`` -> ``(U, L, 2)`` int64 cells along w and h."""
        if len(sizes) > _DIRECT_MAX and not self._rule_failed:
            grids = self._by_rule(sizes)
            if grids is not None:
                return grids
        return np.stack([self._probe(int(w), int(h)) for w, h in sizes])

    def _probe(self, w: int, h: int) -> np.ndarray:
        """``(L, 2)`` cells along w and h for one padded size: one backbone run on meta tensors, cached."""
        key = (w, h)
        if key not in self._cache:
            backbone = self._backbone
            if self._state is None:
                tensors = [*backbone.named_parameters(), *backbone.named_buffers()]
                self._state = {name: torch.empty_like(t, device="meta") for name, t in tensors}
            dtype = next((t.dtype for t in self._state.values() if t.is_floating_point()), torch.float32)
            x = torch.empty(2, self._channels, h, w, dtype=dtype, device="meta")  # 2: BatchNorm on 1x1 maps
            try:
                with torch.no_grad():
                    out = torch.func.functional_call(backbone, self._state, (x,))
            except Exception as err:
                raise HeadError(f"{self._where}: could not run the backbone {type(backbone).__name__} on a meta "
                                f"tensor of {w}x{h} px to read its feature-map sizes: {err}") from err
            features = list(out.values()) if isinstance(out, dict) else [out] if isinstance(out, Tensor) else out
            if len(features) != self._levels:
                raise HeadError(f"{self._where}: the backbone gives {len(features)} feature maps, the anchor "
                                f"generator has {self._levels} levels")
            self._cache[key] = np.array([[f.shape[-1], f.shape[-2]] for f in features], dtype=np.int64)
            self.probes += 1
        return self._cache[key]

    def _by_rule(self, sizes: np.ndarray) -> np.ndarray | None:
        """Grids from ``g(x) = g(K + x mod lcm(S)) + (x - K - x mod lcm(S)) / S``, verified; ``None``: probe all."""
        try:
            if self._period is None:
                steps = self._probe(2 * _BIG, 2 * _BIG) - self._probe(_BIG, _BIG)
                if (steps <= 0).any() or (_BIG % steps).any():
                    raise HeadError("the feature maps do not scale like a chain of convolutions")
                self._period = _BIG // steps
            period = self._period
            cycle = math.lcm(*period.reshape(-1).tolist())
            residues = sizes % cycle
            per_axis = [np.unique(residues[:, axis]) for axis in range(2)]
            count = max(len(r) for r in per_axis)
            if count + 2 >= len(sizes):
                return None  # probing each size is no dearer
            base: list[dict[int, np.ndarray]] = [{}, {}]
            for i in range(count):
                rw, rh = (int(r[min(i, len(r) - 1)]) for r in per_axis)
                grid = self._probe(_BIG + rw, _BIG + rh)
                base[0][rw], base[1][rh] = grid[:, 0], grid[:, 1]
            grids = np.stack([np.stack([base[axis][int(r)] for r in residues[:, axis]]) for axis in range(2)], axis=-1)
            grids += (sizes - _BIG - residues)[:, None, :] // period[None]
            area = sizes.prod(axis=1)
            for i in {int(area.argmin()), int(area.argmax())}:
                if not np.array_equal(self._probe(int(sizes[i, 0]), int(sizes[i, 1])), grids[i]):
                    raise HeadError("the derived rule disagrees with a direct probe")
        except HeadError:
            self._rule_failed = True
            return None
        return grids


class TorchvisionAnchors(ABC):
    """A torchvision anchor generator and the detector that owns it, as plain data.

    Built by :func:`find_torchvision_anchors`. ``path`` is the generator's dotted path in the model
    it was found in, ``generator`` / ``detector`` the modules, :attr:`settings` what the detector
    does with boxes (read once; every later method reads the generator afresh).
    """

    _ATTRS: tuple[str, ...] = ()  # the generator's attributes a write replaces, together

    def __init__(self, model: nn.Module, path: str):
        from torchvision.models.detection._utils import SSDMatcher
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.models.detection.ssd import SSD

        self.path = path
        self.generator: nn.Module = model.get_submodule(path)
        name = f"{type(self.generator).__name__} at {path!r}"
        parts = path.split(".")
        detector_path, detector = "", None
        for i in range(len(parts) - 1, -1, -1):  # the nearest detector above the generator
            candidate = model.get_submodule(".".join(parts[:i]))
            if isinstance(candidate, RetinaNet | GeneralizedRCNN | SSD | FCOS):
                detector_path, detector = ".".join(parts[:i]), candidate
                break
        if isinstance(detector, FCOS):
            raise HeadError(f"{name} belongs to an FCOS, which assigns boxes by centre sampling, not by anchor IoU; "
                            f"there is nothing to fit")
        family, owner = (("retinanet", detector) if isinstance(detector, RetinaNet)
                         else ("ssd", detector) if isinstance(detector, SSD)
                         else ("fasterrcnn", getattr(detector, "rpn", None)) if detector is not None
                         else ("", None))
        if owner is None or getattr(owner, "anchor_generator", None) is not self.generator:
            raise HeadError(f"{name} is not the anchor generator of a torchvision RetinaNet, Faster R-CNN (its RPN) "
                            f"or SSD; {_PROTOCOL_HINT}")
        self.detector: nn.Module = detector
        transform, matcher = detector.transform, owner.proposal_matcher
        fixed = transform.fixed_size
        self.settings = TorchvisionSettings(
            family=family,
            min_size=tuple(int(s) for s in transform.min_size),
            max_size=int(transform.max_size),
            size_divisible=int(transform.size_divisible),
            fixed_size=None if fixed is None else (int(fixed[0]), int(fixed[1])),
            iou_threshold=float(matcher.high_threshold),
            allow_low_quality=isinstance(matcher, SSDMatcher) or bool(matcher.allow_low_quality_matches),
            center_offset=0.5 if family == "ssd" else 0.0,
        )
        self._grids = _FeatureGrids(detector.backbone, len(transform.image_mean), self.levels,
                                    f"{detector_path}.backbone" if detector_path else "backbone")

    @property
    @abstractmethod
    def levels(self) -> int:
        """Number of feature levels the generator places anchors on."""

    @abstractmethod
    def read_structure(self) -> tuple[tuple[Any, ...], tuple[tuple[float, ...], ...]]:
        """The generator's parameters per level: ``(sizes or scales, aspect_ratios)`` (see the subclass)."""

    @abstractmethod
    def write_structure(self, first: Sequence[Any], aspect_ratios: Sequence[Any]) -> None:
        """Set what :meth:`read_structure` returns, with the derived cell anchors, all or nothing."""

    @abstractmethod
    def cell_wh(self, image_wh: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:
        """Per level ``(A_l, 2)`` float64 widths and heights in pixels of the anchors one cell holds."""

    @abstractmethod
    def constructor_args(self) -> dict[str, Any]:
        """``class_path``, ``init_args`` (YAML-ready lists) and ``python`` text of the generator to construct."""

    def num_anchors_per_location(self) -> tuple[int, ...]:
        """Anchors per grid cell on each level, as the generator counts them."""
        return tuple(int(n) for n in self.generator.num_anchors_per_location())

    def layout(self, padded_wh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each level's grid and strides for padded input sizes, as the model computes them.

        Anchor centres lie at ``(i + settings.center_offset) * stride`` for cell ``i`` along each axis.

        Args:
            padded_wh: ``(P, 2)`` integer widths and heights in pixels of the padded batch tensor.

        Returns:
            ``grids``: ``(P, L, 2)`` int64 cells along w and h; ``strides``: ``(P, L, 2)`` float64
            pixels per cell along w and h.
        """
        wh = np.asarray(padded_wh)
        if wh.ndim != 2 or wh.shape[1] != 2 or wh.size == 0 or not np.all(np.isfinite(wh)) or (wh < 1).any() \
                or (wh != np.round(wh)).any():
            raise HeadError(f"{self.path}: padded sizes must be an (P, 2) array of positive integer widths and "
                            f"heights, got shape {wh.shape}")
        distinct, index = np.unique(wh.astype(np.int64), axis=0, return_inverse=True)
        grids = self._grids(distinct)[index.reshape(-1)]
        return grids, self._strides(wh.astype(np.int64), grids)

    @abstractmethod
    def _strides(self, wh: np.ndarray, grids: np.ndarray) -> np.ndarray:
        """``(P, L, 2)`` pixels per cell for padded sizes ``wh`` ``(P, 2)`` and their ``grids`` ``(P, L, 2)``."""

    @abstractmethod
    def _derive(self) -> None:
        """Recompute the generator's derived anchors from its parameters, the generator's own way."""

    @abstractmethod
    def _cell_counts(self) -> tuple[int, ...]:
        """Anchors per cell on each level in the derived anchors."""

    def _write(self, **values: Any) -> None:
        """Set the generator's parameters and derived anchors, all or nothing, keeping the count per location."""
        generator = self.generator
        before = self.num_anchors_per_location()
        old = {name: getattr(generator, name) for name in self._ATTRS}
        try:
            for name, value in values.items():
                setattr(generator, name, value)
            self._derive()
            after = self.num_anchors_per_location()
            if after != before or self._cell_counts() != before:
                raise HeadError(f"{self.path}: the new anchors give {after} anchors per location, the model has "
                                f"{before}; the head's convolutions are built for that count, keep it on every level")
            for conv, counts in self._head_counts().items():
                if counts != after:
                    raise HeadError(f"{self.path}: {conv} is built for {counts} anchors per location, the anchor "
                                    f"generator would give {after}")
        except BaseException:
            for name, value in old.items():
                setattr(generator, name, value)
            raise

    def _head_counts(self) -> dict[str, tuple[int, ...]]:
        """Anchors per location on each level that the head's output convolutions are built for, by conv path."""
        head = self.detector.rpn.head if self.settings.family == "fasterrcnn" else self.detector.head
        levels = self.levels
        try:
            if self.settings.family == "retinanet":
                cls, reg = head.classification_head, head.regression_head
                per_anchor = cls.cls_logits.out_channels // cls.num_classes
                return {"head.classification_head.cls_logits": (per_anchor,) * levels,
                        "head.regression_head.bbox_reg": (reg.bbox_reg.out_channels // 4,) * levels}
            if self.settings.family == "fasterrcnn":
                return {"rpn.head.cls_logits": (head.cls_logits.out_channels,) * levels,
                        "rpn.head.bbox_pred": (head.bbox_pred.out_channels // 4,) * levels}
            cls, reg = head.classification_head, head.regression_head  # per level a conv (SSDlite: a block)
            return {"head.classification_head": tuple(_out_channels(m) // cls.num_columns for m in cls.module_list),
                    "head.regression_head": tuple(_out_channels(m) // 4 for m in reg.module_list)}
        except (AttributeError, IndexError):
            return {}  # a custom head: the generator's own count is checked


class AnchorGeneratorAnchors(TorchvisionAnchors):
    """torchvision's ``AnchorGenerator`` (RetinaNet, the RPN of Faster R-CNN).

    Level ``l`` has ``len(sizes[l]) * len(aspect_ratios[l])`` cell anchors, ratio-major; an aspect
    ratio is ``h / w``; ``generate_anchors`` rounds each corner to whole pixels.
    """

    _ATTRS = ("sizes", "aspect_ratios", "cell_anchors")

    @property
    def levels(self) -> int:
        return len(self.generator.cell_anchors)

    def _strides(self, wh: np.ndarray, grids: np.ndarray) -> np.ndarray:
        return (wh[:, None, :] // grids).astype(np.float64)  # AnchorGenerator.forward: image size // grid size

    def read_structure(self) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
        """``(sizes, aspect_ratios)`` per level (a shared ``aspect_ratios`` is repeated for every level)."""
        generator = self.generator
        return _per_level(generator.sizes, "sizes", self), _per_level(generator.aspect_ratios, "aspect_ratios", self)

    def write_structure(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Any]) -> None:
        """Set ``sizes``, ``aspect_ratios`` and ``cell_anchors`` together, all or nothing.

        Args:
            sizes: per level, anchor sizes in pixels (``sqrt(w * h)`` before rounding).
            aspect_ratios: per level, ``h / w`` ratios; one flat sequence is shared by all levels.

        Raises:
            HeadError: a level count, a count per location or a value the model cannot take; the
                generator is then left exactly as it was.
        """
        self._write(sizes=_per_level(sizes, "sizes", self), aspect_ratios=_per_level(aspect_ratios, "aspect_ratios",
                                                                                    self))

    def _derive(self) -> None:
        generator = self.generator
        ref = generator.cell_anchors[0]
        generator.cell_anchors = [generator.generate_anchors(s, r).to(device=ref.device, dtype=ref.dtype)  # __init__
                                  for s, r in zip(generator.sizes, generator.aspect_ratios, strict=True)]

    def _cell_counts(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.generator.cell_anchors)

    def cell_wh(self, image_wh: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:
        """Per level ``(A_l, 2)`` float64 widths and heights in pixels of the cell anchors, after rounding.

        ``image_wh`` is ignored (the cell anchors do not depend on the image size). They are
        centred on the grid points: rounding keeps them symmetric.
        """
        del image_wh
        return tuple((c[:, 2:] - c[:, :2]).to(torch.float64).cpu().numpy() for c in self.generator.cell_anchors)

    def constructor_args(self) -> dict[str, Any]:
        """``class_path``, ``init_args`` (YAML-ready lists) and ``python`` text of the generator to construct."""
        sizes, ratios = (_plain(v) for v in self.read_structure())
        return {"class_path": "torchvision.models.detection.anchor_utils.AnchorGenerator",
                "init_args": {"sizes": sizes, "aspect_ratios": ratios},
                "python": f"AnchorGenerator(sizes={_tuples(sizes)}, aspect_ratios={_tuples(ratios)})"}


class DefaultBoxAnchors(TorchvisionAnchors):
    """torchvision's ``DefaultBoxGenerator`` (SSD300, SSDlite).

    Level ``k`` has the squares ``scales[k]`` and ``sqrt(scales[k] * scales[k + 1])`` and, per aspect
    ratio ``r`` (``w / h`` here), the pair ``(scales[k] * sqrt(r), scales[k] / sqrt(r))`` and its
    transpose: ``2 + 2 * len(aspect_ratios[k])`` boxes, as fractions of the image size (clipped to 1
    when ``clip``).
    """

    _ATTRS = ("scales", "aspect_ratios", "_wh_pairs")

    @property
    def levels(self) -> int:
        return len(self.generator.aspect_ratios)

    def _strides(self, wh: np.ndarray, grids: np.ndarray) -> np.ndarray:
        steps = self.generator.steps
        if steps is None:
            return wh[:, None, :] / grids
        return np.broadcast_to(np.asarray(steps, dtype=np.float64)[None, :, None], grids.shape).copy()

    def read_structure(self) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
        """``(scales, aspect_ratios)``: ``levels + 1`` scales (fractions of the image size), ratios per level."""
        generator = self.generator
        return _positive(generator.scales, "scales", self.path), _per_level(generator.aspect_ratios, "aspect_ratios",
                                                                            self)

    def write_structure(self, scales: Sequence[float], aspect_ratios: Sequence[Sequence[float]]) -> None:
        """Set ``scales``, ``aspect_ratios`` and the derived ``_wh_pairs`` together, all or nothing.

        Raises:
            HeadError: not ``levels + 1`` scales, a count per location or a value the model cannot
                take; the generator is then left exactly as it was.
        """
        scales = _positive(scales, "scales", self.path)
        if len(scales) != self.levels + 1:
            raise HeadError(f"{self.path}: needs {self.levels + 1} scales (one per level and one above), got "
                            f"{len(scales)}: {list(scales)}")
        ratios = _per_level(aspect_ratios, "aspect_ratios", self)
        self._write(scales=list(scales), aspect_ratios=[list(r) for r in ratios])

    def _derive(self) -> None:
        generator = self.generator
        ref = generator._wh_pairs[0]
        pairs = generator._generate_wh_pairs(len(generator.aspect_ratios))  # as in __init__
        generator._wh_pairs = [p.to(device=ref.device, dtype=ref.dtype) for p in pairs]

    def _cell_counts(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.generator._wh_pairs)

    def cell_wh(self, image_wh: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:
        """Per level ``(A_l, 2)`` float64 widths and heights in pixels for an image of ``image_wh``.

        ``image_wh`` defaults to the detector's fixed size; the generator scales its fractions
        by the padded image's width and height.
        """
        wh = image_wh or self.settings.fixed_size
        if wh is None:
            raise HeadError(f"{self.path}: the detector has no fixed size; give image_wh")
        generator = self.generator
        scale = np.asarray(wh, dtype=np.float64)
        return tuple((p.clamp(min=0, max=1) if generator.clip else p).to(torch.float64).cpu().numpy() * scale
                     for p in generator._wh_pairs)

    def constructor_args(self) -> dict[str, Any]:
        """``class_path``, ``init_args`` (YAML-ready lists) and ``python`` text of the generator to construct."""
        scales, ratios = (_plain(v) for v in self.read_structure())
        generator = self.generator
        init_args: dict[str, Any] = {"aspect_ratios": ratios, "scales": scales}
        text = f"DefaultBoxGenerator({ratios}, scales={scales}"
        if generator.steps is not None:
            init_args["steps"] = _plain(generator.steps)
            text += f", steps={init_args['steps']}"
        if not generator.clip:
            init_args["clip"] = False
            text += ", clip=False"
        return {"class_path": "torchvision.models.detection.anchor_utils.DefaultBoxGenerator",
                "init_args": init_args, "python": text + ")"}


def _out_channels(module: nn.Module) -> int:
    """Output channels of the last convolution in ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _positive(values: Any, what: str, where: str) -> tuple[float, ...]:
    """``values`` as a non-empty tuple of positive finite floats, or a :class:`HeadError` naming them."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise HeadError(f"{where}: {what} must be a sequence of numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise HeadError(f"{where}: {what} must be positive and finite, got {list(out)}")
    return out


def _per_level(values: Any, what: str, anchors: TorchvisionAnchors) -> tuple[tuple[float, ...], ...]:
    """Per-level tuples of positive floats; a flat ``aspect_ratios`` is shared by all levels (as torchvision does)."""
    levels = anchors.levels
    try:
        nested = [isinstance(v, Sequence | np.ndarray) for v in values]
    except TypeError:
        raise HeadError(f"{anchors.path}: {what} must be a sequence per level, got {values!r}") from None
    if what == "aspect_ratios" and nested and not any(nested):
        values = [values] * levels
    elif not nested or not all(nested):
        raise HeadError(f"{anchors.path}: {what} must hold one sequence per level, got {values!r}")
    out = tuple(_positive(v, f"{what}[{i}]", anchors.path) for i, v in enumerate(values))
    if len(out) != levels:
        raise HeadError(f"{anchors.path}: {what} has {len(out)} levels, the generator has {levels}")
    return out


def _plain(values: Any) -> Any:
    """Nested sequences as lists, whole numbers as ``int`` (YAML- and Python-ready)."""
    if isinstance(values, Sequence | np.ndarray):
        return [_plain(v) for v in values]
    value = float(values)
    return int(value) if value.is_integer() else value


def _tuples(values: Any) -> str:
    """Python text of nested lists as tuples: ``((32, 40), (64, 80))``."""
    if isinstance(values, list):
        inner = ", ".join(_tuples(v) for v in values)
        return f"({inner},)" if len(values) == 1 else f"({inner})"
    return repr(values)
