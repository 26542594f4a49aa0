"""Comparing a program's output with the expected one: total and bounded, whatever the program wrote.

The rules are LiveCodeBench's: stdin problems compare stripped lines, falling back to exact decimal
comparison token by token; call-based problems compare JSON values (tuples arrive as lists). The
output is hostile, so every step is bounded: lines and tokens are walked in step with the expected
ones (the walk ends with the shorter side, and nothing is split into lists the size of the output),
a token is read as a number only when it is a finite decimal of at most :data:`MAX_DIGITS`
characters (``sNaN`` or a 5000-digit integer compare as text), and a JSON result much longer than
the expected value, or nested too deeply to parse, is simply wrong. Nothing here raises on any input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

#: Longest token compared as a number (Python's own limit for int <-> str conversion).
MAX_DIGITS = 4300
#: A correct JSON result is at most this many times longer than the expected text, plus the slack
#: below (escapes such as ``\ud83d\ude00`` for one character are the worst case); longer is wrong.
JSON_GROWTH, JSON_SLACK = 12, 4096

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,9})?")
_TOKEN = re.compile(r"\S+")


def _lines(text: str) -> Iterator[str]:
    """The stripped lines of the stripped text, one at a time (no list the size of the output)."""
    text = text.strip()
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            yield text[start:].strip()
            return
        yield text[start:end].strip()
        start = end + 1


def _number(token: str) -> Decimal | None:
    if len(token) > MAX_DIGITS or not _NUMBER.fullmatch(token):
        return None
    try:
        return Decimal(token)
    except (InvalidOperation, ValueError):
        return None


def _tokens_match(a: str, b: str) -> bool:
    got, want = _TOKEN.finditer(a), _TOKEN.finditer(b)
    while True:
        x, y = next(got, None), next(want, None)
        if x is None or y is None:
            return x is None and y is None
        if x.group() == y.group():
            continue
        dx, dy = _number(x.group()), _number(y.group())
        if dx is None or dy is None or dx != dy:
            return False


def stdin_matches(actual: str, expected: str) -> bool:
    """Whether a stdin program's output matches, as LiveCodeBench compares them."""
    got, want = _lines(actual), _lines(expected)
    while True:
        a, b = next(got, None), next(want, None)
        if a is None or b is None:
            return a is None and b is None
        if a != b and not _tokens_match(a, b):
            return False


def _load(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer past MAX_DIGITS, nested too deeply
        return False, None


def functional_matches(actual: str, expected: str) -> bool:
    """Whether a call-based program's JSON result equals the expected value."""
    if len(actual) > JSON_GROWTH * len(expected) + JSON_SLACK:
        return False
    loaded, want = _load(expected)
    if not loaded:
        return actual.strip() == expected.strip()
    loaded, got = _load(actual)
    if not loaded:
        return False
    try:
        return bool(got == want)
    except RecursionError:
        return False
