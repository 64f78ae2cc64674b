"""How every rank of a distributed run agrees on one outcome: rank 0 computes, every rank learns the
result (or the error), every rank writes or none does.

The functions take a Lightning ``Strategy`` (either namespace) for its two collectives,
``broadcast(obj, src=0)`` and ``reduce_boolean_decision(decision, all=True)``; every rank must call
them at the same point, so nothing here may be skipped on some ranks.

:class:`SpawnHandoff` carries rank 0's result back to the process that started a ``ddp_spawn``
run: that process never runs a hook, and Lightning sends back the model's weights but not the
callbacks' state. The result travels as a small JSON file in a private temporary folder that the
starting process made (and removes when it reads it, or at exit).
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning_autoanchor.errors import HeadError

__all__ = ["SpawnHandoff", "outcome_from_rank_zero", "write_on_every_rank"]

T = TypeVar("T")


def _portable(error: BaseException) -> BaseException:
    """``error`` itself if it survives pickling (to be raised on every rank), else a ``RuntimeError`` naming it."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:  # an exception class with a constructor pickle cannot call, say
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")
    return copy if type(copy) is type(error) else RuntimeError(f"{type(error).__name__} on rank 0: {error}")


def outcome_from_rank_zero(strategy: Any, compute: Callable[[], T], is_global_zero: bool) -> T:
    """``compute()`` on global rank 0, its value returned on every rank; its exception raised on every rank.

    Rank 0 raises the original exception (with its traceback); the other ranks raise a copy of the
    same type and message. A ``KeyboardInterrupt`` on rank 0 stops every rank the same way.
    """
    payload: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if is_global_zero:
        try:
            payload = ("value", compute())
        except BaseException as err:  # every rank must hear of it, Ctrl-C included
            failure = err
            payload = ("error", _portable(err))
    kind, value = strategy.broadcast(payload, src=0)
    if kind == "error":
        raise failure if failure is not None else value
    return value


def write_on_every_rank(strategy: Any, write: Callable[[], None], undo: Callable[[], None]) -> None:
    """``write()`` on every rank; if it fails on any rank, the ranks where it worked ``undo()`` it and
    every rank raises a :class:`HeadError` (from the local error where there was one)."""
    error: Exception | None = None
    try:
        write()
    except Exception as err:
        error = err
    if strategy.reduce_boolean_decision(error is None, all=True):
        return
    if error is None:
        undo()
    raise HeadError(f"could not write the new anchors on every rank; all heads keep their old anchors "
                    f"({error or 'the write failed on another rank'})") from error


class SpawnHandoff:
    """A one-shot channel from rank 0 of a ``ddp_spawn`` run back to the process that started it."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="autoanchor-")
        atexit.register(shutil.rmtree, self.folder, True)

    @property
    def _file(self) -> Path:
        return Path(self.folder) / "result.json"

    def send(self, data: dict[str, Any]) -> None:
        """Leave ``data`` (plain JSON data) for the starting process; only from a child process."""
        if multiprocessing.parent_process() is None:
            return
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(self._file)

    def receive(self) -> dict[str, Any] | None:
        """The data a child left since the last call, or ``None``."""
        try:
            text = self._file.read_text(encoding="utf-8")
        except OSError:
            return None
        self._file.unlink(missing_ok=True)
        return json.loads(text)
