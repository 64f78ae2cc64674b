"""A tiny YOLOv5-style detector: conv backbone, ``Detect``-style head, loss that assigns targets by anchors.

Units: anchors are given in pixels at the training image size and stored by the head in stride units
(pixels / stride of their level); targets are fractions of the training image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DEFAULT_ANCHORS", "DEFAULT_STRIDES", "TinyYolo", "YoloHead", "YoloLoss"]

DEFAULT_ANCHORS: tuple[tuple[float, ...], ...] = (
    (10, 13, 16, 30, 33, 23),  # P3/8
    (30, 61, 62, 45, 59, 119),  # P4/16
    (116, 90, 156, 198, 373, 326),  # P5/32
)
"""YOLOv5's default anchors in pixels (designed for 640 px images), flat ``w, h`` pairs per level."""

DEFAULT_STRIDES: tuple[float, ...] = (8, 16, 32)


class YoloHead(nn.Module):
    """YOLOv5 ``Detect``-style head: one 1x1 conv per level predicting ``na * (5 + nc)`` channels.

    Buffers (persistent, in the ``state_dict``):
        ``stride``: ``(nl,)`` float32, pixels per grid cell of every level.
        ``anchors``: ``(nl, na, 2)`` float32 anchor widths and heights in stride units.

    ``grid`` and ``anchor_grid`` cache, per level, the cell offsets and the anchors in pixels used by
    :meth:`decode`; a level's cache is rebuilt when its shape does not match (e.g. after it was reset to
    an empty tensor, which is what must be done after writing new anchors) or is on another device.

    Args:
        num_classes: number of classes.
        in_channels: channels of the feature map of every level.
        anchors: per level, flat ``w, h`` pairs in pixels at the training size (a YOLOv5 yaml's ``anchors``).
        strides: per level, pixels per grid cell.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], anchors: Sequence[Sequence[float]],
                 strides: Sequence[float]) -> None:
        super().__init__()
        nl = len(anchors)
        if not (nl == len(in_channels) == len(strides)) or len({len(a) for a in anchors}) != 1 \
                or len(anchors[0]) % 2 or not anchors[0]:
            raise ValueError("anchors, in_channels and strides need one entry per level, and every level the "
                             f"same even number of anchor values; got {anchors}, {in_channels}, {strides}")
        self.nc, self.no, self.nl, self.na = num_classes, num_classes + 5, nl, len(anchors[0]) // 2
        stride = torch.tensor(strides, dtype=torch.float32)
        anchors_px = torch.tensor(anchors, dtype=torch.float32).view(nl, self.na, 2)
        self.register_buffer("stride", stride)
        self.register_buffer("anchors", anchors_px / stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in in_channels)
        self.grid: list[Tensor] = [torch.empty(0)] * nl
        self.anchor_grid: list[Tensor] = [torch.empty(0)] * nl
        for conv, s in zip(self.m, strides, strict=True):  # YOLOv5's priors: 8 objects per 640 px image
            bias = conv.bias.data.view(self.na, self.no)
            bias[:, 4] += math.log(8 / (640 / s) ** 2)
            bias[:, 5:] += math.log(0.6 / max(num_classes - 0.99, 0.01))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Raw logits: per level ``(B, na, H, W, 5 + nc)`` from a ``(B, C_l, H, W)`` feature map."""
        out = []
        for conv, x in zip(self.m, features, strict=True):
            b, _, h, w = x.shape
            out.append(conv(x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw: Sequence[Tensor]) -> Tensor:
        """``(B, N, 5 + nc)`` predictions: ``xc, yc, w, h`` in pixels at the training size, sigmoid scores.

        YOLOv5 decoding: ``xy = (2 sigmoid - 0.5 + cell) * stride``, ``wh = (2 sigmoid) ** 2 * anchor``.
        """
        out = []
        for i, p in enumerate(raw):
            b, _, h, w, _ = p.shape
            if self.grid[i].shape[2:4] != (h, w) or self.grid[i].device != p.device:
                self.grid[i], self.anchor_grid[i] = self._make_grid(i, h, w, p.device)
            y = p.sigmoid()
            xy = (y[..., :2] * 2 - 0.5 + self.grid[i]) * self.stride[i]
            wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(b, -1, self.no))
        return torch.cat(out, 1)

    def _make_grid(self, i: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cell offsets ``(1, na, h, w, 2)`` (grid units) and anchors ``(1, na, h, w, 2)`` (pixels)."""
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        grid = torch.stack((xs, ys), -1).float().expand(1, self.na, h, w, 2)
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(1, self.na, h, w, 2)
        return grid, anchor_grid


def _iou_giou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and generalised IoU of paired ``(n, 4)`` boxes ``xc, yc, w, h`` (any common unit)."""
    a1, a2 = a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2
    b1, b2 = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
    inter = (torch.min(a2, b2) - torch.max(a1, b1)).clamp(min=0).prod(1)
    union = a[:, 2:].prod(1) + b[:, 2:].prod(1) - inter + 1e-9
    hull = (torch.max(a2, b2) - torch.min(a1, b1)).prod(1) + 1e-9
    iou = inter / union
    return iou, iou - (hull - union) / hull


class YoloLoss(nn.Module):
    """YOLOv5-style loss: GIoU box loss, objectness BCE and class BCE over targets matched to anchors.

    A target matches an anchor of a level when ``max(r, 1 / r) < anchor_t`` for both ``r = target_w /
    anchor_w`` and ``r = target_h / anchor_h`` (sizes in stride units); it is assigned to the grid cell
    holding its centre, for every matching anchor of every level. A target that matches no anchor gives
    no box or class loss and is an objectness negative: this is why anchors that fit the data matter.

    The loss keeps references to the head's ``anchors`` and ``stride`` buffers (not copies), so anchors
    written into the head in place are used from the next step on.

    Attributes:
        last_matched: targets of the last call matched by at least one anchor.
        last_total: targets of the last call.
    """

    def __init__(self, head: YoloHead, anchor_t: float = 4.0, box_weight: float = 0.05,
                 obj_weight: float = 1.0, cls_weight: float = 0.5,
                 balance: Sequence[float] = (4.0, 1.0, 0.4)) -> None:
        super().__init__()
        if len(balance) != head.nl:
            raise ValueError(f"balance needs one objectness weight per level ({head.nl}), got {balance}")
        self.anchors = head.anchors
        self.stride = head.stride
        self.nc = head.nc
        self.anchor_t = anchor_t
        self.weights = (box_weight, obj_weight, cls_weight)
        self.balance = tuple(balance)
        self.last_matched = 0
        self.last_total = 0

    @property
    def last_match_rate(self) -> float:
        """Share of the last call's targets matched by at least one anchor (NaN if it had none)."""
        return self.last_matched / self.last_total if self.last_total else math.nan

    def forward(self, raw: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch.

        Args:
            raw: per level ``(B, na, H, W, 5 + nc)`` logits from :meth:`YoloHead.forward`.
            targets: ``(N, 6)`` rows ``[image index in batch, class, xc, yc, w, h]``, box centre and
                size as fractions of the training image size.

        Returns:
            the weighted total loss (scalar), and its detached ``box``, ``obj`` and ``cls`` parts.
        """
        zero = raw[0].new_zeros(())
        lbox, lobj, lcls = zero, zero, zero
        matched = torch.zeros(len(targets), dtype=torch.bool, device=targets.device)
        for i, p in enumerate(raw):
            _, _, h, w, _ = p.shape
            txywh = targets[:, 2:6] * targets.new_tensor([w, h, w, h])  # grid units of this level
            ratio = txywh[:, None, 2:4] / self.anchors[i][None]  # (N, na, 2)
            match = torch.max(ratio, 1 / ratio).amax(2) < self.anchor_t  # (N, na)
            matched |= match.any(1)
            t, a = match.nonzero(as_tuple=True)
            tobj = torch.zeros_like(p[..., 4])
            if len(t):
                b, cls, txywh = targets[t, 0].long(), targets[t, 1].long(), txywh[t]
                gi = txywh[:, 0].long().clamp(0, w - 1)
                gj = txywh[:, 1].long().clamp(0, h - 1)
                ps = p[b, a, gj, gi]  # (n, 5 + nc)
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * self.anchors[i][a]
                tbox = torch.cat((txywh[:, :2] - torch.stack((gi, gj), 1), txywh[:, 2:]), 1)
                iou, giou = _iou_giou(torch.cat((pxy, pwh), 1), tbox)
                lbox = lbox + (1 - giou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    tcls = F.one_hot(cls, self.nc).to(ps)
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tcls)
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * self.balance[i]
        self.last_matched, self.last_total = int(matched.sum()), len(targets)
        wb, wo, wc = self.weights
        loss = wb * lbox + wo * lobj + wc * lcls
        return loss, {"box": lbox.detach(), "obj": lobj.detach(), "cls": lcls.detach()}


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class _TinyYolo:
    """A CPU-sized YOLOv5-style detector for the AutoAnchor demo.

    The backbone halves the resolution ``log2(max(strides))`` times (two Conv-BN-SiLU blocks each,
    channels ``width * 2 ** k``) and feeds the maps at ``strides`` to a :class:`YoloHead`.

    Args:
        num_classes: number of classes.
        anchors: per level, flat ``w, h`` pairs in pixels at the training size.
        strides: per level, pixels per grid cell; powers of two, increasing.
        width: channels of the first block.
        lr: AdamW learning rate.
        anchor_t: anchor-matching threshold of the loss (YOLOv5's ``anchor_t``).
    """

    def __init__(self, num_classes: int = 80, anchors: Sequence[Sequence[float]] = DEFAULT_ANCHORS,
                 strides: Sequence[float] = DEFAULT_STRIDES, width: int = 16, lr: float = 1e-3,
                 anchor_t: float = 4.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        log2 = [math.log2(s) for s in strides]
        if any(v < 1 or v != int(v) for v in log2) or sorted(set(log2)) != log2:
            raise ValueError(f"strides must be increasing powers of two, got {strides}")
        self.out_levels = [int(v) - 1 for v in log2]
        channels = [width * 2**k for k in range(int(log2[-1]))]
        self.stages = nn.ModuleList(
            nn.Sequential(_conv(c_in, c, 2), _conv(c, c, 1))
            for c_in, c in zip([3, *channels[:-1]], channels, strict=True)
        )
        self.head = YoloHead(num_classes, [channels[k] for k in self.out_levels], anchors, strides)
        self.loss_fn = YoloLoss(self.head, anchor_t=anchor_t)
        self.lr = lr

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, S, S)`` images to per-level raw logits ``(B, na, S / stride, S / stride, 5 + nc)``."""
        features, x = [], images
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if k in self.out_levels:
                features.append(x)
        return self.head(features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _TinyYolo:
        # moving to another device or dtype replaces the head's buffers: point the loss at the new ones
        super()._apply(fn, recurse)
        self.loss_fn.anchors, self.loss_fn.stride = self.head.anchors, self.head.stride
        return self

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, targets = batch
        loss, parts = self.loss_fn(self(images), targets)
        bs = len(images)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"{stage}/{k}": v for k, v in parts.items()}, batch_size=bs)
        if self.loss_fn.last_total:  # weighted by targets: the epoch value is matched / all targets
            self.log(f"{stage}/match_rate", self.loss_fn.last_match_rate, prog_bar=True,
                     batch_size=self.loss_fn.last_total)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """``(B, N, 5 + nc)`` decoded predictions (see :meth:`YoloHead.decode`)."""
        return self.head.decode(self(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class TinyYolo(_TinyYolo, pl.LightningModule):  # type: ignore[misc]
    __doc__ = _TinyYolo.__doc__
