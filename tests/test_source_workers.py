"""The folder readers' worker processes: the same results as one process, and forked (never spawned)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_autoanchor.sources import read_voc, read_yolo

from .conftest import by_image, load_slice, read_warned, same_box_sets, write_voc, write_yolo


def test_parallel_reads_match_serial(tmp_path: Path) -> None:
    """``workers=2`` (forked worker processes) gives the same box set and problems as ``workers=1``."""
    d = load_slice("coco2017")
    d = {**d, "images": d["images"][:60]}
    yaml_path = write_yolo(d, tmp_path / "yolo")
    labels = tmp_path / "yolo" / "labels" / "train"
    first = sorted(labels.iterdir())
    first[5].write_text(first[5].read_text() + "0 0.5\n0 nan 0.5 0.1 0.1\n")
    first[50].write_text("0 0.5 0.5 0.1 0.1 7\n")
    voc = write_voc(d, tmp_path / "VOC2007")
    xmls = sorted((voc / "Annotations").iterdir())
    xmls[40].write_text("<annotation><size>")
    for read, path in ((read_yolo, yaml_path), (read_voc, voc)):
        kwargs = {"cache": False} if read is read_yolo else {}
        serial, serial_messages = read_warned(read, path, workers=1, **kwargs)
        parallel, parallel_messages = read_warned(read, path, workers=2, **kwargs)
        same_box_sets(serial, parallel)
        assert serial_messages == parallel_messages
        assert serial.num_images == 60
        assert serial.skipped == ({"bad_line": 3} if read is read_yolo else {"unreadable_file": 1})


def test_file_stats_in_workers_match_serial(tmp_path: Path) -> None:
    """The cache key's look at every file: the same times and sizes from worker processes, -1 for a missing file."""
    from lightning_autoanchor.sources.yolo import _file_stats

    paths = []
    for i in range(25):  # 25 files of distinct sizes, listed 1,000 times: 3 tasks of 10,000 paths
        path = tmp_path / f"{i}.txt"
        path.write_text("x" * i)
        paths.append(str(path))
    paths = paths * 1_000 + [str(tmp_path / "missing.txt")]
    serial, parallel = _file_stats(paths, workers=1), _file_stats(paths, workers=2)
    assert serial.shape == (25_001, 2) and serial.dtype == np.int64
    np.testing.assert_array_equal(serial, parallel)
    assert serial[:25, 1].tolist() == list(range(25)) and serial[-1].tolist() == [-1, -1]
    assert serial[:25, 0].tolist() == [os.stat(p).st_mtime_ns for p in paths[:25]]


@pytest.mark.parametrize("how", ["stdin", "script without a main guard"])
def test_parallel_reads_never_rerun_the_callers_script(how: str, tmp_path: Path) -> None:
    """Worker processes are forked: a script fed on stdin, or one without ``if __name__ == "__main__"``,
    is not run again in them (spawned workers would re-import it)."""
    d = {**load_slice("voc2007"), "images": load_slice("voc2007")["images"][:30]}
    yaml_path = write_yolo(d, tmp_path / "yolo")
    marker = tmp_path / "runs.txt"
    code = (f"from pathlib import Path\nfrom lightning_autoanchor.sources import read_yolo\n"
            f"with Path({str(marker)!r}).open('a') as f:\n    f.write('run\\n')\n"
            f"print(len(read_yolo({str(yaml_path)!r}, workers=2, cache=False)))\n")
    if how == "stdin":
        done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120)
    else:
        script = tmp_path / "script.py"
        script.write_text(code)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == sum(len(b) for b in by_image(d).values())
    assert marker.read_text() == "run\n"


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_progress_bar_starts_no_thread(terminal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader's bar is drawn on a terminal only, and leaves the process single-threaded (so its workers can
    still be forked)."""
    import fcntl
    import pty
    import termios
    import threading

    from lightning_autoanchor.progress import progress_bar

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal of 80 columns
    with os.fdopen(follower, "w") if terminal else open(os.devnull, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        before = threading.active_count()
        assert list(progress_bar(range(500), desc="Reading labels", enabled=True, total=500)) == list(range(500))
        assert threading.active_count() == before
        stderr.flush()
        os.set_blocking(leader, False)
        try:
            drawn = os.read(leader, 65536).decode()
        except BlockingIOError:
            drawn = ""
    os.close(leader)
    assert ("Reading labels:   0%" in drawn) == terminal
