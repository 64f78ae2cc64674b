"""Anchors that AutoAnchor fitted, brought back from a checkpoint into a freshly built model, for inference.

A checkpoint holds the callback's state (what it fitted and which heads it wrote) next to the model's
weights. Heads that keep their anchors in a persistent buffer get them back with the weights; others do
not (torchvision's ``AnchorGenerator`` keeps its cell anchors in a plain list, outside the
``state_dict``), so after ``load_from_checkpoint`` one line puts them back::

    model = MyDetector.load_from_checkpoint(path)
    restore_anchors(model, path)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_autoanchor.errors import HeadError
from lightning_autoanchor.heads import find_heads, write_heads
from lightning_autoanchor.refit_grid import update_from_dict

__all__ = ["restore_anchors"]


def restore_anchors(module: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> list[str]:
    """Write the anchors of every ``AutoAnchor`` state in ``checkpoint`` into ``module``; returns the heads written.

    Args:
        module: the LightningModule the checkpoint was saved from, freshly built or loaded, or the bare
            detector inside it (its heads are then found anew when the recorded paths do not fit).
        checkpoint: a Lightning checkpoint file, or the dict ``torch.load`` gives for one.

    Raises:
        HeadError: the checkpoint holds no AutoAnchor state, or its anchors do not fit ``module``'s heads.
    """
    data = checkpoint if isinstance(checkpoint, Mapping) else torch.load(checkpoint, map_location="cpu",
                                                                         weights_only=True)
    states = [state for key, state in (data.get("callbacks") or {}).items()
              if key.startswith("AutoAnchor") and isinstance(state, Mapping) and state.get("update")]
    if not states:
        where = checkpoint if not isinstance(checkpoint, Mapping) else "the checkpoint"
        raise HeadError(f"{where} holds no AutoAnchor state: was the model trained with the AutoAnchor callback?")
    written: list[str] = []
    for state in states:
        update = update_from_dict(state["update"])
        try:
            heads = find_heads(module, state.get("heads") or None)
        except HeadError:  # e.g. the bare detector, where the paths were the LightningModule's
            heads = find_heads(module)
        write_heads(heads, update.anchors_after)
        written += heads.names
    return written
