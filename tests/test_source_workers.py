"""The folder readers' worker processes (``sources._workers.map_files``): the same results as one process;
forked, never spawned; and never outliving the read, whatever happens to the worker or to its parent."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_autoanchor.sources import read_voc, read_yolo
from lightning_autoanchor.sources._workers import map_files

from .conftest import alarm, by_image, load_slice, read_warned, same_box_sets, write_voc, write_yolo


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


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to see processes")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def square_unless_in_a_worker(i: int, parent: int, doomed: int) -> int:
    """``i * i``; item ``doomed`` kills the worker process it is read in, as the kernel does when memory runs out."""
    if i == doomed and os.getpid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return i * i


def slow_square(i: int) -> int:
    time.sleep(0.002)
    return i * i


@needs_proc
@pytest.mark.parametrize("doomed", [5, 150, 299])
def test_a_killed_worker_does_not_hang_the_read(doomed: int) -> None:
    """A worker killed in the middle of a chunk: the read still gives every result, in order (the chunks not yet
    received are read in this process), and no worker is left."""
    before = children(os.getpid())
    with alarm(60):
        results = list(map_files(square_unless_in_a_worker, [(i, os.getpid(), doomed) for i in range(300)],
                                 workers=3))
    assert results == [i * i for i in range(300)]
    assert children(os.getpid()) == before


CALLER_FAILS = """
import os, time
from contextlib import closing
from lightning_autoanchor.sources._workers import map_files

def slow_square(i):
    time.sleep(0.005)
    return i * i

def children():
    return open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()

try:
    with closing(map_files(slow_square, [(i,) for i in range(400)], workers=2)) as results:
        for k, _ in enumerate(results):
            if k == 10:
                print(len(children()), flush=True)
                raise RuntimeError("the caller fails")
except RuntimeError:
    print(len(children()))
"""


@needs_proc
def test_an_error_of_the_caller_stops_the_workers_first() -> None:
    """An exception raised by the caller while it maps (here in the loop over the results) reaches it only once
    every worker is killed and reaped. In a fresh process: one that runs other threads maps without workers."""
    done = subprocess.run([sys.executable, "-c", CALLER_FAILS], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "2\n0\n", "")  # 2 workers ran, none is left


MAP_IN_A_SCRIPT = """
# 4,000 files of 2 ms: 8 chunks of 500, about 4 s in all, so a Ctrl-C sent after the first chunk lands
# mid-run even on a loaded machine (with 400 files, the first chunk was half of the work)
import os, sys, time
from contextlib import closing
from lightning_autoanchor.sources._workers import map_files

def slow_square(i):
    time.sleep(0.002)
    return i * i

try:
    with closing(map_files(slow_square, [(i,) for i in range(4000)], workers=2)) as results:
        for k, _ in enumerate(results):
            if k == 0:
                print(*open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split(), flush=True)
except KeyboardInterrupt:
    print("stopped; children:", *open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split())
"""


def start_mapping() -> tuple[subprocess.Popen[str], list[int]]:
    """A Python process mapping with 2 workers, in a session of its own; returns it and its workers' pids."""
    proc = subprocess.Popen([sys.executable, "-c", MAP_IN_A_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2, proc.communicate(timeout=60)
    return proc, workers


def wait_until_gone(pids: list[int], seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


@needs_proc
@pytest.mark.parametrize("to_group", [True, False], ids=["group", "parent only"])
def test_ctrl_c_while_mapping(to_group: bool) -> None:
    """Ctrl-C while workers read, sent to the process group (the workers ignore it) or to the parent only: the
    parent gets ``KeyboardInterrupt`` once its workers are reaped; no worker prints a traceback."""
    proc, workers = start_mapping()
    (os.killpg if to_group else os.kill)(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stdout, stderr) == (0, "stopped; children:\n", "")
    assert wait_until_gone(workers, 0) == []


@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_their_parent(sig: signal.Signals) -> None:
    """The parent killed while its workers read (no Python code of it runs): they die with it at once."""
    proc, workers = start_mapping()
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == -sig
    assert wait_until_gone(workers) == []


@needs_proc
def test_a_worker_whose_parent_died_before_it_asked_ends_itself() -> None:
    """The parent-death signal covers only a parent that dies after the worker asks for it; a worker adopted
    before (its parent pid is no longer the one it was forked from) ends at once instead."""
    code = ("import os, sys\nfrom lightning_autoanchor.sources._workers import _die_with_parent, _prctl\n"
            "_die_with_parent(int(sys.argv[1]), _prctl())\nprint('went on')\n")
    for parent, expected in ((os.getpid(), (0, "went on\n")), (os.getpid() + 1, (1, ""))):
        proc = subprocess.run([sys.executable, "-c", code, str(parent)], capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout, proc.stderr) == (*expected, "")


STOP_TWICE = """
import os
from lightning_autoanchor.sources._workers import _start, _stop

workers = []
_start(workers, 2, pow, [(2, 3)] * 4, [(0, 2), (2, 4)])
_stop(workers, graceful=False)
_stop(workers, graceful=False)  # what runs when a Ctrl-C lands as the first stop begins: nothing left to do
print(len(workers), open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split())
"""


@needs_proc
def test_stopping_the_workers_again_is_harmless() -> None:
    """A Ctrl-C that lands as the pool is being stopped makes the mapping stop it again: the second stop finds
    every worker already reaped (and does not trip over the closed processes)."""
    done = subprocess.run([sys.executable, "-c", STOP_TWICE], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "0 []\n", "")
