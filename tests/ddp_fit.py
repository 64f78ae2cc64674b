"""Run by tests/test_ddp.py as a script: a 2-process DDP fit on CPU (gloo) with AutoAnchor.

    python tests/ddp_fit.py OUT_DIR {ok,no-boxes,defaults,spawn}

Each rank writes ``rank{N}.json``: its final anchors (pixels), how often it read the boxes, and the
error it raised, if any. Lightning's DDP launcher starts rank 1 by running this script again.
``defaults``: the callback with its defaults (no ``save_dir``) and a CSV logger. ``spawn``: the
``ddp_spawn`` strategy; the starting process writes ``main.json`` with what the callback tells it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_autoanchor import AutoAnchor, BoxSet
from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo


class CountingData(RenderedBoxesDataModule):
    def __init__(self, empty: bool) -> None:
        super().__init__(img_size=64, batch_size=4)
        self.empty = empty
        self.box_reads = 0

    def autoanchor_boxes(self) -> BoxSet:
        self.box_reads += 1
        if self.empty:
            return BoxSet(np.array([[640, 480]]), np.zeros((0, 2)), np.zeros(0))
        return super().autoanchor_boxes()


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0)
    data, model = CountingData(empty=mode == "no-boxes"), TinyYolo(width=4)
    callback = AutoAnchor(img_size=64) if mode in ("defaults", "spawn") else AutoAnchor(img_size=64, save_dir=str(out))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn" if mode == "spawn" else "ddp",
                         max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                         logger=CSVLogger(out) if mode == "defaults" else False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         callbacks=[callback])
    error = None
    try:
        trainer.fit(model, data)
    except Exception as err:  # recorded for the test, which checks every rank got the same one
        error = f"{type(err).__name__}: {err}"
    anchors = (model.head.anchors * model.head.stride.view(-1, 1, 1)).tolist()
    if mode == "spawn":  # this is the starting process; the ranks ran in spawned ones
        update = callback.update
        (out / "main.json").write_text(json.dumps({"anchors": anchors, "error": error, "replaced": update and
                                                   update.replaced, "after": update and update.anchors_after.tolist()}))
        return
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"anchors": anchors, "box_reads": data.box_reads,
                                                                     "error": error}))
    if torch.distributed.is_initialized():  # else gloo's threads may abort the process as it exits (SIGABRT)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
