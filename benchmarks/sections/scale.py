"""Section ``scale``: the whole ``compute`` process at 0.1M, 1M and 10M boxes (about 12 boxes per image).

Time and peak memory should grow no faster than the box count.
"""

from __future__ import annotations

import argparse
import itertools
import os

from harness import Bench, heading, ints, mb, median, num, sec, table

__all__ = ["add_arguments", "run"]

TARGET_SCALE_SECONDS = 60.0
TARGET_SCALE_RSS_MB = 2048.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale-boxes", type=ints, default=[100_000, 1_000_000, 10_000_000],
                   help="box counts of the scale section (default 1e5,1e6,1e7)")
    p.add_argument("--boxes-per-image", type=float, default=12.0, help="scale section's boxes per image (default 12)")


def run(bench: Bench) -> None:
    """Whole ``compute`` process at growing box counts: time, memory, growth per box."""
    args = bench.args
    group = max(1, round(args.boxes_per_image / bench.pool.mean_boxes))
    heading(f"scale: whole `lightning-autoanchor compute FILE --json` process, about "
            f"{group * bench.pool.mean_boxes:.0f} boxes per image")
    rows, points = [], []
    for n_boxes in args.scale_boxes:
        path = bench.synthetic(n_boxes, group)
        runs = [bench.compute_cli(path) for _ in range(args.repeats)]
        out = runs[0][0]
        seconds = median([r.seconds for _, r in runs])
        point = {"file": path.name, "file_mib": path.stat().st_size / 2**20, "n_boxes": out["n_boxes_read"],
                 "n_images": out["n_images"], "seconds": [r.seconds for _, r in runs], "median_seconds": seconds,
                 "fit_seconds": [o["seconds"] for o, _ in runs], "peak_rss_mb": max(r.peak_rss_mb for _, r in runs),
                 "fitness": out["fitness"], "other_cores": max(r.foreign_cores for _, r in runs)}
        points.append(point)
        rows.append([f"{point['n_boxes']:,}", f"{point['n_images']:,}", f"{point['file_mib']:.0f}", sec(seconds),
                     sec(seconds / (point["n_boxes"] / 1e6)), sec(median(point["fit_seconds"])),
                     mb(point["peak_rss_mb"]), num(point["fitness"]), f"{point['other_cores']:.2f}"])
        print(f"  {point['n_boxes']:,} boxes: {', '.join(f'{s:.2f}' for s in point['seconds'])} s", flush=True)
        bench.drop(path)
    print(table(["boxes", "images", "file MiB", "median s", "s per 1M boxes", "fit s", "peak RSS MB", "fitness",
                 "other cores"], rows))
    print(f"{len(os.sched_getaffinity(0))} cores; median of {args.repeats} runs; peak RSS is the largest run's")
    for small, large in itertools.pairwise(points):
        growth = large["median_seconds"] / small["median_seconds"]
        factor = large["n_boxes"] / small["n_boxes"]
        bench.report.target("scale", f"time growth from {small['n_boxes']:,} to {large['n_boxes']:,} boxes "
                                    f"({factor:.1f}x the boxes)", growth, f"<= {factor:.1f}", growth <= factor)
    top = points[-1]
    if top["n_boxes"] >= 9_000_000:
        bench.report.target("scale", f"whole process on {top['n_boxes']:,} boxes, seconds", top["median_seconds"],
                           f"< {TARGET_SCALE_SECONDS:g}", top["median_seconds"] < TARGET_SCALE_SECONDS)
        bench.report.target("scale", f"whole process on {top['n_boxes']:,} boxes, peak RSS MB", top["peak_rss_mb"],
                           f"< {TARGET_SCALE_RSS_MB:g}", top["peak_rss_mb"] < TARGET_SCALE_RSS_MB)
    bench.report.sections["scale"] = {"runs": points, "cores": len(os.sched_getaffinity(0))}
