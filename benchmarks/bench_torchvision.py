#!/usr/bin/env python3
"""Benchmark: anchors of torchvision's RetinaNet, Faster R-CNN and SSD fitted where the model places them.

Run by hand (it is not a test); it prints one table per section::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_torchvision.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_torchvision.py --sections retinanet,million --json-out tv.json

Every row is scored by the same measure, the placed recall (:mod:`lightning_autoanchor.placed`): the share
of boxes whose best IoU with any anchor the model generates (for the image's resized and padded size) reaches
the matcher's foreground threshold, with the mean best IoU and the share left to the low-quality fallback.

Sections (``--sections``, default all):

``retinanet``
    ``retinanet_resnet50_fpn``: resize 800 / 1333, pad to 32, levels P3-P7 (grid ``ceil(padded / 2^k)``,
    stride ``padded // grid``, as ResNet-FPN with ``LastLevelP6P7`` computes them), 3 sizes x 3 ratios per
    level, threshold 0.5.
``million``
    The RetinaNet fit on 1M boxes: images of the COCO file drawn with replacement (seeded) until there are
    a million boxes; placing them and fitting, timed.
``padding``
    How much it matters that the measure pads each image alone: torchvision pads a batch to its widest and
    tallest image, which moves the grid of the levels whose stride does not divide the padded size (P6, P7:
    stride ``padded // grid``). RetinaNet's defaults and fitted anchors scored with every image padded alone
    and with every image padded to the largest size in the file (a batch holding both orientations: 1344 x
    1344 on COCO), the extreme case.
``fasterrcnn``
    ``fasterrcnn_resnet50_fpn``'s RPN: levels P2-P6, 1 size x 3 ratios per level, threshold 0.7.
``ssd``
    ``ssd300_vgg16``: fixed 300 x 300, ``DefaultBoxGenerator`` on feature maps 38-1, threshold 0.5.

Rows: the model's defaults; this project's fit in the model's structure (ratios per level, and shared by all
levels; for Faster R-CNN also ``refactor=True``, which may write its 3 anchors per location as 3 sizes x 1
ratio); and, scored by the same placed measure, two searches that work on *centred* boxes (both anchor and
box centred at the same point, as anchor tools for YOLO do):

* **MMYOLO-style**: k-means with distance ``1 - IoU`` (darknet's, MMYOLO's ``YOLOKMeansAnchorOptimizer``) on
  the box sizes at the training size, as many anchors as the model has, sorted by area and laid out
  small-to-large over the levels. These are free shapes, outside ``AnchorGenerator``'s sizes x ratios (they
  can only be written into ``cell_anchors`` directly).
* **anchor-optimization-style** (Zlocha et al.'s tool for keras-retinanet): differential evolution over ratios
  ``(1/r, 1, r)`` and per-size scales shared by all levels, each level keeping its base size (32 .. 512), the
  objective its "focal" mean ``-(1 - m)^2 log m`` of each box's best centred IoU ``m``. scipy is not a
  dependency of this project, so the evolution is written here (scipy's default strategy: best/1/bin,
  mutation dithered in [0.5, 1), crossover 0.7, population 15 per parameter, Latin-hypercube start); it
  runs on a seeded sample of 5,000 boxes.

Times: wall clock and CPU time of this process (all threads) of each fit, boxes already placed. The
machine may be shared: the load average is printed with the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.clustering import kmeans_iou
from lightning_autoanchor.detector_resize import DetectorResize, ResizedBoxes
from lightning_autoanchor.grid_fit import DefaultBoxes, GeneratorAnchors, fit_anchor_generator, fit_default_boxes
from lightning_autoanchor.metrics import wh_iou
from lightning_autoanchor.placed import Layout, PlacedBoxes, PlacedScores, place_boxes
from lightning_autoanchor.sources import read_coco

REPO = Path(__file__).resolve().parents[1]
DATA = next((base / "shared" / "data" / "coco2017_val.json.gz" for base in (REPO, REPO.parent)
             if (base / "shared" / "data").is_dir()), REPO / "shared" / "data" / "coco2017_val.json.gz")
RETINA_SIZES = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
RPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = (0.5, 1.0, 2.0)
SSD_GRIDS = (38, 19, 10, 5, 3, 1)
SSD_STEPS = (8, 16, 32, 64, 100, 300)
SSD_DEFAULT = DefaultBoxes([0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                           (300, 300))
MILLION = 1_000_000
DE_SAMPLE = 5_000


def fpn_layout(log2_strides: range) -> Layout:
    """ResNet-FPN: ``ceil(padded / 2^k)`` cells on level ``k`` (stride-2 convolutions with padding round up),
    stride ``padded // grid`` (``AnchorGenerator.forward``)."""
    def layout(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grids = np.stack([-(-padded // 2 ** k) for k in log2_strides], axis=1)
        return grids, (padded[:, None, :] // grids).astype(np.float64)
    return layout


def batch_padded(layout: Layout) -> Layout:
    """``layout`` with every image padded to the largest padded width and height of all of them, as one batch
    holding the widest and the tallest image would pad it."""
    def padded_together(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return layout(np.broadcast_to(padded.max(axis=0), padded.shape))
    return padded_together


def ssd_layout(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grids = np.broadcast_to(np.array(SSD_GRIDS)[None, :, None], (len(padded), len(SSD_GRIDS), 2))
    return grids, np.broadcast_to(np.array(SSD_STEPS, dtype=np.float64)[None, :, None], grids.shape)


def timed(call: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------------------------
# The two centred searches
# ------------------------------------------------------------------------------------------------------

def centred_sizes(box_set: BoxSet, resize: DetectorResize) -> torch.Tensor:
    """``(N, 2)`` box sizes at the training size (the first ``min_size``), as centred searches see them."""
    return torch.from_numpy(ResizedBoxes.of(box_set, resize).wh.astype(np.float32))


def mmyolo_style(wh: torch.Tensor, levels: int, per_level: int, seed: int) -> list[torch.Tensor]:
    """k-means (1 - IoU) anchors, sorted by area, ``per_level`` to each level from the smallest."""
    anchors = kmeans_iou(wh, levels * per_level, generator=torch.Generator().manual_seed(seed))
    anchors = anchors[anchors.prod(dim=1).argsort()]
    return list(anchors.split(per_level))


def _focal_objective(wh: torch.Tensor, bases: Sequence[float], n_scales: int) -> Callable[[np.ndarray], float]:
    def objective(x: np.ndarray) -> float:
        anchors = torch.cat([c for c in _de_anchors(x, bases, n_scales).cell_anchors()])
        m = wh_iou(wh, anchors).amax(dim=1).clamp(min=1e-9)
        return float((-(1 - m) ** 2 * m.log()).mean())
    return objective


def _de_anchors(x: np.ndarray, bases: Sequence[float], n_scales: int) -> GeneratorAnchors:
    r = float(x[0])
    scales = x[1:1 + n_scales]
    return GeneratorAnchors([tuple(round(b * s, 2) for s in scales) for b in bases],
                            [(round(1 / r, 4), 1.0, round(r, 4))] * len(bases))


def differential_evolution(objective: Callable[[np.ndarray], float], bounds: np.ndarray, seed: int,
                           popsize: int = 15, max_iter: int = 100, tol: float = 0.01) -> np.ndarray:
    """Minimise ``objective`` over a box: scipy's default ``best1bin`` with dithered mutation."""
    rng = np.random.default_rng(seed)
    n = len(bounds)
    size = popsize * n
    low, span = bounds[:, 0], bounds[:, 1] - bounds[:, 0]
    # Latin hypercube: one individual per stratum along every parameter
    unit = (rng.permuted(np.tile(np.arange(size), (n, 1)), axis=1).T + rng.uniform(size=(size, n))) / size
    energies = np.array([objective(low + u * span) for u in unit])
    for _ in range(max_iter):
        for i in range(size):
            best = unit[energies.argmin()]
            a, b = unit[rng.choice([j for j in range(size) if j != i], 2, replace=False)]
            mutant = np.clip(best + rng.uniform(0.5, 1.0) * (a - b), 0, 1)
            cross = rng.uniform(size=n) < 0.7
            cross[rng.integers(n)] = True
            trial = np.where(cross, mutant, unit[i])
            energy = objective(low + trial * span)
            if energy <= energies[i]:
                unit[i], energies[i] = trial, energy
        if energies.std() <= tol * abs(energies.mean()):
            break
    return low + unit[energies.argmin()] * span


def anchor_optimization_style(wh: torch.Tensor, bases: Sequence[float], n_scales: int, seed: int) -> GeneratorAnchors:
    sample = wh[torch.randperm(len(wh), generator=torch.Generator().manual_seed(seed))[:DE_SAMPLE]]
    bounds = np.array([(1.0, 4.0)] + [(0.4, 2.0)] * n_scales)
    best = differential_evolution(_focal_objective(sample, bases, n_scales), bounds, seed)
    return _de_anchors(best, bases, n_scales)


# ------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.sections: dict[str, list[dict[str, Any]]] = {}

    def row(self, section: str, method: str, structure: str, scores: PlacedScores, wall: float | None = None,
            cpu: float | None = None, anchors: dict[str, Any] | None = None) -> None:
        self.sections.setdefault(section, []).append({
            "method": method, "structure": structure, **scores.as_dict(), "wall_s": wall, "cpu_s": cpu,
            "anchors": anchors})

    def print(self, section: str, title: str) -> None:
        rows = self.sections[section]
        print(f"\n## {title}  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
        headers = ["method", "structure", f"recall@{rows[0]['thr']:g}", "mean best IoU", "low-quality only",
                   "fit wall s", "fit CPU s"]
        body = [[r["method"], r["structure"], f"{r['recall']:.4f}", f"{r['mean_best_iou']:.4f}",
                 f"{r['low_quality']:.4f}", "" if r["wall_s"] is None else f"{r['wall_s']:.2f}",
                 "" if r["cpu_s"] is None else f"{r['cpu_s']:.2f}"] for r in rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for b in body:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |")


def compare_generator(report: Report, section: str, box_set: BoxSet, placed: PlacedBoxes, resize: DetectorResize,
                      start: GeneratorAnchors, thr: float, seed: int, refactor: bool = False) -> None:
    """Defaults, our fits (ratios per level and shared; and with ``refactor``, the split of the anchors per
    location chosen too), MMYOLO-style and anchor-optimization-style rows."""
    count = f"{len(start.sizes[0])} sizes x {len(start.aspect_ratios[0])} ratios"
    report.row(section, "defaults", count, placed.score(start.cell_anchors(), thr), anchors=start.as_dict())
    for shared, refactored in ((False, False), (True, False)) + (((False, True),) if refactor else ()):
        result, wall, cpu = timed(lambda shared=shared, refactored=refactored: fit_anchor_generator(
            placed, start, thr, shared_ratios=shared, refactor=refactored, seed=seed))
        fitted = result.anchors
        structure = (f"{len(fitted.sizes[0])} sizes x {len(fitted.aspect_ratios[0])} ratios, "
                     f"ratios {'shared' if shared else 'per level'}{', refactor=True' if refactored else ''}")
        report.row(section, "this project", structure, result.scores, wall, cpu, fitted.as_dict())
    wh = centred_sizes(box_set, resize)
    per_level = start.num_anchors_per_location()[0]
    free, wall, cpu = timed(lambda: mmyolo_style(wh, len(start.sizes), per_level, seed))
    report.row(section, "MMYOLO-style k-means", f"{per_level} free shapes per level", placed.score(free, thr), wall,
               cpu, {"cell_anchors": [a.round(decimals=2).tolist() for a in free]})
    bases = [s[0] for s in start.sizes]
    de, wall, cpu = timed(lambda: anchor_optimization_style(wh, bases, len(start.sizes[0]), seed))
    report.row(section, "anchor-optimization-style DE", f"{count}, ratios shared", placed.score(de.cell_anchors(), thr),
               wall, cpu, de.as_dict())


def resampled(box_set: BoxSet, n_boxes: int, seed: int) -> BoxSet:
    """Images drawn with replacement (seeded) until they hold ``n_boxes`` boxes, with all their boxes."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(box_set.image_index, minlength=box_set.num_images)
    images = rng.integers(box_set.num_images, size=int(1.2 * n_boxes / counts.mean()))
    images = images[:int(np.searchsorted(np.cumsum(counts[images]), n_boxes)) + 1]
    order = np.argsort(box_set.image_index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = np.concatenate([order[starts[i]:starts[i + 1]] for i in images])
    new_index = np.repeat(np.arange(len(images)), counts[images])
    return BoxSet(box_set.image_sizes[images], box_set.wh[rows], new_index, xy=box_set.xy[rows],
                  source=f"{box_set.source}, {len(images)} images resampled")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="COCO detection JSON (default: %(default)s)")
    parser.add_argument("--sections", default="retinanet,million,padding,fasterrcnn,ssd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the fit's search uses one)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    box_set = read_coco(args.data)
    print(f"{args.data}: {len(box_set)} boxes in {box_set.num_images} images; torch {torch.__version__}, "
          f"{args.threads} threads; seed {args.seed}")
    report = Report()
    rcnn_resize = DetectorResize((800,), 1333, 32)
    retina_start = GeneratorAnchors(RETINA_SIZES, [RATIOS] * 5)
    retina_layout = fpn_layout(range(3, 8))  # P3-P7

    if "retinanet" in sections:
        placed, wall, cpu = timed(lambda: place_boxes(box_set, rcnn_resize, retina_layout))
        print(f"RetinaNet: {placed.n_boxes} boxes placed in {wall:.2f} s ({placed.n_dropped} under 2 px left out)")
        compare_generator(report, "retinanet", box_set, placed, rcnn_resize, retina_start, 0.5, args.seed)
        report.print("retinanet", "retinanet_resnet50_fpn, COCO val2017, 800/1333, threshold 0.5")

    if "million" in sections:
        big = resampled(box_set, MILLION, args.seed)
        placed, place_wall, place_cpu = timed(lambda: place_boxes(big, rcnn_resize, retina_layout))
        result, wall, cpu = timed(lambda: fit_anchor_generator(placed, retina_start, 0.5, seed=args.seed))
        report.row("million", "defaults", "3 sizes x 3 ratios", result.start)
        report.row("million", "this project", "3 sizes x 3 ratios, ratios per level", result.scores, wall, cpu,
                   result.anchors.as_dict())
        report.print("million", f"RetinaNet fit on {len(big):,} boxes ({big.num_images:,} resampled images; "
                                f"placing them: {place_wall:.2f} s wall, {place_cpu:.2f} s CPU; search on "
                                f"{result.n_search_rows:,} rows, scores on all)")

    if "padding" in sections:
        alone = place_boxes(box_set, rcnn_resize, retina_layout)
        together = place_boxes(box_set, rcnn_resize, batch_padded(retina_layout))
        fitted = fit_anchor_generator(alone, retina_start, 0.5, seed=args.seed).anchors
        for name, anchors in (("defaults", retina_start), ("this project", fitted)):
            for padding, placed in (("each image padded alone (the measure)", alone),
                                    ("every image padded to the largest", together)):
                report.row("padding", name, padding, placed.score(anchors.cell_anchors(), 0.5))
        report.print("padding", "RetinaNet, COCO val2017: each image padded alone or all padded to the largest")

    if "fasterrcnn" in sections:
        placed = place_boxes(box_set, rcnn_resize, fpn_layout(range(2, 7)))
        compare_generator(report, "fasterrcnn", box_set, placed, rcnn_resize, GeneratorAnchors(RPN_SIZES, [RATIOS] * 5),
                          0.7, args.seed, refactor=True)
        report.print("fasterrcnn", "fasterrcnn_resnet50_fpn (RPN), COCO val2017, 800/1333, threshold 0.7")

    if "ssd" in sections:
        ssd_resize = DetectorResize((300,), 300, 1, (300, 300))
        placed = place_boxes(box_set, ssd_resize, ssd_layout, offsets=0.5)
        result, wall, cpu = timed(lambda: fit_default_boxes(placed, SSD_DEFAULT, 0.5, seed=args.seed))
        report.row("ssd", "defaults", "DefaultBoxGenerator", result.start, anchors=SSD_DEFAULT.as_dict())
        report.row("ssd", "this project", "scales + ratio values per level", result.scores, wall, cpu,
                   result.anchors.as_dict())
        report.print("ssd", f"ssd300_vgg16, COCO val2017, 300x300, threshold 0.5 ({placed.n_dropped} boxes under "
                            "2 px left out)")

    for section, rows in report.sections.items():
        fitted = [r for r in rows if r["anchors"] is not None and r["method"] != "defaults"]
        if fitted:
            print(f"\n{section} anchors:")
        for r in fitted:
            print(f"  {r['method']} ({r['structure']}): {json.dumps(r['anchors'])}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report.sections, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
