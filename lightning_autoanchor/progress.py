"""Progress bars for long runs (tqdm, as Lightning's default progress bar).

A bar is drawn only when asked for *and* stderr is a terminal; in logs, CI and pipes it stays silent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, desc: str, enabled: bool, total: int | None = None,
                 unit: str = "it") -> Iterator[T]:
    """Iterate over ``iterable`` with a tqdm bar when ``enabled`` and stderr is a TTY."""
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal.
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, dynamic_ncols=True)
