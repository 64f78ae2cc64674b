#!/usr/bin/env python3
"""Do fitted anchors help training? The demo detector trained with YOLOv5's default anchors and with
the anchors the ``AutoAnchor`` callback fits, on CPU, for a fixed budget, over several seeds.

Run by hand (it is not a test; ``tests/test_bench_training.py`` covers its pieces on tiny budgets)::

    pip install -e ".[bench]"       # torchmetrics' MeanAveragePrecision needs torchvision and pycocotools
    nice -n 19 python benchmarks/bench_training.py --json-out bench_training.json

Data sets, both rendered by the demo's renderer (``lightning_autoanchor.demo``) at 160 px:

``coco``
    The demo's own slice of COCO val2017 (1,000 images, 7,179 boxes; median box 15 x 17 px at 160 px).
``coco-small``
    Smaller objects: the first 1,000 images (by id) of COCO val2017 (``--coco``) that have a box whose
    longer side is under 64 px when the image is letterboxed to 640 px, with only those boxes kept
    (COCO's "small" objects and the smaller "medium" ones; median 5.6 x 6.8 px at 160 px), written as a
    COCO-style file in a temporary folder.

Each set is split 80/20 into train and val images (split seed 0, the same for every run). The detector
is the demo's TinyYolo (``--width 8``) with one class: its loss then ignores the classes, so the short
budget goes to finding and sizing boxes, which is what anchors change (the images keep their colour per
class). Arms: ``default``, YOLOv5's default anchors (made for 640 px images); ``fitted``, the same with
``AutoAnchor(img_size=160, seed=seed)`` in the callbacks, which checks the anchors at fit start and
writes fitted ones into the head when the best possible recall is under 0.98. Everything else is equal
between the arms of one seed: initial weights, batch order, rendering. After ``--epochs`` epochs (AdamW,
lr 1e-3, batch 16) each model is scored on the val images: the match rate (share of targets the loss
matches to an anchor), and COCO mAP@0.5 and mAP@0.5:0.95 (torchmetrics' ``MeanAveragePrecision``,
pycocotools backend) of its decoded predictions after NMS (``torchvision.ops.batched_nms``, IoU 0.6;
scores over 0.001, at most 100 per image, as YOLOv5's val). The table gives the mean and standard
deviation over seeds.

Runs go ``--jobs`` at a time (default 2), each in its own process on ``--threads`` torch threads (default
1): on a machine whose cores other processes also use, a thread pool that waits for a busy core slows
every step, while one thread per process keeps both cores working.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_autoanchor import AutoAnchor
from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo
from lightning_autoanchor.refit import AnchorUpdate

IMG_SIZE = 160
SMALL_SIDE = 64.0
"""coco-small keeps the boxes whose longer side is under this many pixels at 640 px (letterbox)."""
ARMS = ("default", "fitted")
METRICS = ("match_rate", "map_50", "map")


@dataclass(frozen=True)
class RunResult:
    """One training run of one arm on one data set with one seed, scored on the val images."""

    data: str
    arm: str
    seed: int
    match_rate: float
    map_50: float
    map: float
    replaced: bool
    bpr_before: float
    bpr_after: float
    anchors: list[list[float]]
    train_seconds: float


def small_objects_slice(source: str | os.PathLike[str], out: str | os.PathLike[str], *, max_side: float = SMALL_SIDE,
                        images: int = 1000, letterbox: float = 640.0) -> Path:
    """Write a COCO-style ``.json.gz`` of ``source``'s first ``images`` images (by id) having boxes whose
    longer side is under ``max_side`` pixels at ``letterbox`` px, with only those boxes; returns ``out``."""
    with gzip.open(source, "rt") as f:
        data = json.load(f)
    scale = {im["id"]: letterbox / max(im["width"], im["height"]) for im in data["images"]}
    kept = [a for a in data["annotations"] if max(a["bbox"][2], a["bbox"][3]) * scale[a["image_id"]] < max_side]
    ids = sorted({a["image_id"] for a in kept})[:images]
    chosen = set(ids)
    sliced = {
        "info": {"description": f"{images} images of {Path(source).name} with boxes under {max_side:g} px "
                                f"at {letterbox:g} px (letterbox), only those boxes"},
        "images": [im for im in data["images"] if im["id"] in chosen],
        "annotations": [a for a in kept if a["image_id"] in chosen],
        "categories": data["categories"],
    }
    out = Path(out)
    with gzip.open(out, "wt") as f:
        json.dump(sliced, f)
    return out


def data_module(annotations: str | os.PathLike[str] | None, batch_size: int = 16) -> RenderedBoxesDataModule:
    """The rendered images of ``annotations`` (``None``: the demo's slice) at 160 px, split 80/20 with seed 0."""
    return RenderedBoxesDataModule(str(annotations) if annotations else None, img_size=IMG_SIZE,
                                   batch_size=batch_size, train_fraction=0.8, seed=0)


def predictions(model: TinyYolo, images: torch.Tensor, *, conf: float = 0.001, iou: float = 0.6,
                max_det: int = 100) -> list[dict[str, torch.Tensor]]:
    """Per image, ``boxes`` ``(n, 4)`` xyxy pixels, ``scores`` and ``labels`` after per-class NMS (YOLOv5's val)."""
    from torchvision.ops import batched_nms, box_convert

    decoded = model.head.decode(model(images))  # (B, N, 5 + nc)
    out = []
    for det in decoded:
        scores, labels = (det[:, 5:] * det[:, 4:5]).max(dim=1) if model.head.nc > 1 else (det[:, 4], det[:, 4] * 0)
        keep = scores > conf
        boxes = box_convert(det[keep, :4], "cxcywh", "xyxy")
        scores, labels = scores[keep], labels[keep].long()
        kept = batched_nms(boxes, scores, labels, iou)[:max_det]
        out.append({"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]})
    return out


def ground_truth(targets: torch.Tensor, batch_size: int, classes: bool) -> list[dict[str, torch.Tensor]]:
    """Per image, ``boxes`` xyxy pixels and ``labels`` (all 0 unless ``classes``) from ``(N, 6)`` rows
    ``[image, class, xc, yc, w, h]`` (fractions of the image size)."""
    from torchvision.ops import box_convert

    out = []
    for b in range(batch_size):
        rows = targets[targets[:, 0] == b]
        labels = rows[:, 1].long() if classes else torch.zeros(len(rows), dtype=torch.long)
        out.append({"boxes": box_convert(rows[:, 2:6] * IMG_SIZE, "cxcywh", "xyxy"), "labels": labels})
    return out


@torch.no_grad()
def match_rate(model: TinyYolo, loader: Any) -> float:
    """Share of ``loader``'s targets that ``model``'s loss matches to at least one anchor (in eval mode)."""
    model.eval()
    matched = total = 0
    for images, targets in loader:
        model.loss_fn(model(images), targets)
        matched, total = matched + model.loss_fn.last_matched, total + model.loss_fn.last_total
    return matched / total


@torch.no_grad()
def mean_ap(model: TinyYolo, loader: Any) -> dict[str, float]:
    """COCO ``map_50`` and ``map`` (0.5:0.95) of ``model`` on ``loader``'s images (class-agnostic for one class)."""
    from torchmetrics.detection import MeanAveragePrecision

    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    for images, targets in loader:
        metric.update(predictions(model, images), ground_truth(targets, len(images), classes=model.head.nc > 1))
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):  # pycocotools prints its summary
        warnings.simplefilter("ignore")
        scores = metric.compute()
    return {"map_50": float(scores["map_50"]), "map": float(scores["map"])}


@dataclass
class Trained:
    """A model trained by :func:`train_arm`, its data and what the callback did (``None`` for ``default``)."""

    model: TinyYolo
    data: RenderedBoxesDataModule
    update: AnchorUpdate | None
    seconds: float


def train_arm(annotations: str | os.PathLike[str] | None, arm: str, seed: int, *, epochs: int, width: int = 8,
              batch_size: int = 16, limit_batches: int | float = 1.0,
              save_dir: str | os.PathLike[str]) -> Trained:
    """Train a one-class TinyYolo for ``epochs`` epochs with the default anchors (``arm="default"``) or with
    AutoAnchor (``"fitted"``). Weights and batch order depend on ``seed`` only; the global random state is
    restored afterwards."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    dm = data_module(annotations, batch_size)
    callbacks = [AutoAnchor(img_size=IMG_SIZE, seed=seed, plot=False, save_dir=str(save_dir))] if arm == "fitted" \
        else []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyYolo(num_classes=1, width=width)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_train_batches=limit_batches, limit_val_batches=0, num_sanity_val_steps=0,
                             default_root_dir=str(save_dir))
        started = time.perf_counter()
        with contextlib.redirect_stdout(None):  # the callback's report
            trainer.fit(model, dm)
    return Trained(model, dm, callbacks[0].update if callbacks else None, time.perf_counter() - started)


def run_arm(data: str, annotations: str | os.PathLike[str] | None, arm: str, seed: int, *, epochs: int,
            width: int = 8, limit_batches: int | float = 1.0, save_dir: str | os.PathLike[str]) -> RunResult:
    """:func:`train_arm`, then the match rate and mAP on the val images."""
    trained = train_arm(annotations, arm, seed, epochs=epochs, width=width, limit_batches=limit_batches,
                        save_dir=save_dir)
    loader = trained.data.val_dataloader()
    head, update = trained.model.head, trained.update
    anchors = (head.anchors * head.stride.view(-1, 1, 1)).reshape(-1, 2)
    return RunResult(data=data, arm=arm, seed=seed, match_rate=match_rate(trained.model, loader),
                     **mean_ap(trained.model, loader), replaced=bool(update and update.replaced),
                     bpr_before=update.before.bpr if update else math.nan,
                     bpr_after=update.after.bpr if update else math.nan,
                     anchors=[[round(float(w), 1), round(float(h), 1)] for w, h in anchors.tolist()],
                     train_seconds=trained.seconds)


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per data set and arm: mean and standard deviation over seeds of every metric (std 0 for one seed)."""
    rows = []
    for data in dict.fromkeys(r.data for r in results):
        for arm in ARMS:
            runs = [r for r in results if r.data == data and r.arm == arm]
            if not runs:
                continue
            row: dict[str, Any] = {"data": data, "arm": arm, "seeds": [r.seed for r in runs]}
            for key in METRICS:
                values = [getattr(r, key) for r in runs]
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["train_seconds"] = statistics.fmean(r.train_seconds for r in runs)
            rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table: mean ± standard deviation over seeds."""
    lines = ["| data | anchors | seeds | match rate | mAP@0.5 | mAP@0.5:0.95 | train s |",
             "|---|---|---:|---|---|---|---:|"]
    for row in rows:
        cells = [f"{row[k]:.3f} ± {row[f'{k}_std']:.3f}" for k in METRICS]
        lines.append(f"| {row['data']} | {row['arm']} | {len(row['seeds'])} | {' | '.join(cells)} | "
                     f"{row['train_seconds']:.0f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (GPU available, ...) and its few-workers warnings are noise here."""
    import logging

    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*(GPU|TPU|HPU).*available.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # some Lightning versions on newer torch
        try:
            yield
        finally:
            logger.setLevel(level)


def _run_job(job: dict[str, Any]) -> RunResult:
    """:func:`run_arm` in a worker process: one torch thread, Lightning's chatter off."""
    torch.set_num_threads(job.pop("threads"))
    with _quiet_lightning():
        return run_arm(**job)


def _line(result: RunResult) -> str:
    return (f"{result.data:10} {result.arm:7} seed {result.seed}: match {result.match_rate:.3f}  "
            f"mAP@0.5 {result.map_50:.4f}  mAP {result.map:.4f}  replaced {result.replaced}  "
            f"BPR {result.bpr_before:.3f} -> {result.bpr_after:.3f}  ({result.train_seconds:.0f} s training)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", default="/work/shared/data/coco2017_val.json.gz",
                        help="COCO val2017 annotations (json or json.gz) for the coco-small set")
    parser.add_argument("--data", nargs="+", default=["coco", "coco-small"], choices=["coco", "coco-small"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=8, help="TinyYolo's channels of the first block")
    parser.add_argument("--limit-batches", type=int, default=None, help="train batches per epoch (default all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"# bench_training {dt.datetime.now().isoformat(timespec='seconds')}: {os.cpu_count()} cores "
          f"{platform.processor()}, torch {torch.__version__}, Python {platform.python_version()}; "
          f"{args.jobs} runs at a time, {args.threads} thread(s) each; epochs {args.epochs}, width {args.width}, "
          f"seeds {args.seeds}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        sources = {"coco": None}
        if "coco-small" in args.data:
            sources["coco-small"] = small_objects_slice(args.coco, Path(tmp) / "coco_small.json.gz")
        jobs = [{"data": data, "annotations": sources[data], "arm": arm, "seed": seed, "epochs": args.epochs,
                 "width": args.width, "limit_batches": args.limit_batches or 1.0, "threads": args.threads,
                 "save_dir": Path(tmp) / f"{data}-{arm}-{seed}"}
                for data in args.data for seed in args.seeds for arm in ARMS]
        results: list[RunResult] = []
        if args.jobs > 1:  # fresh interpreters: no thread pool or Lightning state inherited by forking
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(_run_job, job) for job in jobs]):
                    results.append(future.result())
                    print(_line(results[-1]), flush=True)
        else:
            for job in jobs:
                results.append(_run_job(job))
                print(_line(results[-1]), flush=True)
    order = {(job["data"], job["seed"], job["arm"]): i for i, job in enumerate(jobs)}
    results.sort(key=lambda r: order[r.data, r.seed, r.arm])
    rows = summarise(results)
    print()
    print(markdown_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "runs": [asdict(r) for r in results], "summary": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
