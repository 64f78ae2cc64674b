"""What a reader did with the bad parts of its input: skip and count, or refuse (``strict``)."""

from __future__ import annotations

import warnings
from collections import Counter

from lightning_autoanchor.errors import DataError

__all__ = ["PROBLEMS", "DataWarning", "ReadLog"]


class DataWarning(UserWarning):
    """Annotations were skipped or changed while reading (the message says how many, where and why)."""


PROBLEMS: dict[str, str] = {
    "bad_box": "boxes with a non-finite coordinate or a zero or negative width or height (skipped)",
    "outside_box": "boxes entirely outside their image (skipped)",
    "clipped_box": "boxes reaching more than 1 px outside their image (clipped to it)",
    "bad_line": "label lines that are not 'class x y w h' with numbers in [0, 1] (skipped)",
    "bad_record": "annotation records with missing or mistyped fields (skipped)",
    "unknown_image": "boxes of an image id that is not in the image list (skipped)",
    "missing_size": "images without a usable width and height (their boxes skipped)",
    "unreadable_image": "images whose size cannot be read from the file (their boxes skipped)",
    "unreadable_file": "annotation files that cannot be read or parsed, or folders that cannot be listed (skipped)",
    "special_file": "FIFOs, sockets or devices where files were expected (not opened; their boxes skipped)",
}
"""Input problems a reader skips (or, with ``strict=True``, refuses), and what happens to them."""

_EXAMPLES = 3


class ReadLog:
    """Collects the problems of one read; raises on the first one when ``strict``.

    Args:
        source: the file or folder being read, for messages.
        strict: refuse any problem with a :class:`DataError` instead of skipping it.
    """

    def __init__(self, source: str, strict: bool = False):
        self.source = source
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def problem(self, kind: str, where: str, message: str, count: int = 1) -> None:
        """Record ``count`` problems of ``kind`` (a key of :data:`PROBLEMS`) found at ``where``."""
        if kind not in PROBLEMS:
            raise KeyError(kind)
        if self.strict:
            raise DataError(f"{where}: {message} (strict mode refuses {PROBLEMS[kind].split(' (')[0]})")
        self.counts[kind] += count
        examples = self.examples.setdefault(kind, [])
        if len(examples) < _EXAMPLES:
            examples.append(f"{where}: {message}")

    def problems(self, kind: str, count: int, examples: list[tuple[str, str]]) -> None:
        """Record ``count`` problems of ``kind`` at once, given the first few as ``(where, message)``."""
        if count:
            self.problem(kind, *examples[0], count=count)
            for where, message in examples[1:_EXAMPLES]:
                self.problem(kind, where, message, count=0)

    def warn(self) -> None:
        """Emit one :class:`DataWarning` per kind of problem seen, with its count and first examples."""
        for kind, n in self.counts.items():
            shown = "; ".join(self.examples[kind])
            warnings.warn(DataWarning(f"{self.source}: {n} {PROBLEMS[kind]}. First: {shown}"), stacklevel=3)
