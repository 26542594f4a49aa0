"""Answer extraction and majority voting.

The engine votes on normalised strings so it needs no symbolic-math stack; the evaluation harness
grades with symbolic equivalence separately. Normalisation only removes differences that never
change a value (spacing, ``\\left``/``\\right``, ``\\dfrac``, leading zeros of integers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    last: str | None = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            ch = text[pos]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    last = text[start:pos].strip()
                    break
    return last


def extract_code(text: str) -> str | None:
    """The last fenced code block, preferring Python-tagged ones when a reply mixes languages."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return None
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return (python or [body for _, body in blocks])[-1].strip("\n") or None


_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\s+")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")
_INT = re.compile(r"[+-]?\d+")
_DEC = re.compile(r"[+-]?\d*\.\d+")


def normalize_answer(answer: str) -> str:
    s = _TEXT.sub(r"\1", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^{\\circ}", "^\\circ")
    s = _DROP.sub("", s).rstrip(".")
    if s.startswith("{") and s.endswith("}") and s.count("{") == 1:
        s = s[1:-1]
    if _INT.fullmatch(s.replace(",", "")) and (s.count(",") == 0 or re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+", s)):
        return str(int(s.replace(",", "")))
    if _DEC.fullmatch(s):
        value = float(s)
        return str(int(value)) if value.is_integer() else repr(value)
    return s


def majority(answers: Sequence[str | None]) -> tuple[int | None, int]:
    """Index of the winning candidate and its vote count.

    Candidates without an answer do not vote. Ties go to the answer that appeared first in the
    population, so the result depends only on the population, never on dict or set ordering.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        key = normalize_answer(answer)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None, 0
    best = min(counts, key=lambda key: (-counts[key], first[key]))
    return first[best], counts[best]


def agreement(answers: Sequence[str | None]) -> float:
    """Share of the population that gave the most common answer (0 when nobody answered)."""
    if not answers:
        return 0.0
    _, votes = majority(answers)
    return votes / len(answers)
