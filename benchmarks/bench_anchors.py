#!/usr/bin/env python3
"""Benchmark "fast at any scale": lightning-autoanchor against YOLOv5's own AutoAnchor optimiser.

Run by hand (it is not a test); it prints one table per section and, with ``--json-out``, writes the
same numbers as JSON::

    PEER_PYTHON=/tmp/peers/bin/python .venv/bin/python benchmarks/bench_anchors.py --json-out bench.json
    .venv/bin/python benchmarks/bench_anchors.py --sections speed,check      # some sections only

Sections (``--sections``, default all; each in ``sections/<name>.py``):

``speed``  the optimiser call alone, ours against YOLOv5's ``kmean_anchors``, on real and 1M-box sets
``check``  ``score_anchors`` alone on the 1M-box set
``cli``    the whole ``lightning-autoanchor compute FILE --json`` process against YOLOv5's optimiser
``scale``  the whole process at 0.1M, 1M and 10M boxes: time and peak memory
``read``   ``read_yolo`` on a YOLO dataset of 100k images: first read, cached read, whole process
``counts`` ``compute --n auto`` as a whole process, and each anchor count of the curve against a full fit
``limits`` per-level size limits (``min_stride_ratio``): their cost, and against clipping a plain fit

Synthetic sets are built from the real annotation files (``--data-dir``; see ``synthetic.py``),
written to a temporary folder and deleted at the end. How processes are measured (peak RSS, waiting
for a quiet machine) is described in ``harness.py``; each section lives in ``sections/<name>.py``.
"""

from __future__ import annotations

import sys

from harness import main
from sections import SECTIONS

if __name__ == "__main__":
    sys.exit(main(None, SECTIONS, __doc__.split("\n\n")[0]))
