"""Worker processes of the folder readers: per-file work in forked children that never outlive the read.

:func:`map_files` splits the files into chunks and hands them, one at a time, to worker processes
forked from the caller, which already hold the function and the file list (nothing is pickled on
the way in; each chunk's results come back pickled through the worker's own pipe). The guarantees,
and how each is kept:

- **A worker dies with its parent**, whatever kills the parent (SIGKILL included, where no Python
  code runs): on Linux each worker asks the kernel for ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, called through :mod:`ctypes`). The request only covers a
  parent that dies *after* it is made, and the parent may already have died between the fork and
  the request; an orphan is adopted by another process, so the worker then compares
  ``os.getppid()`` with the pid its parent had before the fork and ends itself if they differ. A
  worker also ends when its pipe to the parent reaches end of file (every platform): each worker
  closes the parent's ends of the other workers' pipes it inherited, so only the parent holds them.
- **Ctrl-C is the parent's**: workers ignore SIGINT, so a Ctrl-C sent to the whole process group
  reaches only the parent, which stops them; no worker prints a traceback. SIGINT stays blocked
  from before each fork until the worker ignores it, so not even a signal that arrives while a
  worker starts can raise ``KeyboardInterrupt`` in it.
- **No worker outlives the call**: when the caller gets any exception while mapping (Ctrl-C, an
  error of its own, the generator closed early), every worker is killed and reaped (``SIGINT``
  blocked meanwhile) before the exception goes on.
- **A killed worker does not hang the read**: its pipe and its process sentinel are waited on
  together; when a worker dies (e.g. killed for lack of memory), the others are stopped and the
  chunks not yet received are read in this process.

Why not a ready-made pool (Python 3.11): ``concurrent.futures.ProcessPoolExecutor`` has no public
way to stop its workers (``terminate_workers()`` comes with Python 3.14); ``shutdown()`` either
waits for the running chunks or leaves them running, and it runs a manager thread and a queue
feeder thread in the caller. ``multiprocessing.Pool.terminate()`` does stop its workers, but a
worker killed during a task makes ``imap`` wait forever (the pool starts a new worker and the task
is lost). The pool here uses only :mod:`multiprocessing`'s ``Process`` and ``Pipe``, and no thread.

Workers are forked, never spawned: they start at once and never re-import ``__main__`` (a spawned
worker re-runs a script without an ``if __name__ == "__main__"`` guard). Forking a process that runs
other threads can deadlock, so where :func:`can_fork` says no, the files are read in this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from multiprocessing import current_process, get_all_start_methods, get_context
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

__all__ = ["can_fork", "map_files"]

R = TypeVar("R")

_PARALLEL_MIN_FILES = 2_000
_MAX_WORKERS = 8
_TASK_SIZE = 500
_GRACE_S = 5.0  # a worker told to end (its pipe closed) is killed after this
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_SIGINT = {signal.SIGINT}


def can_fork() -> bool:
    """Whether worker processes can be forked safely: ``fork`` exists, no other Python thread runs, and
    this process is not a daemonic :mod:`multiprocessing` process (which may not have children)."""
    return ("fork" in get_all_start_methods() and threading.active_count() == 1
            and not current_process().daemon)


def map_files(func: Callable[..., R], args: Sequence[tuple[Any, ...]], *, workers: int | None = None) -> Iterator[R]:
    """``func(*a)`` for every ``a`` in ``args``, in order; in forked worker processes for large inputs.

    ``workers=None`` uses every core (at most 8) when there are at least 2,000 files, else this
    process; an explicit ``workers`` count is used as given. Where workers cannot be forked safely
    (:func:`can_fork`) or cannot be started, the files are read in this process. Close the generator
    when you stop early (``contextlib.closing``), so that its workers stop at once.
    """
    if workers is None:
        n_workers = min(os.cpu_count() or 1, _MAX_WORKERS) if len(args) >= _PARALLEL_MIN_FILES else 1
    else:
        n_workers = min(max(1, workers), len(args))
    if n_workers > 1 and can_fork():
        size = min(_TASK_SIZE, -(-len(args) // n_workers))
        bounds = [(lo, min(lo + size, len(args))) for lo in range(0, len(args), size)]
        done = 0  # chunks yielded
        with closing(_map_chunks(func, args, bounds, n_workers)) as chunks:
            for results in chunks:
                yield from results
                done += 1
        args = args[bounds[done][0]:] if done < len(bounds) else ()  # a worker died: the rest is read here
    for a in args:
        yield func(*a)


class _WorkerGone(Exception):
    """A worker died, or its pipe broke."""


def _map_chunks(func: Callable[..., R], args: Sequence[tuple[Any, ...]], bounds: list[tuple[int, int]],
                n_workers: int) -> Iterator[list[R]]:
    """Each chunk's results, in order, from ``n_workers`` forked workers; ends early if a worker dies."""
    workers: list[tuple[Any, Connection]] = []
    finished = False
    try:
        _start(workers, n_workers, func, args, bounds)
        results: dict[int, list[R]] = {}
        busy: dict[Connection, int] = {}  # the chunk each worker reads
        sentinels = {process.sentinel: conn for process, conn in workers}
        sent = received = 0
        for _, conn in workers:
            sent = _send(conn, sent, len(bounds), busy)
        while received < len(bounds):
            ready = wait([*busy, *sentinels])
            for conn in [r for r in ready if r in busy]:
                status, value = _receive(conn)
                if status == "error":
                    raise value
                results[busy.pop(conn)] = value
                sent = _send(conn, sent, len(bounds), busy)
            while received in results:
                yield results.pop(received)
                received += 1
            for sentinel in [r for r in ready if r in sentinels]:
                if sentinels.pop(sentinel) in busy:
                    raise _WorkerGone
        finished = True
    except _WorkerGone:  # e.g. killed for lack of memory, or it could not be started: the caller reads the rest
        return
    finally:
        try:
            _stop(workers, graceful=finished)
        except KeyboardInterrupt:  # a Ctrl-C that landed before _stop could hold it: stop them anyway
            _stop(workers, graceful=False)
            raise


def _start(workers: list[tuple[Any, Connection]], n_workers: int, func: Callable[..., Any],
           args: Sequence[tuple[Any, ...]], bounds: list[tuple[int, int]]) -> None:
    """Fork the workers, adding each to ``workers`` with the parent's end of its pipe."""
    prctl = _prctl()
    context = get_context("fork")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
    try:  # no KeyboardInterrupt between a fork and the worker's entry in `workers`
        for _ in range(n_workers):
            ours, theirs = context.Pipe()
            others = [conn for _, conn in workers]
            process = context.Process(target=_serve, name="lightning-autoanchor reader",
                                      args=(func, args, bounds, theirs, ours, others, os.getpid(), prctl))
            try:
                process.start()
            except OSError as err:  # no more processes or memory
                ours.close()
                raise _WorkerGone from err
            finally:
                theirs.close()
            workers.append((process, ours))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _send(conn: Connection, sent: int, n_chunks: int, busy: dict[Connection, int]) -> int:
    """Give the next chunk, if any, to the worker at ``conn``; returns the count of chunks given."""
    if sent == n_chunks:
        return sent
    try:
        conn.send(sent)
    except OSError as err:
        raise _WorkerGone from err
    busy[conn] = sent
    return sent + 1


def _receive(conn: Connection) -> tuple[str, Any]:
    try:
        return conn.recv()
    except (EOFError, OSError) as err:  # the worker died while sending
        raise _WorkerGone from err


def _stop(workers: list[tuple[Any, Connection]], graceful: bool) -> None:
    """Stop and reap every worker: closing its pipe ends it; ``graceful=False`` kills it at once. The list is
    emptied once they are all reaped, so a second call (see :func:`_map_chunks`) finds nothing left to do."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
    try:
        for process, conn in workers:
            conn.close()
            if not graceful:
                process.kill()
        for process, _ in workers:
            process.join(_GRACE_S if graceful else None)
            if process.exitcode is None:
                process.kill()
                process.join()
            process.close()
        workers.clear()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _prctl() -> Callable[..., int] | None:
    """``prctl`` of the C library (Linux), looked up before forking so workers need not import ctypes."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int, prctl: Callable[..., int] | None) -> None:
    """In a worker: be killed when the parent dies; end now if it died already (see the module doc)."""
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _serve(func: Callable[..., R], args: Sequence[tuple[Any, ...]], bounds: list[tuple[int, int]], conn: Connection,
           parents_end: Connection, others: list[Connection], parent: int, prctl: Callable[..., int] | None) -> None:
    """A worker: read the chunks whose numbers arrive on ``conn``, send back ``("value", results)`` or
    ``("error", exception)``; end at end of file. Never raises, so nothing is printed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT)
    _die_with_parent(parent, prctl)
    parents_end.close()
    for other in others:
        other.close()
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe, or died
            return
        lo, hi = bounds[chunk]
        try:
            message: tuple[str, Any] = ("value", [func(*a) for a in args[lo:hi]])
        except Exception as err:  # raised again in the parent
            message = ("error", err)
        try:
            try:
                conn.send(message)
            except OSError:
                raise
            except Exception as err:  # e.g. an exception that cannot be pickled
                conn.send(("error", RuntimeError(f"a reader worker could not send its result: {err!r}")))
        except OSError:  # the parent is gone
            return
