"""``ForkedCall``: a call run ahead in a forked child, as the CLI reads annotations while torch loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from lightning_autoanchor._forked import ChildTraceback, ForkedCall, can_fork
from lightning_autoanchor.errors import DataError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the forked path is tested where fork is safe")


def pid_and(value: object) -> tuple[int, object]:
    return os.getpid(), value


def fail(message: str) -> None:
    raise DataError(message)


def unpicklable() -> object:
    return threading.Lock()


def die() -> None:
    os._exit(3)


def sleep_then_return(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a reaped child is gone; a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(autouse=True)
def _single_threaded() -> None:
    assert can_fork(), f"other threads run in the test process: {threading.enumerate()}"


def test_value_comes_from_a_child_process() -> None:
    with ForkedCall(pid_and, {"boxes": [1.5, 2.0]}) as call:
        assert call.forked
        pid, value = call.result()
        assert call.forked
    assert pid != os.getpid()
    assert value == {"boxes": [1.5, 2.0]}


def squares_in_workers(n: int) -> list[int]:
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        return list(pool.map(pow, range(n), [2] * n))


def test_the_child_may_start_processes_of_its_own() -> None:
    """As the folder readers do, with worker processes, in the child the CLI reads in."""
    with ForkedCall(squares_in_workers, 5) as call:
        assert call.forked
        assert call.result() == [0, 1, 4, 9, 16]


def test_result_is_computed_once() -> None:
    with ForkedCall(pid_and, 1) as call:
        assert call.result() == call.result()


def test_without_fork_the_call_runs_here_on_result() -> None:
    with ForkedCall(pid_and, "x", fork=False) as call:
        assert not call.forked
        assert call.result() == (os.getpid(), "x")


def test_child_error_is_raised_with_its_traceback() -> None:
    with ForkedCall(fail, "annotations.json, line 3: no bbox") as call, pytest.raises(DataError) as caught:
        call.result()
    assert str(caught.value) == "annotations.json, line 3: no bbox"
    cause = caught.value.__cause__
    assert isinstance(cause, ChildTraceback) and "in fail" in str(cause)


def test_error_in_this_process_is_raised_on_result() -> None:
    call = ForkedCall(fail, "bad", fork=False)
    with pytest.raises(DataError, match="bad"):
        call.result()
    with pytest.raises(DataError, match="bad"):  # the same outcome again, the call is not repeated
        call.result()


def test_unpicklable_result_becomes_an_error() -> None:
    with ForkedCall(unpicklable) as call, pytest.raises(RuntimeError, match="could not send its result"):
        call.result()


def test_child_that_dies_is_reported() -> None:
    with ForkedCall(die) as call, pytest.raises(ChildProcessError, match="ended with exit status 3 before"):
        call.result()


def touch_then_sleep(path: Path, seconds: float) -> None:
    path.touch()
    time.sleep(seconds)


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Python's own SIGINT handler, as on a terminal (tests may run with SIGINT ignored, as a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_in_the_child_is_raised_here(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with ForkedCall(touch_then_sleep, started, 60) as call:
        while not started.exists():  # the child runs the call
            time.sleep(0.01)
        os.kill(call._process.pid, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            call.result()


def test_ctrl_c_while_waiting_stops_the_child() -> None:
    """Ctrl-C here alone (not in the child) while result() waits: the child is stopped, not waited for."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    started = time.monotonic()
    try:
        with ForkedCall(sleep_then_return, 60) as call:
            pid = call._process.pid
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                call.result()
            assert not alive(pid)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 30


def test_leaving_the_block_stops_an_uncollected_child() -> None:
    started = time.monotonic()
    with ForkedCall(sleep_then_return, 60) as call:
        pid = call._process.pid
        assert alive(pid)
    assert not alive(pid)
    assert time.monotonic() - started < 30


def test_buffered_output_is_not_printed_twice() -> None:
    code = ("import sys; from lightning_autoanchor._forked import ForkedCall\n"
            "print('before', end='')\n"
            "with ForkedCall(int, '7') as call: print(call.result())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "before7\n"
