#!/usr/bin/env python3
"""Benchmark: each level's grid of a torchvision detector for many padded sizes (``TorchvisionAnchors.layout``).

Run by hand (it is not a test); needs torchvision::

    PYTHONPATH=. python benchmarks/bench_torchvision_layout.py [--sizes 100] [--seed 0]

For ``retinanet_resnet50_fpn`` and ``fasterrcnn_mobilenet_v3_large_320_fpn`` (weights=None), it draws
``--sizes`` distinct padded sizes the way images of random shapes come out of torchvision's transform
in multi-scale training (a shorter side drawn from 480, 512, ..., 800; the longer side at most 1333;
padded to 32; a single ``min_size`` gives fewer than 100 distinct sizes) and prints: the time of one
backbone run on meta tensors, the time of probing every size one by one, the time and number of
probes of ``layout`` (the derived, verified rule), and whether both give the same grids.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _padded_sizes(count: int, seed: int, max_size: int = 1333, divisible: int = 32) -> np.ndarray:
    """``(count, 2)`` distinct padded ``(w, h)``: random image shapes resized as torchvision does, then padded."""
    rng = np.random.default_rng(seed)
    out: set[tuple[int, int]] = set()
    while len(out) < count:
        w, h = rng.integers(64, 2000, size=2)
        min_size = int(rng.choice(np.arange(480, 801, 32)))
        scale = min(min_size / min(w, h), max_size / max(w, h))
        rw, rh = (int(np.floor(v * scale)) for v in (w, h))
        out.add((-(-rw // divisible) * divisible, -(-rh // divisible) * divisible))
    return np.array(sorted(out), dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from torchvision.models import detection

    from lightning_autoanchor.torchvision_heads import find_torchvision_anchors

    for builder in (detection.retinanet_resnet50_fpn, detection.fasterrcnn_mobilenet_v3_large_320_fpn):
        model = builder(weights=None, weights_backbone=None, num_classes=3)
        sizes = _padded_sizes(args.sizes, args.seed)

        direct = find_torchvision_anchors(model)
        start = time.perf_counter()
        expected = np.stack([direct._grids._probe(int(w), int(h)) for w, h in sizes])
        direct_s = time.perf_counter() - start

        ruled = find_torchvision_anchors(model)
        start = time.perf_counter()
        grids, _ = ruled.layout(sizes)
        rule_s = time.perf_counter() - start
        print(f"{builder.__name__}, {len(sizes)} distinct padded sizes:")
        print(f"  one meta backbone run: {1000 * direct_s / len(sizes):.0f} ms")
        print(f"  every size probed:     {direct_s:.2f} s ({len(sizes)} probes)")
        print(f"  layout (rule):         {rule_s:.2f} s ({ruled._grids.probes} probes), "
              f"same grids: {np.array_equal(grids, expected)}")


if __name__ == "__main__":
    main()
