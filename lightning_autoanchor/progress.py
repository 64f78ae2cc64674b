"""Progress bars for long runs (tqdm, as Lightning's default progress bar).

A bar is drawn only when asked for *and* stderr is a terminal; in logs, CI and pipes it stays silent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, desc: str, enabled: bool, total: int | None = None,
                 unit: str = "it") -> Iterator[T]:
    """Iterate over ``iterable`` with a tqdm bar when ``enabled`` and stderr is a TTY.

    The bar starts no thread (tqdm's monitor is off), so the folder readers it wraps can still fork
    their worker processes, which they do only while no other thread runs.
    """
    if not (enabled and sys.stderr.isatty()):
        yield from iterable
        return
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc,valid-type]
        monitor_interval = 0

    yield from Bar(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)
