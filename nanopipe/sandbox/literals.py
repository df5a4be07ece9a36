"""
Literal values between the judge and the sandbox, as JSON lines (never pickle: unpickling runs code). The
sandbox encodes its answers with encode_literal; the judge decodes them with decode_literal into fresh
builtin objects, so nothing the test does with an answer can run the candidate's code.
"""

from __future__ import annotations

import os
import time

MAX_MESSAGE_BYTES = 4 * 1024 * 1024      # one call or answer between the judge and the sandbox, as JSON
MAX_LITERAL_DEPTH = 64                   # nesting of lists, tuples, dicts and sets in one value
MAX_ITERATOR_ITEMS = 1_000_000           # items a returned generator (or other iterator) may yield


class NotLiteral(ValueError):
    """A value that cannot cross between the judge and the sandbox as a literal."""


_PLAIN_TYPES = (int, float, str, bytes, complex, list, tuple, dict, set, frozenset)


def encode_literal(value, depth: int = 0):
    """`value` as JSON data: JSON's own None, bool, int, float, str and list; a one-key object for the rest
    ({"tuple"|"set"|"frozenset"|"iterator": [...], "dict": [[key, value], ...], "bytes": hex,
    "complex": [real, imag]}). A subclass of those types crosses as its plain value (a Counter as a dict, a
    namedtuple as a tuple), a finite iterator (generator, map, zip) as what it yields; else NotLiteral."""
    if depth > MAX_LITERAL_DEPTH:
        raise NotLiteral(f"a value nested deeper than {MAX_LITERAL_DEPTH} levels")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    items = lambda values: [encode_literal(item, depth + 1) for item in values]
    if kind is list:
        return items(value)
    if kind in (tuple, set, frozenset):
        return {kind.__name__: items(value)}
    if kind is dict:
        return {"dict": [[encode_literal(k, depth + 1), encode_literal(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    for plain in _PLAIN_TYPES:
        if isinstance(value, plain):
            return encode_literal(plain(value), depth + 1)
    from collections.abc import Iterator
    if isinstance(value, Iterator):
        yielded = []
        for item in value:
            if len(yielded) == MAX_ITERATOR_ITEMS:
                raise NotLiteral(f"an iterator of more than {MAX_ITERATOR_ITEMS} items")
            yielded.append(item)
        return {"iterator": items(yielded)}
    raise NotLiteral(f"a value of type {getattr(kind, '__qualname__', '?')[:100]}")


def decode_literal(data, depth: int = 0):
    """The value that encode_literal made `data` from, built of fresh builtin objects only (an iterator
    comes back as a list iterator); ValueError for anything else. On the judge's side this is the boundary:
    whatever the sandbox sends becomes plain data, or a failure."""
    if depth > MAX_LITERAL_DEPTH:
        raise ValueError(f"a value nested deeper than {MAX_LITERAL_DEPTH} levels")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode_literal(item, depth + 1) for item in data]
    if kind is dict and len(data) == 1:
        (tag, payload), = data.items()
        try:
            if tag in ("tuple", "set", "frozenset", "iterator") and type(payload) is list:
                values = [decode_literal(item, depth + 1) for item in payload]
                if tag == "iterator":
                    return iter(values)
                return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](values)
            if tag == "dict" and type(payload) is list and all(type(p) is list and len(p) == 2 for p in payload):
                return {decode_literal(k, depth + 1): decode_literal(v, depth + 1) for k, v in payload}
            if tag == "bytes" and type(payload) is str:
                return bytes.fromhex(payload)
            if (tag == "complex" and type(payload) is list and len(payload) == 2
                    and all(type(part) in (int, float) for part in payload)):
                return complex(*payload)
        except (TypeError, OverflowError) as e:  # an unhashable set member or dict key; a huge int
            raise ValueError(f"not a literal value: {e}") from None
    raise ValueError(f"not an encoded literal value: {str(data)[:100]}")


class LineReader:
    """JSON lines from a pipe, each at most MAX_MESSAGE_BYTES."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, bytearray()

    def readline(self, deadline: float | None = None) -> bytes | None:
        """The next line (None at end of file); TimeoutError once time.monotonic() passes `deadline`,
        ValueError for a line over the size limit."""
        newline = self.buffer.find(b"\n")
        while newline < 0:
            if len(self.buffer) > MAX_MESSAGE_BYTES:
                raise ValueError(f"a message over {MAX_MESSAGE_BYTES} bytes")
            if deadline is not None:
                import select
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            newline = chunk.find(b"\n")
            if newline >= 0:
                newline += len(self.buffer)
            self.buffer += chunk
        line = bytes(self.buffer[:newline])
        del self.buffer[:newline + 1]
        return line


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
