"""Section ``cli``: ``lightning-autoanchor compute FILE --json`` as a whole process, against YOLOv5's optimiser.

The whole process (interpreter start, imports, reading, fitting, printing) on a 300k-box set,
against YOLOv5's optimiser alone on the same file (medians: ours over ``--repeats`` runs, YOLOv5's
over its first ``--cli-peer-seeds`` seeds).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from harness import Bench, heading, mb, median, num, sec, table

__all__ = ["WORKERS", "add_arguments", "run"]

TARGET_SPEEDUP_CLI = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cli-peer-seeds", type=int, default=5,
                   help="YOLOv5 runs on the first N seeds in the cli section (default 5: its time varies with the "
                        "seed, by up to 2x at 300k boxes, so the ratio compares medians)")
    p.add_argument("--cli-boxes", type=int, default=300_000, help="boxes of the cli section's set (default 300k)")


def _imports(spec: dict[str, Any]) -> dict[str, Any]:
    """Import what every CLI run imports before reading a box (for the process time)."""
    for module in ("lightning_autoanchor.cli", "lightning_autoanchor.optimizer"):  # the optimizer imports torch
        importlib.import_module(module)
    return {}


WORKERS = {"imports": _imports}


def run(bench: Bench) -> None:
    """Our whole ``compute`` process against YOLOv5's optimiser call alone."""
    args = bench.args
    path = bench.synthetic(args.cli_boxes)
    heading(f"cli: whole `lightning-autoanchor compute FILE --json` process on {path.name}")
    runs = [bench.compute_cli(path) for _ in range(args.repeats)]
    out = runs[0][0]
    ours = median([r.seconds for _, r in runs])
    rows = [[f"ours: whole process, median of {len(runs)}", f"{out['n_boxes']:,}", sec(ours),
             mb(max(r.peak_rss_mb for _, r in runs)), num(out["fitness"]),
             f"{max(r.foreign_cores for _, r in runs):.2f}"]]
    _, imports = bench.worker({"kind": "imports"})
    rows.append(["ours: interpreter start + imports alone", "-", sec(imports.seconds), mb(imports.peak_rss_mb),
                 "-", f"{imports.foreign_cores:.2f}"])
    section: dict[str, Any] = {
        "imports_seconds": imports.seconds, "file": path.name, "n_boxes": out["n_boxes"],
        "ours_seconds": [r.seconds for _, r in runs],
        "ours_fit_seconds": [o["seconds"] for o, _ in runs], "ours_median_seconds": ours,
        "ours_peak_rss_mb": max(r.peak_rss_mb for _, r in runs)}
    if bench.peer_python:
        peer = [bench.peer(path, seed) for seed in args.seeds[:args.cli_peer_seeds]]
        section.update(peer_seconds=[p["seconds"] for p, _ in peer], peer_median_seconds=median(
            [p["seconds"] for p, _ in peer]), peer_peak_rss_mb=max(r.peak_rss_mb for _, r in peer))
        rows.append([f"YOLOv5: optimiser call alone, median of {len(peer)}", f"{out['n_boxes']:,}",
                     sec(section["peer_median_seconds"]), mb(section["peer_peak_rss_mb"]),
                     num(median([p["fitness"] for p, _ in peer])), f"{max(r.foreign_cores for _, r in peer):.2f}"])
    print(table(["run", "boxes", "seconds", "peak RSS MB", "fitness", "other cores"], rows))
    whole = ", ".join(f"{r.seconds:.2f}" for _, r in runs)
    fit = ", ".join(f"{o['seconds']:.3f}" for o, _ in runs)
    print(f"our runs: {whole} s, of which fit_anchors: {fit} s")
    if bench.peer_python:
        section["ratio"] = section["peer_median_seconds"] / ours
        bench.report.target("cli", f"{path.name}: YOLOv5 optimiser alone / our whole process", section["ratio"],
                           f">= {TARGET_SPEEDUP_CLI:g}", section["ratio"] >= TARGET_SPEEDUP_CLI)
    bench.report.sections["cli"] = section
