"""Section ``counts``: ``compute --n auto`` (anchor counts 3-15) as a whole process, and each count against a full fit.

The curve of :func:`~lightning_autoanchor.anchor_count.fit_anchor_counts` searches each count from
two starts without evolution; here every count's fitness is compared with a full ``fit_anchors``
(4 k-means starts, 1000 generations) on the real sets, and the whole
``lightning-autoanchor compute FILE --n auto --json`` process is timed on COCO val2017 (36k boxes).
"""

from __future__ import annotations

import time
from typing import Any

from harness import GENERATIONS, IMG_SIZE, REAL_SETS, Bench, heading, mb, median, num, sec, table

__all__ = ["WORKERS", "run"]

TARGET_AUTO_SECONDS = 3.0
TARGET_COUNT_FITNESS_GAP = 0.001
AUTO_SET = "COCO val2017"


def _curve(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the curve over counts 3-15 and a full fit of every count; return both fitnesses per count."""
    from lightning_autoanchor.anchor_count import fit_anchor_counts
    from lightning_autoanchor.optimizer import fit_anchors
    from lightning_autoanchor.sources import load_boxes

    wh = load_boxes(spec["data"]).scaled(IMG_SIZE)
    fit_anchors(wh, 3, generations=10)  # first-call costs out of the timings
    started = time.perf_counter()
    curve = fit_anchor_counts(wh)
    curve_seconds = time.perf_counter() - started
    full, full_seconds = [], 0.0
    for n in curve.counts:
        result = fit_anchors(wh, n, generations=GENERATIONS)
        full.append(result.scores.fitness)
        full_seconds += result.seconds
    return {"counts": curve.counts, "curve": [r.scores.fitness for r in curve.rows], "full": full,
            "curve_seconds": curve_seconds, "full_seconds": full_seconds, "recommended": curve.recommended,
            "n_boxes": curve.rows[0].scores.n_boxes}


WORKERS = {"curve": _curve}


def run(bench: Bench) -> None:
    """The whole ``--n auto`` process; per count, the curve's fitness against a full fit's."""
    args = bench.args
    section: dict[str, Any] = {}
    for name, file in REAL_SETS.items():
        path = bench.data_dir / file
        heading(f"counts: {name}, anchor counts 3-15, the curve against full fits")
        result, run_ = bench.worker({"kind": "curve", "data": str(path)})
        gaps = [f - c for c, f in zip(result["curve"], result["full"], strict=True)]
        rows = [[n, num(c), num(f), f"{g:+.4f}", "*" if n == result["recommended"] else ""]
                for n, c, f, g in zip(result["counts"], result["curve"], result["full"], gaps, strict=True)]
        print(table(["n", "fitness: curve", f"full fit ({GENERATIONS} gen., 4 starts)", "full - curve",
                     "recommended"], rows))
        print(f"{result['n_boxes']:,} boxes; curve {sec(result['curve_seconds'])} s for all counts, full fits "
              f"{sec(result['full_seconds'])} s; worker peak RSS {mb(run_.peak_rss_mb)} MB, other cores "
              f"{run_.foreign_cores:.2f}")
        bench.report.target("counts", f"{name}: largest fitness gap of a count to its full fit", max(gaps),
                            f"<= {TARGET_COUNT_FITNESS_GAP:g}", max(gaps) <= TARGET_COUNT_FITNESS_GAP)
        section[name] = {**result, "gaps": gaps, "peak_rss_mb": run_.peak_rss_mb}

    path = bench.data_dir / REAL_SETS[AUTO_SET]
    heading(f"counts: whole `lightning-autoanchor compute {path.name} --n auto --json` process")
    runs = [bench.compute_cli(path, "--n", "auto") for _ in range(args.repeats)]
    seconds = median([r.seconds for _, r in runs])
    out = runs[0][0]
    print(table(["run", "boxes", "median s", "curve s", "recommended", "peak RSS MB", "other cores"],
                [[f"--n auto, median of {len(runs)}", f"{out['n_boxes']:,}", sec(seconds),
                  sec(median([o["curve"]["seconds"] for o, _ in runs])), out["recommended"],
                  mb(max(r.peak_rss_mb for _, r in runs)), f"{max(r.foreign_cores for _, r in runs):.2f}"]]))
    print(f"runs: {', '.join(f'{r.seconds:.2f}' for _, r in runs)} s")
    bench.report.target("counts", f"whole `compute --n auto` process on {AUTO_SET}, seconds", seconds,
                        f"< {TARGET_AUTO_SECONDS:g}", seconds < TARGET_AUTO_SECONDS)
    section["auto_process"] = {"seconds": [r.seconds for _, r in runs], "median_seconds": seconds,
                               "recommended": out["recommended"], "peak_rss_mb": max(r.peak_rss_mb for _, r in runs)}
    bench.report.sections["counts"] = section
