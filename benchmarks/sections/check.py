"""Section ``check``: ``score_anchors`` alone on the 1M-box set, boxes already loaded."""

from __future__ import annotations

import argparse
import time
from typing import Any

from harness import IMG_SIZE, YOLOV5_P3_P5, Bench, heading, mb, median, sec, table

__all__ = ["WORKERS", "add_arguments", "run"]

TARGET_CHECK_SECONDS = 0.1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check-repeats", type=int, default=9, help="score_anchors calls in the check (default 9)")


def _check(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``score_anchors`` of YOLOv5's default anchors ``repeats`` times."""
    import torch

    from lightning_autoanchor.metrics import score_anchors
    from lightning_autoanchor.optimizer import prepare_boxes
    from lightning_autoanchor.sources import load_boxes

    wh, _ = prepare_boxes(load_boxes(spec["data"]).scaled(IMG_SIZE))
    anchors = torch.tensor(YOLOV5_P3_P5, dtype=torch.float32)
    seconds = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        scores = score_anchors(wh, anchors)
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "n_boxes": scores.n_boxes, "fitness": scores.fitness}


WORKERS = {"check": _check}


def run(bench: Bench) -> None:
    """``score_anchors`` alone on the large set, boxes already loaded."""
    path = bench.synthetic(bench.args.big_boxes)
    heading(f"check: score_anchors alone on {path.name}, boxes loaded")
    result, run = bench.worker({"kind": "check", "data": str(path), "repeats": bench.args.check_repeats})
    seconds = median(result["seconds"])
    print(table(["boxes", "calls", "median s", "min s", "max s", "process peak RSS MB", "other cores"],
                [[f"{result['n_boxes']:,}", len(result["seconds"]), sec(seconds), sec(min(result["seconds"])),
                  sec(max(result["seconds"])), mb(run.peak_rss_mb), f"{run.foreign_cores:.2f}"]]))
    print("anchors: YOLOv5's P3-P5 defaults; the process also read the file")
    bench.report.target("check", f"score_anchors on {result['n_boxes']:,} boxes, median seconds", seconds,
                       f"< {TARGET_CHECK_SECONDS:g}", seconds < TARGET_CHECK_SECONDS)
    bench.report.sections["check"] = {**result, "median_seconds": seconds, "peak_rss_mb": run.peak_rss_mb,
                                     "other_cores": run.foreign_cores}
