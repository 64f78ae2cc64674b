"""Section ``read``: ``read_yolo`` on a YOLO dataset of 100k images, and a whole ``compute`` run on it.

Tiny JPEG files with real sizes in their headers, and their label files: first read (worker
processes on all cores) and second read (cache), plus a whole ``compute`` run on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import Bench, heading, mb, sec, table
from synthetic import write_yolo_dataset

__all__ = ["WORKERS", "add_arguments", "run"]

TARGET_CACHED_READ_SECONDS = 1.0
"""The issue asks that a second read be "instant"; we read that as a cached read of 100k images in under 1 s."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--read-images", type=int, default=100_000, help="images of the read section (default 100k)")


def _read(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one ``read_yolo`` call (``clear_cache``: delete the cache first)."""
    from lightning_autoanchor.sources import read_yolo

    if spec.get("clear_cache"):  # the cache is written beside the dataset YAML
        for cache in Path(spec["data"]).parent.glob(".*.autoanchor-cache.npz"):
            cache.unlink()
    started = time.perf_counter()
    box_set = read_yolo(spec["data"], split="train")
    return {"seconds": time.perf_counter() - started, "n_boxes": len(box_set), "n_images": box_set.num_images}


WORKERS = {"read": _read}


def run(bench: Bench) -> None:
    """``read_yolo`` on a large YOLO dataset: first read, cached read, whole ``compute`` process."""
    args = bench.args
    heading(f"read: YOLO txt labels of {args.read_images:,} images, through a dataset YAML")
    started = time.perf_counter()
    sizes, boxes, index = bench.pool.sample(args.read_images, 1, np.random.default_rng([args.data_seed, 1]))
    root = bench.tmp / "yolo"
    config = write_yolo_dataset(root, sizes, boxes, index)
    print(f"built {args.read_images:,} JPEG files + label files ({len(boxes):,} boxes) in "
          f"{time.perf_counter() - started:.1f} s; they are in the OS page cache (just written)", flush=True)
    try:
        # the reader's worker processes are forked children that the measured process waits for,
        # so CpuWatch counts their CPU time as the run's own
        first, first_run = bench.worker({"kind": "read", "data": str(config), "clear_cache": True})
        second, second_run = bench.worker({"kind": "read", "data": str(config)})
        out, cli_run = bench.compute_cli(config)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [["read_yolo, first read (no cache; worker processes on all cores)", f"{first['n_boxes']:,}",
             sec(first["seconds"]), mb(first_run.peak_rss_mb), f"{first_run.foreign_cores:.2f}"],
            ["read_yolo, second read (cache)", f"{second['n_boxes']:,}", sec(second["seconds"]),
             mb(second_run.peak_rss_mb), f"{second_run.foreign_cores:.2f}"],
            ["whole `compute data.yaml --json` process (cache)", f"{out['n_boxes_read']:,}", sec(cli_run.seconds),
             mb(cli_run.peak_rss_mb), f"{cli_run.foreign_cores:.2f}"]]
    print(table(["run", "boxes", "seconds", "peak RSS MB", "other cores"], rows))
    print(f"{len(os.sched_getaffinity(0))} cores; read_yolo seconds are the call alone (process start excluded); "
          "peak RSS covers all of a run's processes")
    bench.report.target("read", f"cached read of {args.read_images:,} images, seconds (our reading of "
                               "'instant')", second["seconds"],
                       f"< {TARGET_CACHED_READ_SECONDS:g}", second["seconds"] < TARGET_CACHED_READ_SECONDS)
    bench.report.sections["read"] = {
        "n_images": first["n_images"], "n_boxes": first["n_boxes"], "first_seconds": first["seconds"],
        "first_peak_rss_mb": first_run.peak_rss_mb, "second_seconds": second["seconds"],
        "second_peak_rss_mb": second_run.peak_rss_mb, "cli_seconds": cli_run.seconds,
        "cli_peak_rss_mb": cli_run.peak_rss_mb,
        "other_cores": max(first_run.foreign_cores, second_run.foreign_cores, cli_run.foreign_cores)}
