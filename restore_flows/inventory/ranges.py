"""Host name ranges: ``ws-icu-arl-[001:040]`` is forty hosts, ws-icu-arl-001 to ws-icu-arl-040."""

from __future__ import annotations

import re
from functools import lru_cache

MAX_RANGE = 100_000
"""A larger range is surely a typo (an extra digit) and would flood the plan."""

# ASCII digits only: '\d' would also take fullwidth or Arabic-Indic digits, which int() reads but no
# DNS name may hold.
_RANGE = re.compile(r"(?P<prefix>[^\[\]]*)\[(?P<start>[0-9]+):(?P<end>[0-9]+)\](?P<suffix>[^\[\]]*)")
# RFC 1123: dot-separated labels of ASCII letters, digits and '-', none starting or ending with '-'.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
MAX_LABEL = 63
MAX_NAME = 253


class RangeError(ValueError):
    pass


def is_range(pattern: str) -> bool:
    return "[" in pattern or "]" in pattern


def size(pattern: str) -> int:
    """How many names a pattern stands for, without listing them. Raises ``RangeError``."""
    if not is_range(pattern):
        return 1
    start, end, _ = _parse(pattern)
    return end - start + 1


def expand(pattern: str) -> list[str]:
    """All names a pattern stands for; a plain name stands for itself. Raises ``RangeError``."""
    return list(expanded(pattern))


@lru_cache(maxsize=1024)
def expanded(pattern: str) -> tuple[str, ...]:
    """:func:`expand`, remembered: a group's hosts all depending on one range expand it once."""
    if not is_range(pattern):
        return (pattern,)
    start, end, width = _parse(pattern)
    match = _RANGE.fullmatch(pattern)
    assert match is not None
    prefix, suffix = match["prefix"], match["suffix"]
    return tuple(f"{prefix}{number:0{width}d}{suffix}" for number in range(start, end + 1))


def _parse(pattern: str) -> tuple[int, int, int]:
    match = _RANGE.fullmatch(pattern)
    if match is None:
        raise RangeError(
            f"malformed range {pattern!r}: expected one range like 'name-[001:040]' "
            "(ASCII digits, a colon, ASCII digits, in square brackets)"
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
    return start, end, len(start_text) if padded else 0  # same width as end_text when padded


def name_problem(name: str) -> str | None:
    """Why ``name`` is not an RFC 1123 host name, or None when it is one."""
    if len(name) > MAX_NAME:
        return f"{len(name)} characters; a host name has at most {MAX_NAME}"
    for label in name.split("."):
        if not label:
            return "an empty label (two dots in a row, or a dot at an end)"
        if len(label) > MAX_LABEL:
            return f"the label {label[:20]!r}... has {len(label)} characters; at most {MAX_LABEL}"
        if _LABEL.fullmatch(label) is None:
            return (
                "only letters, digits and '-' in each dot-separated label (ASCII, RFC 1123), "
                f"not starting or ending with '-': not {label!r}"
            )
    return None
