"""``AutoAnchor`` for the unified ``lightning`` package (``lightning.pytorch``).

``from lightning_autoanchor.lightning import AutoAnchor``, or in a ``lightning.pytorch.cli`` config:
``class_path: lightning_autoanchor.lightning.AutoAnchor``. It is the ``pytorch_lightning`` callback,
also registered as a ``lightning.pytorch.Callback``, which that package's Trainer and CLI require.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from lightning_autoanchor import callback

__all__ = ["AutoAnchor"]


class AutoAnchor(callback.AutoAnchor, Callback):
    __doc__ = callback.AutoAnchor.__doc__
