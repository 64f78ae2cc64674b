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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lightning_autoanchor.errors import HeadError


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

    @property
    def primary(self) -> AnchorHead:
        return self.adapters[0]

    def modules(self) -> list[nn.Module]:
        return [a.module if isinstance(a, YoloAnchors) else a for a in self.adapters]  # type: ignore[misc]


def _inside_averaged_model(root: nn.Module, path: str) -> bool:
    """Whether the submodule at ``path`` lies inside a ``torch.optim.swa_utils.AveragedModel`` (an EMA copy)."""
    from torch.optim.swa_utils import AveragedModel

    module = root
    for part in path.split(".")[:-1] if path else []:
        module = getattr(module, part)
        if isinstance(module, AveragedModel):
            return True
    return False


def find_heads(model: nn.Module, names: str | Sequence[str] | None = None) -> Heads:
    """The detection heads of ``model``.

    Args:
        model: usually the LightningModule.
        names: dotted module paths (``"model.head"``), the first one read and all written; ``None``
            to search: ``model.autoanchor_heads()`` if defined, else every submodule that is a
            :class:`AnchorHead` or a YOLOv5-style head. Exactly one must be found, not counting
            copies inside a ``torch.optim.swa_utils.AveragedModel`` (EMA), which are written too.

    Raises:
        HeadError: nothing found, several candidates, or a named module is missing or not a head.
    """
    if isinstance(names, str):
        names = [names]
    if names:
        adapters = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise HeadError(f"head {name!r} not found in {type(model).__name__}; candidates: "
                                f"{_candidate_names(model) or 'none'}") from None
            try:
                adapters.append(as_adapter(module))
            except HeadError as err:
                raise HeadError(f"head {name!r}: {err}") from None
        return Heads(adapters, list(names))
    custom = getattr(model, "autoanchor_heads", None)
    if callable(custom):
        adapters = list(custom())
        if not adapters:
            raise HeadError(f"{type(model).__name__}.autoanchor_heads() returned no heads")
        return Heads(adapters, [f"autoanchor_heads()[{i}]" for i in range(len(adapters))])
    found = _candidate_names(model)
    primary = [n for n in found if not _inside_averaged_model(model, n)]
    if len(primary) != 1:
        how = ("set AutoAnchor(head=...) to the module path(s) of the detection head(s), e.g. head='model.head' "
               "(a list writes the same anchors to several), or define autoanchor_heads() on the LightningModule")
        if not primary:
            raise HeadError(f"no detection head found in {type(model).__name__}: looked for a submodule with an "
                            f"'anchors' buffer (levels, anchors, 2) and a 'stride' tensor, or implementing "
                            f"read_anchors()/write_anchors(); {how}")
        raise HeadError(f"{len(primary)} candidate detection heads in {type(model).__name__}: {primary}; {how}")
    shadows = [n for n in found if n not in primary]
    names = primary + shadows
    return Heads([as_adapter(model.get_submodule(n)) for n in names], names)


def _candidate_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_yolo_head(m) or implements_protocol(m)]


def check_anchors(anchors: Tensor, where: str) -> None:
    """Raise :class:`HeadError` unless ``anchors`` is ``(levels, anchors, 2)``, finite and positive."""
    if anchors.ndim != 3 or anchors.shape[-1] != 2 or anchors.numel() == 0:
        raise HeadError(f"{where}: anchors must have shape (levels, anchors_per_level, 2), got {tuple(anchors.shape)}")
    if not bool(torch.isfinite(anchors).all()) or not bool((anchors > 0).all()):
        raise HeadError(f"{where}: anchors must be positive and finite, got {anchors.reshape(-1, 2).tolist()}")


def follows_strides(anchors: Tensor, strides: Tensor) -> bool:
    """Whether the levels' mean anchor areas grow with their strides (YOLOv5's ``check_anchor_order``).

    ``anchors``: ``(levels, per_level, 2)`` pixels; ``strides``: ``(levels,)``.
    """
    areas = anchors.prod(dim=-1).mean(dim=-1)[strides.argsort()]
    return bool((areas.diff() >= 0).all())


def assign_to_levels(anchors: Tensor, strides: Tensor, per_level: int) -> Tensor:
    """Arrange anchors sorted by area over levels in stride order: small anchors on fine levels.

    Args:
        anchors: ``(K, 2)`` pixels, sorted from small to large area.
        strides: ``(levels,)`` in the head's level order.
        per_level: anchors per level (``K = levels * per_level``).

    Returns:
        ``(levels, per_level, 2)`` in the head's level order.
    """
    groups = anchors.reshape(len(strides), per_level, 2)
    out = torch.empty_like(groups)
    out[strides.argsort()] = groups
    return out


def write_all(heads: Heads, anchors: Tensor) -> None:
    """Write ``(levels, per_level, 2)`` pixel anchors into every head, all or none.

    If any write fails, the heads already written get their old anchors back and the error is raised.
    """
    saved = [a.read_anchors() for a in heads.adapters]
    for name, old in zip(heads.names, saved, strict=True):
        if old.shape != anchors.shape:
            raise HeadError(f"head {name}: has anchors of shape {tuple(old.shape)}, cannot take {tuple(anchors.shape)}")
    done = []
    try:
        for adapter in heads.adapters:
            adapter.write_anchors(anchors)
            done.append(adapter)
    except BaseException:
        for adapter, old in zip(done, saved, strict=False):
            adapter.write_anchors(old)
        raise
