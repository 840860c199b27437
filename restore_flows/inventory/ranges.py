"""Host name ranges: ``ws-icu-arl-[001:040]`` is forty hosts, ws-icu-arl-001 to ws-icu-arl-040."""

from __future__ import annotations

import re

MAX_RANGE = 100_000
"""A larger range is surely a typo (an extra digit) and would flood the plan."""

_RANGE = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<start>\d+):(?P<end>\d+)\](?P<suffix>[^\[\]]*)$")


class RangeError(ValueError):
    pass


def is_range(pattern: str) -> bool:
    return "[" in pattern or "]" in pattern


def expand(pattern: str) -> list[str]:
    """All names a pattern stands for; a plain name stands for itself. Raises ``RangeError``."""
    if not is_range(pattern):
        return [pattern]
    match = _RANGE.match(pattern)
    if match is None:
        raise RangeError(
            f"malformed range {pattern!r}: expected one range like 'name-[001:040]' "
            "(digits, a colon, digits, in square brackets)"
        )
    start_text, end_text = match["start"], match["end"]
    start, end = int(start_text), int(end_text)
    if start > end:
        raise RangeError(f"malformed range {pattern!r}: start {start_text} is after end {end_text}")
    padded = any(text.startswith("0") and len(text) > 1 for text in (start_text, end_text))
    if padded and len(start_text) != len(end_text):
        raise RangeError(
            f"malformed range {pattern!r}: zero-padded bounds must have the same width "
            f"({start_text!r} and {end_text!r})"
        )
    if end - start + 1 > MAX_RANGE:
        raise RangeError(f"range {pattern!r} has {end - start + 1} hosts; at most {MAX_RANGE}")
    width = len(start_text) if padded else 0  # same width as end_text when padded
    prefix, suffix = match["prefix"], match["suffix"]
    return [f"{prefix}{number:0{width}d}{suffix}" for number in range(start, end + 1)]
