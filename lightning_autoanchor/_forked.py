"""One function call run ahead in a forked child process while this process does other work.

The command line tool reads the annotations this way while its main process imports torch (about
1 s of a short run), and the folder readers fork their workers under the same rule
(:func:`can_fork`). This module imports nothing heavy.
"""

from __future__ import annotations

import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing import get_all_start_methods, get_context
from types import TracebackType
from typing import Any, Generic, TypeVar

R = TypeVar("R")


def can_fork() -> bool:
    """Whether a child process can be forked safely: ``fork`` exists and no other Python thread runs.

    Forked children start at once and never re-import ``__main__`` (as spawned ones do, re-running a
    script without an ``if __name__ == "__main__"`` guard); forking a process that runs other threads
    can deadlock, so callers then do the work in this process.
    """
    return "fork" in get_all_start_methods() and threading.active_count() == 1


class ChildTraceback(Exception):
    """The traceback of an exception raised in a forked child, attached as the ``__cause__`` of its copy."""


def _call_and_send(send: Any, signal_mask: set[signal.Signals], func: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> None:
    """Child side: send ``("value", result)`` or ``("error", (exception, traceback text))`` through ``send``."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)  # a Ctrl-C held over the fork is raised here
        message: tuple[str, Any] = ("value", func(*args, **kwargs))
    except BaseException as err:  # every failure, Ctrl-C included, goes back to the parent
        message = ("error", (err, traceback.format_exc()))
    try:
        send.send(message)
    except BrokenPipeError:  # the parent is gone
        return
    except Exception as err:  # e.g. an exception that cannot be pickled
        send.send(("error", (RuntimeError(f"the child process could not send its result: {err!r}"),
                             traceback.format_exc())))
    finally:
        send.close()


class ForkedCall(Generic[R]):
    """``func(*args, **kwargs)``, started in a forked child process when ``fork`` is true.

    :meth:`result` waits for the child and returns its value (sent back pickled), or re-raises its
    exception with the child's traceback as ``__cause__``. With ``fork=False`` (or where
    :func:`can_fork` says no) the call runs in this process, on :meth:`result`. Use it as a context
    manager: leaving the block stops a child whose result was not collected.
    """

    def __init__(self, func: Callable[..., R], *args: Any, fork: bool = True, **kwargs: Any):
        self._call = (func, args, kwargs)
        self._process: Any = None
        self._outcome: tuple[str, Any] | None = None
        if fork and can_fork():
            ctx = get_context("fork")
            self._receive, send = ctx.Pipe(duplex=False)
            # Ctrl-C is held while forking: delivered in the fork handlers (logging's, for one), Python
            # would ignore it there, in either process, and could leave a lock held in the child.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                process = ctx.Process(target=_call_and_send, args=(send, mask, func, args, kwargs))
                process.start()
            except OSError:  # no child to be had (e.g. memory): the call runs here
                self._receive.close()
            else:
                self._process = process
            finally:
                send.close()
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._forked = self._process is not None

    @property
    def forked(self) -> bool:
        """Whether the call runs (or ran) in a child process."""
        return self._forked

    def result(self) -> R:
        """The call's value (computed once); its exception is raised here."""
        if self._outcome is None:
            self._outcome = self._collect() if self._forked else self._run_here()
        status, payload = self._outcome
        if status == "error":
            err, text = payload
            raise err from (ChildTraceback(text) if text else None)
        return payload

    def _run_here(self) -> tuple[str, Any]:
        func, args, kwargs = self._call
        try:
            return "value", func(*args, **kwargs)
        except Exception as err:  # kept, raised by result() with its own traceback
            return "error", (err, "")

    def _collect(self) -> tuple[str, Any]:
        received = False
        try:
            message = self._receive.recv()
            received = True
            return message
        except EOFError:
            self._process.join()
            code = self._process.exitcode
            how = f"was killed by signal {-code}" if code < 0 else f"ended with exit status {code}"
            return "error", (ChildProcessError(f"the child process {how} before it sent a result"), "")
        finally:
            self._stop(wait=received)  # interrupted while waiting (Ctrl-C here): stop the child at once

    def _stop(self, wait: bool) -> None:
        if not wait:
            self._process.terminate()
        self._process.join()
        self._receive.close()
        self._process = None

    def __enter__(self) -> ForkedCall[R]:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._process is not None:
            self._stop(wait=False)
