"""Detection heads: find them in a model, read their anchors, write new ones in place.

The callback talks to heads through :class:`AnchorHead`: three members, all in pixels at the
training image size.

Heads that follow YOLOv5's ``Detect`` convention work as they are (:class:`YoloAnchors`): a module
with a buffer ``anchors`` of shape ``(levels, anchors_per_level, 2)`` in *stride units* and a
tensor ``stride`` of shape ``(levels,)`` in pixels. Any other head plugs in by implementing
:class:`AnchorHead` on the module itself, or by a method ``autoanchor_heads()`` on the
LightningModule that returns adapters (the first is read, all are written).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_autoanchor.errors import HeadError

__all__ = [
    "READBACK_RTOL",
    "AnchorHead",
    "Heads",
    "YoloAnchors",
    "anchors_match",
    "find_heads",
    "in_averaged_model",
    "is_yolo_head",
    "write_all",
]

READBACK_RTOL = 2.0**-7
"""Relative tolerance of anchors read back after a write (or compared on resume): the precision of
bfloat16, the coarsest floating dtype a head keeps its anchors in."""


class AnchorHead(Protocol):
    """What the callback needs from a detection head.

    Attributes:
        strides: ``(levels,)`` pixels of input per cell of each level's feature map.
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
    """The module itself when it implements :class:`AnchorHead`, else a :class:`YoloAnchors` for it."""
    return module if implements_protocol(module) else YoloAnchors(module)  # type: ignore[return-value]


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

    def modules(self) -> list[nn.Module]:
        return [a.module if isinstance(a, YoloAnchors) else a for a in self.adapters]  # type: ignore[misc]


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
    return is_yolo_head(module) or implements_protocol(module)


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
                module = _resolve(model, name)
            except AttributeError:
                raise HeadError(f"head {name!r} not found in {type(model).__name__}; candidates: "
                                f"{own + copies or 'none'}") from None
            try:
                adapters.append(as_adapter(module))
            except HeadError as err:
                raise HeadError(f"head {name!r}: {err}") from None
        primary = adapters[0].read_anchors()
        unwritten = [n for n in copies if n not in names] + [
            n for n in own if n not in names and anchors_match(as_adapter(_resolve(model, n)).read_anchors(), primary)]
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
        return Heads([as_adapter(a) for a in found], [f"autoanchor_heads()[{i}]" for i in range(len(found))])
    if len(own) != 1:
        how = ("set AutoAnchor(head=...) to the module path(s) of the detection head(s), e.g. head='model.head' "
               "(a list writes the same anchors to several), or define autoanchor_heads() on the LightningModule")
        if not own:
            raise HeadError(f"no detection head found in {type(model).__name__}: looked for a submodule with an "
                            f"'anchors' buffer (levels, anchors, 2) and a 'stride' tensor, or implementing "
                            f"read_anchors()/write_anchors()/strides (the AnchorHead protocol of "
                            f"lightning_autoanchor.heads); {how}")
        raise HeadError(f"{len(own)} candidate detection heads in {type(model).__name__}: {own}; {how}")
    names = own + copies
    return Heads([as_adapter(_resolve(model, n)) for n in names], names)


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
