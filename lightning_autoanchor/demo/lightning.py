"""The demo for the unified ``lightning`` package: ``TinyYolo`` and ``RenderedBoxesDataModule`` as
``lightning.pytorch`` classes (``lightning_autoanchor.demo`` has them for ``pytorch_lightning``)."""

from __future__ import annotations

import lightning.pytorch as L

from lightning_autoanchor.demo.data import _RenderedBoxesDataModule
from lightning_autoanchor.demo.model import _TinyYolo

__all__ = ["RenderedBoxesDataModule", "TinyYolo"]


class TinyYolo(_TinyYolo, L.LightningModule):  # type: ignore[misc]
    __doc__ = _TinyYolo.__doc__


class RenderedBoxesDataModule(_RenderedBoxesDataModule, L.LightningDataModule):  # type: ignore[misc]
    __doc__ = _RenderedBoxesDataModule.__doc__
