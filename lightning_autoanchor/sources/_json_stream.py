"""Stream the top-level arrays of a large JSON object (such as a COCO file) in bounded memory.

The file is read block by block. Outside arrays, a small tokenizer follows the top-level object.
Inside a top-level array of objects, the bytes up to the last ``}, {`` of the block are decoded in
one call by a typed :mod:`msgspec` decoder (fast, C speed). A cut in the wrong place (inside a
nested value or a string) cannot form a valid array, so any failed decode falls back to decoding
element by element with the standard library, which is exact, also accepts ``NaN``/``Infinity``,
and says where a real syntax error is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import msgspec

from lightning_autoanchor.errors import DataError

BLOCK = 16 << 20
_LOOKAHEAD = 1 << 20  # a decode error this close to the end of the buffer may be a cut, not a fault
_MAX_ELEMENT = 256 << 20
_WHITESPACE = b" \t\r\n"
_TOKEN = re.compile(rb'\s*("(?:[^"\\]|\\.)*"|[{}\[\],:]|[^\s{}\[\],:"]+)', re.DOTALL)
_ARRAY_END = re.compile(rb"\}\s*\]")
_BOUNDARY = re.compile(rb"\}\s*,\s*\{")
_SKIP = msgspec.json.Decoder(list[msgspec.Raw])
_PY_DECODER = json.JSONDecoder()


@dataclass
class Elements:
    """A run of consecutive elements of the top-level array ``key``.

    ``items`` are typed structs when ``typed``; else plain Python values (dicts, lists, ...)
    decoded by :mod:`json`, which the caller must check field by field. ``first`` is the index of
    ``items[0]`` in the array; ``line_of(j)`` gives the line on which ``items[j]`` starts.
    """

    key: str
    items: list[Any]
    first: int
    typed: bool
    line_of: Callable[[int], int]


class _Buffer:
    """A window on the stream with absolute byte offsets and line numbers."""

    def __init__(self, stream: IO[bytes], path: str, block: int):
        self.stream, self.path, self.block = stream, path, block
        self.data = b""
        self.base = 0  # absolute offset of data[0]
        self.base_line = 1  # line number of data[0]
        self.eof = False

    def fill(self, pos: int, need: int) -> int:
        """Drop bytes before ``pos`` and read until ``need`` bytes follow it (or EOF). Returns new pos."""
        if pos:
            self.base_line += self.data.count(b"\n", 0, pos)
            self.base += pos
            self.data = self.data[pos:]
        parts = [self.data]
        have = len(self.data)
        while have < need and not self.eof:
            block = self.stream.read(max(self.block, need - have))
            if not block:
                self.eof = True
                break
            parts.append(block)
            have += len(block)
        self.data = b"".join(parts)
        return 0

    def line(self, pos: int) -> int:
        return self.base_line + self.data.count(b"\n", 0, pos)

    def error(self, pos: int, message: str) -> DataError:
        return DataError(f"{self.path}, line {self.line(pos)}: {message}")


def stream_arrays(stream: IO[bytes], path: str, decoders: Mapping[str, msgspec.json.Decoder],
                  on_elements: Callable[[Elements], None], *, block_size: int = BLOCK) -> None:
    """Read the JSON object in ``stream`` and pass the elements of its top-level arrays on.

    Args:
        stream: binary stream of a JSON object (plain or from :func:`gzip.open`).
        path: its name, for error messages.
        decoders: per top-level key, a decoder of ``list[Struct]`` for that array's elements.
            Arrays of other keys are checked for syntax and skipped.
        on_elements: called with every run of decoded elements, in file order.
        block_size: bytes read at a time; memory use is a few times this.

    Raises:
        DataError: the file is not a JSON object, is truncated, or has a syntax error (with its line).
    """
    buf = _Buffer(stream, path, block_size)
    pos = buf.fill(0, block_size)
    depth, state, key = 0, "start", ""
    while True:
        match = _TOKEN.match(buf.data, pos)
        if match is None or (match.end() == len(buf.data) and not buf.eof):
            if buf.eof:
                rest = buf.data[pos:].strip()
                if state == "done" and not rest:
                    return
                if not rest:
                    raise buf.error(pos, "the file ends before the JSON object is complete (truncated?)")
                raise buf.error(pos, f"unexpected {rest[:20]!r}")
            pos = buf.fill(pos, len(buf.data) - pos + buf.block)
            continue
        token, at = match.group(1), match.start(1)
        pos = match.end()
        if state == "done":
            raise buf.error(at, f"unexpected {token[:20]!r} after the end of the JSON object")
        if state == "start":
            if token != b"{":
                raise buf.error(at, "the file is not a JSON object (it should start with '{')")
            depth, state = 1, "key"
        elif depth > 1:  # inside a non-array value of a top-level key: skip it
            if token in (b"{", b"["):
                depth += 1
            elif token in (b"}", b"]"):
                depth -= 1
                if depth == 1:
                    state = "after"
        elif state == "key":
            if token == b"}" and key == "":
                state = "done"
            elif token.startswith(b'"'):
                key, state = json.loads(token), "colon"
            else:
                raise buf.error(at, f"expected a key, got {token[:20]!r}")
        elif state == "colon":
            if token != b":":
                raise buf.error(at, f"expected ':' after key {key!r}")
            state = "value"
        elif state == "value":
            if token == b"[":
                pos = _read_array(buf, pos, key, decoders.get(key), on_elements)
                state = "after"
            elif token == b"{":
                depth, state = 2, "value"
            elif token in (b"}", b"]", b",", b":"):
                raise buf.error(at, f"expected a value for key {key!r}, got {token!r}")
            else:
                state = "after"
        elif state == "after":
            if token == b",":
                state = "key"
            elif token == b"}":
                state = "done"
            else:
                raise buf.error(at, f"expected ',' or '}}' after the value of {key!r}, got {token[:20]!r}")
        if state == "done":
            depth = 0


def _last_boundary(data: bytes, lo: int, hi: int) -> tuple[int, int]:
    """Positions of ``}`` and ``{`` of the last ``}\\s*,\\s*{`` within ``data[lo:hi]``, or (-1, -1)."""
    j = hi
    while True:
        j = data.rfind(b",", lo, j)
        if j < 0:
            return -1, -1
        a, b = j - 1, j + 1
        while a >= lo and data[a] in _WHITESPACE:
            a -= 1
        while b < hi and data[b] in _WHITESPACE:
            b += 1
        if a >= lo and b < hi and data[a] == 0x7D and data[b] == 0x7B:
            return a, b


def _read_array(buf: _Buffer, pos: int, key: str, decoder: msgspec.json.Decoder | None,
                on_elements: Callable[[Elements], None]) -> int:
    """Decode the array whose ``[`` ends before ``pos``; return the position after its ``]``."""
    index = 0
    decode = (decoder or _SKIP).decode

    def emit(items: list[Any], starts: list[int] | None, at: int, end: int) -> None:
        """Pass on ``items``; ``starts`` are their byte offsets when known, else found on demand."""
        nonlocal index
        if decoder is not None and items:
            on_elements(Elements(key, items, index, starts is None, _line_finder(buf, at, end, starts, len(items))))
        index += len(items)

    while True:
        if len(buf.data) - pos < buf.block and not buf.eof:
            pos = buf.fill(pos, buf.block)
        data = buf.data
        while pos < len(data) and data[pos] in _WHITESPACE:
            pos += 1
        if pos < len(data) and data[pos] == 0x5D:  # ']'
            return pos + 1
        end = _ARRAY_END.search(data, pos)
        close, start_next = _last_boundary(data, pos, end.start() + 1 if end else len(data))
        if close >= 0:
            try:
                emit(decode(b"[" + data[pos:close + 1] + b"]"), None, pos, close + 1)
                pos = start_next
                continue
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        elif end is not None:
            try:
                emit(decode(b"[" + data[pos:end.end() - 1] + b"]"), None, pos, end.end() - 1)
                return end.end()
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
        elif not buf.eof:
            pos = buf.fill(pos, len(buf.data) - pos + buf.block)
            continue
        pos, done = _read_elements_exactly(buf, pos, emit)
        if done:
            return pos


def _line_finder(buf: _Buffer, lo: int, hi: int, starts: list[int] | None, n: int) -> Callable[[int], int]:
    """``j -> line of element j`` of the run in ``buf.data[lo:hi]`` (while the buffer holds it)."""
    data, base, base_line = buf.data, buf.base, buf.base_line

    def line(offset: int) -> int:
        return base_line + data.count(b"\n", 0, offset - base)

    if starts is not None:
        return lambda j: line(starts[j])

    def find(j: int) -> int:
        if data is not buf.data:  # the buffer moved on: only the run's first line is known
            return line(base + lo)
        cuts = [m.end() - 1 for m in _BOUNDARY.finditer(data, lo, hi)]
        if len(cuts) != n - 1:  # nested '}, {' inside elements: give the run's first line
            return line(base + lo)
        return line(base + (lo if j == 0 else cuts[j - 1]))

    return find


def _read_elements_exactly(buf: _Buffer, pos: int, emit: Callable[..., None]) -> tuple[int, bool]:
    """Decode elements one by one with :mod:`json` from ``pos`` to the end of the buffered data.

    Returns the position after the last whole element (or after ``]``) and whether the array ended.
    """
    data = buf.data
    try:
        text = data[pos:].decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(data) - pos - 3 or buf.eof:
            raise buf.error(pos + err.start, "the file is not valid UTF-8 here") from None
        text = data[pos:pos + err.start].decode("utf-8")

    seen = [0, pos]  # a character index of text and its byte offset in buf.data

    def at(i: int) -> int:
        """Byte offset in ``buf.data`` of character ``i`` of ``text`` (counted on from the last call)."""
        if i < seen[0]:
            seen[0], seen[1] = 0, pos
        seen[1] += len(text[seen[0]:i].encode("utf-8"))
        seen[0] = i
        return seen[1]

    items: list[Any] = []
    starts: list[int] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "]":
            emit(items, starts, pos, at(i))
            return at(i + 1), True
        if i == len(text) and buf.eof:
            raise buf.error(at(i), "the file ends inside an array (truncated?)")
        try:
            value, j = _PY_DECODER.raw_decode(text, i)
            k = j
            while k < len(text) and text[k] in " \t\r\n":
                k += 1
            whole = k < len(text) or buf.eof
        except json.JSONDecodeError as err:
            if buf.eof or len(text) - err.pos > _LOOKAHEAD:
                raise buf.error(at(err.pos), f"invalid JSON: {err.msg}") from None
            whole = False
        if not whole:  # the element may continue past the buffer
            if items:
                break
            if len(text) - i > _MAX_ELEMENT:
                raise buf.error(at(i), f"an array element is larger than {_MAX_ELEMENT >> 20} MiB")
            return buf.fill(pos, len(buf.data) - pos + buf.block), False
        if k < len(text) and text[k] not in ",]":
            raise buf.error(at(k), f"expected ',' or ']' after an array element, got {text[k]!r}")
        items.append(value)
        starts.append(buf.base + at(i))
        i = k + 1 if k < len(text) and text[k] == "," else k
    emit(items, starts, pos, at(i))
    return at(i), False
