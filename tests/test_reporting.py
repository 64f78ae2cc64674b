"""What users read: the anchors YAML, atomic writes that survive a crash, the plot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.reporting import anchors_yaml, plot_anchors, write_text_atomic

ANCHORS = torch.tensor([[2.84, 3.7], [3.9, 8.6], [9.1, 7.1], [8.0, 17.2], [18.4, 15.0], [18.0, 33.0],
                        [38.0, 25.0], [42.0, 58.0], [93.0, 82.0]])


def test_yaml_is_a_yolo_anchors_block() -> None:
    text = anchors_yaml(ANCHORS, 3, comments=["fitted to test data"])
    assert text.splitlines()[0] == "# fitted to test data"
    assert "  - [2.8,3.7, 3.9,8.6, 9.1,7.1]  # P3/8" in text
    assert "  - [38,25, 42,58, 93,82]  # P5/32" in text
    rows = yaml.safe_load(text)["anchors"]
    assert rows == [[2.8, 3.7, 3.9, 8.6, 9.1, 7.1], [8.0, 17, 18, 15, 18, 33], [38, 25, 42, 58, 93, 82]]


def test_yaml_names_levels_by_the_given_strides() -> None:
    text = anchors_yaml(ANCHORS[:6], 2, strides=[16, 64])
    assert "# P4/16" in text and "# P6/64" in text
    assert "# level 1/12" in anchors_yaml(ANCHORS[:6], 2, strides=[6, 12])
    with pytest.raises(ConfigError, match="split evenly"):
        anchors_yaml(ANCHORS, 2)
    with pytest.raises(ConfigError, match="strides"):
        anchors_yaml(ANCHORS, 3, strides=[8, 16])


WRITER = """
import sys
from lightning_autoanchor.reporting import write_text_atomic
text = sys.argv[2] * (20 << 20)
print("ready", flush=True)
while True:
    write_text_atomic(sys.argv[1], text)
"""


def test_a_crash_mid_write_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    """A writer killed (SIGKILL) at random moments never leaves half a file behind."""
    target = tmp_path / "autoanchor.yaml"
    target.write_text("old")
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "n"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.05 + 0.13 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        content = target.read_bytes()
        assert content in (b"old", b"n" * (20 << 20)), f"half-written file of {len(content)} bytes"


def test_atomic_write_creates_folders_and_replaces(tmp_path: Path) -> None:
    path = write_text_atomic(tmp_path / "a" / "b.yaml", "one")
    assert path.read_text() == "one"
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["b.yaml"]


def test_plot_is_a_png(tmp_path: Path) -> None:
    wh = torch.exp(torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) + 3)
    path = plot_anchors(wh, ANCHORS * 4, tmp_path / "p.png", thr=4.0, metric="ratio", before=ANCHORS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


FULL_DISK = """
import resource, signal, sys, torch
from lightning_autoanchor.reporting import plot_anchors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
wh = torch.exp(torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) + 3)
try:
    plot_anchors(wh, wh[:9], sys.argv[1], thr=4.0, metric="ratio")
except OSError as err:
    print("failed:", err.errno)
"""


def test_a_plot_that_cannot_be_written_leaves_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "autoanchor.png"
    target.write_bytes(b"previous plot")
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True, timeout=120)
    assert "failed: 27" in done.stdout, done.stderr[-2000:]  # EFBIG
    assert target.read_bytes() == b"previous plot"
    assert [p.name for p in tmp_path.iterdir()] == ["autoanchor.png"], "no temporary file left"


def test_plotting_leaves_matplotlib_s_backend_alone(tmp_path: Path) -> None:
    script = ("import matplotlib, torch; matplotlib.use('svg');"
              "from lightning_autoanchor.reporting import plot_anchors;"
              "plot_anchors(torch.rand(50, 2) * 100 + 1, torch.ones(3, 2) * 20, 'p.png', thr=4.0, metric='iou');"
              "print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.strip() == "svg", done.stderr[-2000:]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
