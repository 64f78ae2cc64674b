"""``AutoAnchor`` for the unified ``lightning`` package (``lightning.pytorch``).

``from lightning_autoanchor.lightning import AutoAnchor``, or in a ``lightning.pytorch.cli`` config:
``class_path: lightning_autoanchor.lightning.AutoAnchor``.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_autoanchor.callback_base import AutoAnchorBase

__all__ = ["AutoAnchor"]


class AutoAnchor(AutoAnchorBase, Callback):
    __doc__ = AutoAnchorBase.__doc__
    _info = staticmethod(rank_zero_info)
    _warn = staticmethod(rank_zero_warn)
