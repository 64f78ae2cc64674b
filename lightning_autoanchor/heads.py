"""Detection heads: find them in a model, read their anchors, write new ones in place.

The callback talks to heads through :class:`AnchorHead`: three members, all in pixels at the
training image size.

Heads that follow YOLOv5's ``Detect`` convention work as they are (:class:`YoloAnchors`): a module
with a buffer ``anchors`` of shape ``(levels, anchors_per_level, 2)`` in *stride units* and a
tensor ``stride`` of shape ``(levels,)`` in pixels. Any other head plugs in by implementing
:class:`AnchorHead` on the module itself, or by a method ``autoanchor_heads()`` on the
LightningModule that returns adapters (the first is read, all are written).

A head that matches boxes to anchors by IoU with its anchors laid on each level's grid (like
torchvision's RetinaNet) says so with an attribute ``iou_threshold`` (the matcher's foreground IoU) and,
optionally, ``anchor_offset`` (the first anchor centre as a fraction of the stride: 0, the default, as
torchvision's ``AnchorGenerator``; 0.5 as SSD). :func:`find_heads` wraps it in a :class:`GridAnchorHead`:
its anchors are then scored by the placed recall (:mod:`lightning_autoanchor.placed`) on the grids its
strides declare and fitted as free anchors (:class:`~lightning_autoanchor.grid_fit.FreeAnchors`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lightning_autoanchor.detector_resize import DetectorResize
from lightning_autoanchor.errors import ConfigError, HeadError
from lightning_autoanchor.grid_fit import FreeAnchors
from lightning_autoanchor.placed import check_iou_threshold

__all__ = [
    "READBACK_RTOL",
    "AnchorHead",
    "GridAnchorHead",
    "GridHeadSettings",
    "Heads",
    "YoloAnchors",
    "anchors_match",
    "find_heads",
    "holds",
    "in_averaged_model",
    "is_yolo_head",
    "write_all",
    "write_heads",
    "write_structure_all",
]

READBACK_RTOL = 2.0**-7
"""Relative tolerance of anchors read back after a write (or compared on resume): the precision of
bfloat16, the coarsest floating dtype a head keeps its anchors in."""


class AnchorHead(Protocol):
    """What the callback needs from a detection head.

    Attributes:
        strides: ``(levels,)`` pixels of input per cell of each level's feature map.

    A head that matches boxes to anchors by IoU, its anchors laid at every point of each level's grid,
    declares it with two more attributes (read by :class:`GridAnchorHead`):

    - ``iou_threshold: float``: the matcher's foreground IoU (a box is a target of an anchor at
      ``IoU >= iou_threshold``);
    - ``anchor_offset: float`` (optional, default 0): anchor centres sit at ``(i + anchor_offset) * stride``
      along each axis for cell ``i``: 0 as torchvision's ``AnchorGenerator``, 0.5 as SSD's.

    Its grid is ``ceil(input side / stride)`` cells per axis; the input is the image resized as the
    callback's ``img_size`` and ``resize`` say, at the top-left corner, padded to a multiple of the largest
    stride. It is then scored by the placed recall at ``iou_threshold`` and fitted as free anchors.
    """

    strides: Tensor

    def read_anchors(self) -> Tensor:
        """``(levels, anchors_per_level, 2)`` anchor widths and heights in pixels (a copy)."""
        ...

    def write_anchors(self, anchors: Tensor) -> None:
        """Set the anchors from ``(levels, anchors_per_level, 2)`` pixels, in place (same tensors)."""
        ...


class YoloAnchors:
    """:class:`AnchorHead` for a YOLOv5-style head: ``anchors`` buffer in stride units beside ``stride``.

    Writes go into the existing ``anchors`` tensor (``copy_``), so every reference to it (a loss,
    an optimiser, a compiled graph) sees the new values; the dtype and device stay. Cached grids in
    list attributes ``grid`` / ``anchor_grid`` are emptied so the head rebuilds them.
    """

    def __init__(self, module: nn.Module):
        if not is_yolo_head(module):
            raise HeadError(f"{type(module).__name__} has no 'anchors' buffer of shape (levels, anchors, 2) with a "
                            "'stride' tensor of shape (levels,)")
        dtype = module.anchors.dtype  # type: ignore[union-attr]
        if not dtype.is_floating_point:
            raise HeadError(f"{type(module).__name__}: its 'anchors' buffer is {dtype}: anchors in stride units are "
                            "fractions, which an integer buffer would truncate; make it a floating-point buffer")
        self.module = module

    @property
    def strides(self) -> Tensor:
        return self.module.stride.detach().reshape(-1).to(torch.float32).cpu()  # type: ignore[union-attr]

    def read_anchors(self) -> Tensor:
        anchors = self.module.anchors.detach().to(torch.float32).cpu()  # type: ignore[union-attr]
        return anchors * self.strides.view(-1, 1, 1)

    def write_anchors(self, anchors: Tensor) -> None:
        buffer: Tensor = self.module.anchors  # type: ignore[assignment]
        with torch.no_grad():
            buffer.copy_((anchors.to(torch.float32) / self.strides.view(-1, 1, 1)).to(buffer.device, buffer.dtype))
        for name in ("grid", "anchor_grid"):
            cache = getattr(self.module, name, None)
            if isinstance(cache, list):
                cache[:] = [torch.empty(0) for _ in cache]


def is_yolo_head(module: nn.Module) -> bool:
    """Whether ``module`` follows the YOLOv5 ``Detect`` convention (see module doc)."""
    anchors = module._buffers.get("anchors")
    stride = getattr(module, "stride", None)
    return (isinstance(anchors, Tensor) and anchors.ndim == 3 and anchors.shape[-1] == 2
            and isinstance(stride, Tensor) and stride.numel() == anchors.shape[0])


def implements_protocol(module: object) -> bool:
    """Whether ``module`` has the members of :class:`AnchorHead` itself."""
    return (callable(getattr(module, "read_anchors", None)) and callable(getattr(module, "write_anchors", None))
            and hasattr(module, "strides"))


def as_adapter(module: nn.Module) -> AnchorHead:
    """A :class:`GridAnchorHead` for a head implementing :class:`AnchorHead` that declares ``iou_threshold``,
    the module itself for another one, else a :class:`YoloAnchors` for it."""
    if implements_protocol(module):
        return GridAnchorHead(module) if hasattr(module, "iou_threshold") else module  # type: ignore[return-value]
    return YoloAnchors(module)


@dataclass(frozen=True)
class GridHeadSettings:
    """What a custom grid head (:class:`GridAnchorHead`) does with boxes, in the terms of
    :class:`~lightning_autoanchor.torchvision_heads.TorchvisionSettings` (the resize fields are ``None`` until
    :meth:`GridAnchorHead.train_at` sets the training size)."""

    iou_threshold: float
    center_offset: float
    min_size: tuple[float, ...] | None = None
    max_size: float | None = None
    size_divisible: int | None = None
    fixed_size: tuple[int, int] | None = None
    family: str = "custom"


class GridAnchorHead:
    """A custom :class:`AnchorHead` that declares IoU matching on its grid (``iou_threshold``, ``anchor_offset``;
    see :class:`AnchorHead`), speaking what the callback needs of a grid head: :meth:`structure` /
    :meth:`write` (free anchors), :meth:`layout`, :meth:`detector_resize`, :attr:`settings`,
    :meth:`constructor_args`.

    The resize: ``"letterbox"`` at ``img_size`` ``S`` scales an image by ``min(S / shorter, S / longer) =
    S / longer``, exactly torchvision's rule with ``min_size=(S,)``, ``max_size=S``; ``"stretch"`` to ``S`` or
    ``(W, H)`` is torchvision's ``fixed_size``. Either way the image sits at the input's top-left corner and
    is padded to a multiple of the largest stride (torchvision's ``size_divisible``). A non-square ``(W, H)``
    letterbox scales by ``min(W / w, H / h)``, which torchvision's rule matches only for images shaped like
    ``(W, H)``: it is refused (a :class:`ConfigError`) rather than measured wrongly for the others.
    """

    def __init__(self, module: Any):
        self.module = module
        where = type(module).__name__
        try:
            thr = check_iou_threshold(module.iou_threshold)
        except ConfigError as err:
            raise HeadError(f"{where}.iou_threshold: {err}") from None
        offset = getattr(module, "anchor_offset", 0.0)
        if not (isinstance(offset, int | float) and 0.0 <= float(offset) < 1.0):
            raise HeadError(f"{where}.anchor_offset must be the first anchor centre as a fraction of the stride, "
                            f"in [0, 1) (0 as torchvision's AnchorGenerator, 0.5 as SSD), got {offset!r}")
        strides = self.strides
        if strides.ndim != 1 or not len(strides) or not bool((strides > 0).all()) or not bool(strides.isfinite().all()):
            raise HeadError(f"{where}.strides must be a (levels,) tensor of positive pixels, got {strides.tolist()}")
        self._settings = GridHeadSettings(iou_threshold=thr, center_offset=float(offset))

    @property
    def strides(self) -> Tensor:
        return torch.as_tensor(self.module.strides).detach().reshape(-1).to(torch.float32).cpu()

    def read_anchors(self) -> Tensor:
        return self.module.read_anchors()

    @property
    def settings(self) -> GridHeadSettings:
        return self._settings

    def train_at(self, img_size: float | tuple[float, float], resize: str) -> None:
        """Set the training size: ``img_size`` (pixels, or ``(W, H)``) and ``resize`` (``"letterbox"`` or
        ``"stretch"``), the callback's settings; :meth:`detector_resize` and :attr:`settings` follow them."""
        largest = float(self.strides.max())
        if not largest.is_integer():
            raise ConfigError(f"{type(self.module).__name__}: the largest stride {largest:g} must be a whole number "
                              "of pixels (the input is padded to a multiple of it)")
        w, h = img_size if isinstance(img_size, tuple | list) else (img_size, img_size)
        size = {"size_divisible": int(largest)}
        if resize == "stretch":
            if not (float(w).is_integer() and float(h).is_integer()):
                raise ConfigError(f"img_size {img_size} must be whole pixels to stretch images to it")
            size.update(min_size=(w,), max_size=max(w, h), fixed_size=(int(w), int(h)))
        elif w != h:
            raise ConfigError(f"a grid head measures where anchors land, so the resize must be exact: letterbox to "
                              f"a non-square img_size {img_size} scales by min(W / w, H / h), which depends on each "
                              "image's orientation; use a square img_size or resize='stretch'")
        else:
            size.update(min_size=(_whole(w),), max_size=_whole(w))
        self._settings = replace(self._settings, **size)

    def detector_resize(self, min_size: Sequence[int] | None = None, max_size: int | None = None) -> DetectorResize:
        """The resize set by :meth:`train_at`, as the engine's type; ``min_size`` / ``max_size`` replace its
        torchvision-rule targets (not a stretch's fixed size)."""
        s = self._settings
        if s.min_size is None or s.max_size is None or s.size_divisible is None:
            raise ConfigError(f"{type(self.module).__name__}: the training size is not set (train_at)")
        return DetectorResize(min_size=tuple(min_size) if min_size is not None else s.min_size,
                              max_size=max_size if max_size is not None else s.max_size,
                              size_divisible=s.size_divisible, fixed_size=s.fixed_size)

    def layout(self, padded_wh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each level's grid and strides for ``(P, 2)`` padded input sizes (pixels): ``(P, L, 2)`` int64 cells
        (``ceil(side / stride)``) and ``(P, L, 2)`` float64 strides (as declared) along w and h."""
        wh = np.asarray(padded_wh, dtype=np.float64).reshape(-1, 1, 2)
        strides = self.strides.to(torch.float64).numpy()[None, :, None]
        grids = np.ceil(wh / strides).astype(np.int64)
        return grids, np.broadcast_to(strides, grids.shape).copy()

    def structure(self) -> FreeAnchors:
        """The head's anchors as free anchors (per level ``(w, h)`` pixels)."""
        return FreeAnchors.of(self.module.read_anchors())

    def write(self, structure: Any) -> None:
        """Write free anchors with ``write_anchors`` and read them back; :class:`HeadError` if they differ (beyond
        :data:`READBACK_RTOL`) or their counts per level are not the head's."""
        where = type(self.module).__name__
        if not isinstance(structure, FreeAnchors):
            raise HeadError(f"{where}: a custom grid head takes free anchors, not {structure!r}")
        if structure.num_anchors_per_location() != self.structure().num_anchors_per_location():
            raise HeadError(f"{where}: has {self.structure().num_anchors_per_location()} anchors per level, cannot "
                            f"take {structure.num_anchors_per_location()}")
        anchors = torch.stack(structure.cell_anchors())
        self.module.write_anchors(anchors)
        back = self.module.read_anchors()
        if not anchors_match(back, anchors):
            raise HeadError(f"{where}: anchors read back after the write differ from those written "
                            f"({back.reshape(-1, 2).tolist()} instead of {anchors.reshape(-1, 2).tolist()})")

    def constructor_args(self) -> dict[str, Any]:
        """``class_path``, ``init_args`` (``anchors``: per level flat ``w, h`` pixels) and ``python`` text."""
        cls = type(self.module)
        anchors = [[round(float(v), 4) for v in level.reshape(-1)] for level in self.module.read_anchors()]
        anchors = [[int(v) if v.is_integer() else v for v in level] for level in anchors]
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {"anchors": anchors},
                "python": f"{cls.__name__}(anchors={anchors})"}


def _whole(value: float) -> float:
    return int(value) if float(value).is_integer() else float(value)


@dataclass
class Heads:
    """The heads whose anchors the callback manages: ``primary`` is read; all are written.

    ``names`` are their module paths (for reports).
    """

    adapters: list[AnchorHead]
    names: list[str]
    unwritten: list[str] = field(default_factory=list)
    """Paths of what look like copies of the primary head but are not among these (for a warning):
    heads inside an EMA or averaged model, and heads holding the same anchors."""

    @property
    def primary(self) -> AnchorHead:
        return self.adapters[0]

    @property
    def on_grid(self) -> bool:
        """Whether these heads place their anchors on a grid and match by IoU (torchvision's generators, custom
        heads declaring ``iou_threshold``: adapters giving ``structure()`` and ``write(structure)``): they are
        fitted by placed recall."""
        return callable(getattr(self.primary, "structure", None))

    def modules(self) -> list[nn.Module]:
        """The modules holding the anchors (a torchvision adapter's generator)."""
        return [getattr(a, "module", None) or getattr(a, "generator", a) for a in self.adapters]  # type: ignore[misc]


def _resolve(root: object, path: str) -> Any:
    """The object at dotted ``path`` below ``root``, through submodules and plain attributes alike
    (YOLOv5's ``ModelEMA`` is a plain object holding the averaged model in ``.ema``)."""
    obj = root
    for part in path.split(".") if path else []:
        obj = obj.get_submodule(part) if isinstance(obj, nn.Module) and part in obj._modules else getattr(obj, part)
    return obj


def _plain_holders(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules held by plain (non-module) attributes of ``root`` or one object deeper, with their paths:
    where EMA helpers such as YOLOv5's ``ModelEMA`` keep their model."""
    for name, value in vars(root).items():
        if name.startswith("_") or isinstance(value, nn.Module | Tensor) or not hasattr(value, "__dict__"):
            continue
        if isinstance(value, type):
            continue
        for inner, module in vars(value).items():
            if isinstance(module, nn.Module) and not inner.startswith("_"):
                yield f"{name}.{inner}", module


def in_averaged_model(root: nn.Module, path: str) -> bool:
    """Whether the submodule at ``path`` lies inside a ``torch.optim.swa_utils.AveragedModel`` (an EMA copy)."""
    from torch.optim.swa_utils import AveragedModel

    parts = path.split(".") if path else []
    return any(isinstance(_resolve(root, ".".join(parts[:i])), AveragedModel) for i in range(1, len(parts)))


def _head_paths(model: nn.Module) -> tuple[list[str], list[str]]:
    """Paths of head-like modules: those of the model itself, and copies (inside a
    ``torch.optim.swa_utils.AveragedModel``, or held by a plain attribute such as ``ModelEMA.ema``)."""
    own, copies = [], []
    for name, module in model.named_modules():
        if _is_head_like(module):
            (copies if in_averaged_model(model, name) else own).append(name)
    for base, holder in _plain_holders(model):
        copies += [f"{base}.{name}" if name else base for name, m in holder.named_modules() if _is_head_like(m)]
    return own, copies


def _is_head_like(module: nn.Module) -> bool:
    return is_yolo_head(module) or implements_protocol(module) or _is_torchvision(module)


def _is_torchvision(module: object) -> bool:
    from lightning_autoanchor.torchvision_heads import is_torchvision_generator

    return is_torchvision_generator(module)


def _adapter_at(model: nn.Module, path: str) -> Any:
    """The adapter of the head at ``path``: torchvision's generators (or a module holding exactly one) get theirs
    (:mod:`~lightning_autoanchor.torchvision_heads`), which reads the detector around them; others
    :func:`as_adapter`."""
    module = _resolve(model, path)
    if isinstance(module, nn.Module) and not implements_protocol(module) and not is_yolo_head(module) and any(
            _is_torchvision(m) for m in module.modules()):
        from lightning_autoanchor.torchvision_heads import find_torchvision_anchors

        return find_torchvision_anchors(model, path)
    return as_adapter(module)


def find_heads(model: nn.Module, names: str | Sequence[str] | None = None) -> Heads:
    """The detection heads of ``model``.

    Args:
        model: usually the LightningModule.
        names: dotted paths (``"model.head"``; plain attributes count too, as in
            ``"ema.ema.model.24"``), the first one read and all written; ``None`` to search:
            ``model.autoanchor_heads()`` if defined, else every submodule that is an
            :class:`AnchorHead` or a YOLOv5-style head. Exactly one must be found, not counting
            copies (inside a ``torch.optim.swa_utils.AveragedModel``, or held by a plain attribute
            such as YOLOv5's ``ModelEMA``), which are written too.

    Raises:
        HeadError: nothing found, several candidates, or a named module is missing or not a head.
    """
    if isinstance(names, str):
        names = [names]
    own, copies = _head_paths(model)
    if names:
        adapters = []
        for name in names:
            try:
                _resolve(model, name)
            except AttributeError:
                raise HeadError(f"head {name!r} not found in {type(model).__name__}; candidates: "
                                f"{own + copies or 'none'}") from None
            try:
                adapters.append(_adapter_at(model, name))
            except HeadError as err:
                raise HeadError(f"head {name!r}: {err}") from None
        if _kinds(adapters) != 1:
            raise HeadError(f"heads {list(names)} keep their anchors in different ways (a torchvision anchor "
                            "generator, a head declaring iou_threshold, another head): name heads of one kind")
        unwritten = [n for n in copies if n not in names]
        if callable(getattr(adapters[0], "read_anchors", None)):
            primary = adapters[0].read_anchors()
            unwritten += [n for n in own if n not in names and not _is_torchvision(_resolve(model, n))
                          and anchors_match(as_adapter(_resolve(model, n)).read_anchors(), primary)]
        return Heads(adapters, list(names), unwritten=unwritten)
    custom = getattr(model, "autoanchor_heads", None)
    if callable(custom):
        found = custom()
        if not isinstance(found, list | tuple) or not found:
            raise HeadError(f"{type(model).__name__}.autoanchor_heads() must return a non-empty list of heads "
                            f"(objects with read_anchors(), write_anchors() and strides), got {found!r}")
        for i, adapter in enumerate(found):
            if not implements_protocol(adapter) and not (isinstance(adapter, nn.Module) and is_yolo_head(adapter)):
                raise HeadError(f"{type(model).__name__}.autoanchor_heads()[{i}] is a {type(adapter).__name__}, "
                                "not a head: it needs read_anchors(), write_anchors() and strides (see AnchorHead)")
        adapters = [as_adapter(a) for a in found]
        if _kinds(adapters) != 1:
            raise HeadError(f"{type(model).__name__}.autoanchor_heads() returns heads that match in different ways "
                            "(some declare iou_threshold, some do not): return heads of one kind")
        return Heads(adapters, [f"autoanchor_heads()[{i}]" for i in range(len(found))])
    if len(own) != 1:
        how = ("set AutoAnchor(head=...) to the module path(s) of the detection head(s), e.g. head='model.head' "
               "(a list writes the same anchors to several), or define autoanchor_heads() on the LightningModule")
        if not own:
            raise HeadError(f"no detection head found in {type(model).__name__}: looked for a submodule with an "
                            f"'anchors' buffer (levels, anchors, 2) and a 'stride' tensor, a torchvision "
                            f"AnchorGenerator or DefaultBoxGenerator (RetinaNet, Faster R-CNN, SSD), or one "
                            f"implementing read_anchors()/write_anchors()/strides (the AnchorHead protocol of "
                            f"lightning_autoanchor.heads); {how}")
        raise HeadError(f"{len(own)} candidate detection heads in {type(model).__name__}: {own}; {how}")
    names = own + copies
    return Heads([_adapter_at(model, n) for n in names], names)


def _kinds(adapters: Sequence[Any]) -> int:
    """How many kinds of head are among ``adapters``: torchvision generators, custom grid heads or the others."""
    from lightning_autoanchor.torchvision_heads import TorchvisionAnchors

    return len({(isinstance(a, TorchvisionAnchors), isinstance(a, GridAnchorHead)) for a in adapters})


def write_structure_all(heads: Heads, structure: Any) -> None:
    """Write a grid head's generator arguments (see :attr:`Heads.on_grid`) into every head, all or none."""
    saved = [a.structure() for a in heads.adapters]
    done = []
    try:
        for adapter in heads.adapters:
            done.append(adapter)
            adapter.write(structure)
    except BaseException:
        for adapter, old in zip(done, saved, strict=False):
            adapter.write(old)
        raise


def write_heads(heads: Heads, anchors: Any) -> None:
    """Write ``anchors`` into every head, all or none: a ``(levels, per_level, 2)`` tensor of pixels
    (:func:`write_all`), or a grid head's generator arguments (:func:`write_structure_all`)."""
    (write_structure_all if heads.on_grid else write_all)(heads, anchors)


def holds(heads: Heads, anchors: Any) -> bool:
    """Whether every head already holds ``anchors`` (as :func:`write_heads` takes them; tensors compared
    within :data:`READBACK_RTOL`)."""
    if heads.on_grid:
        return all(adapter.structure() == anchors for adapter in heads.adapters)  # type: ignore[attr-defined]
    return all(anchors_match(adapter.read_anchors(), anchors) for adapter in heads.adapters)


def anchors_match(current: Tensor, expected: Tensor) -> bool:
    """Whether two ``(levels, per_level, 2)`` anchor tensors agree within :data:`READBACK_RTOL`."""
    if current.shape != expected.shape:
        return False
    current, expected = current.to(torch.float32), expected.to(torch.float32)
    return bool(((current - expected).abs() <= READBACK_RTOL * expected.abs()).all())


def write_all(heads: Heads, anchors: Tensor) -> None:
    """Write ``(levels, per_level, 2)`` pixel anchors into every head, all or none.

    Each head's anchors are read back after its write; if any write fails or reads back other values
    (beyond :data:`READBACK_RTOL`), the heads already written get their old anchors back and a
    :class:`HeadError` (or the write's own error) is raised.
    """
    saved = [a.read_anchors() for a in heads.adapters]
    for name, old in zip(heads.names, saved, strict=True):
        if old.shape != anchors.shape:
            raise HeadError(f"head {name}: has anchors of shape {tuple(old.shape)}, cannot take {tuple(anchors.shape)}")
    done = []
    try:
        for name, adapter in zip(heads.names, heads.adapters, strict=True):
            done.append(adapter)
            adapter.write_anchors(anchors)
            back = adapter.read_anchors()
            if not anchors_match(back, anchors):
                raise HeadError(f"head {name}: anchors read back after the write differ from those written "
                                f"({back.reshape(-1, 2).tolist()} instead of {anchors.reshape(-1, 2).tolist()}); "
                                "every head keeps its old anchors")
    except BaseException:
        for adapter, old in zip(done, saved, strict=False):
            adapter.write_anchors(old)
        raise
