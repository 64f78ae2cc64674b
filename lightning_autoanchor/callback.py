"""``AutoAnchor`` for ``pytorch_lightning``. For the unified ``lightning`` package use
:mod:`lightning_autoanchor.lightning`."""

from __future__ import annotations

from pytorch_lightning import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_autoanchor.callback_base import AutoAnchorBase

__all__ = ["AutoAnchor"]


class AutoAnchor(AutoAnchorBase, Callback):
    __doc__ = AutoAnchorBase.__doc__
    _info = staticmethod(rank_zero_info)
    _warn = staticmethod(rank_zero_warn)
