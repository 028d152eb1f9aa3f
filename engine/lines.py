"""The lines of a JSON Lines stream, read as bytes in blocks: `decide --jsonl`'s input and
impact's corpus. Each line comes with its number, as a text file read line by line with
universal newlines numbers it, and the lines str.strip() sees blank are skipped, so both say
`line N` as the reading of text lines did."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import IO, NamedTuple

_MAYBE_BLANK = frozenset(b"\x1c\x1d\x1e\x1f\xc2\xe1\xe2\xe3")  # first bytes of whitespace str.strip() knows
READ_SIZE = 1 << 16  # bytes of input read at once, or what there is (read1 awaits no more); 1 MB was slower


def line_blocks(stream: IO[bytes]) -> Iterator[list[tuple[int, bytes]]]:
    """(number, bytes) of each line that is not blank, a list per block of input: the lines as
    reading the stream line by line gives them (with their \n), numbered as a text file read
    with universal newlines numbers them (\n, \r\n and a lone \r end a line), those that
    str.strip() sees blank skipped. Read in blocks and cut in C (a little cheaper than a buffered
    reader's line by line reading); a block is all the input there is for now, so that a reader
    can answer every line read before it waits for more (tail -f ... | bindpolicy decide --jsonl -)."""
    read = getattr(stream, "read1", stream.read)
    number, rest = 0, b""
    while block := read(READ_SIZE):
        data = rest + block if rest else block
        end = data.rfind(b"\n") + 1  # the lines ended so far; the rest waits for its end
        rest = data[end:]
        if end:
            found: list[tuple[int, bytes]] = []
            number = _numbered(data[:end] if rest else data, number, found)
            if found:
                yield found
    if rest:
        last: list[tuple[int, bytes]] = []
        _numbered(rest, number, last)
        if last:
            yield last


class NamedLines(NamedTuple):
    """A block of a named input's lines (line_blocks'), each read at `name:N`."""

    name: str
    lines: list[tuple[int, bytes]]


def named_blocks(name: str, stream: IO[bytes]) -> Iterator[NamedLines]:
    """line_blocks of a stream, each block with the name of its input (a file's, or stdin)."""
    for block in line_blocks(stream):
        yield NamedLines(name, block)


def _numbered(text: bytes, number: int, found: list[tuple[int, bytes]]) -> int:
    """Adds to `found` the lines of `text` (whole lines) that are not blank; the last number."""
    lines: Iterable[bytes] = text.splitlines(keepends=True) if b"\r" not in text else [
        line for chunk in io.BytesIO(text) for line in (chunk.splitlines() if b"\r" in chunk else (chunk,))]
    for line in lines:
        number += 1
        if line[:1] == b"{":  # the usual line: not blank, and no copy of it stripped to say so
            found.append((number, line))
            continue
        stripped = line.strip()
        if stripped and (stripped[0] not in _MAYBE_BLANK or line.decode("utf-8", "replace").strip()):
            found.append((number, line))
    return number
