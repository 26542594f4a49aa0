"""Answer extraction and canonical keys.

The canonical key removes differences that never change a value (spacing between symbols, sizing
``\\left``/``\\right``, ``\\dfrac``, degree signs, ``x=`` before a value, a set's order, leading
zeros, braces around one-character arguments such as ``\\sqrt3``), and every rational number, however
it is written (``\\frac12``, ``1/2``, ``0.5``), becomes one exact fraction. It never merges two
different answers (``\\leftarrow`` is not ``\\rightarrow``, ``1 2`` is not ``12``). The vote
(:mod:`markov_rsa.rsa.votes`) starts from these keys and merges what the grader's equivalence
deems equal.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_UNBRACED = re.compile(r"[^\s${}]+")
#: A code fence, with the indentation of its opening line (a fence inside a list item is indented).
_FENCE = re.compile(r"^([ \t]*)```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL | re.MULTILINE)
#: A number and the sentence's full stop (``\boxed{113.}``): the number is the answer.
_NUMBER_PUNCT = re.compile(r"([+-]?\d[\d,]*(?:\.\d+)?)[.;:!]")
#: What a reply that echoes the instruction ("put the answer in \boxed{}") puts in its box.
_PLACEHOLDERS = frozenset({"", "...", "\\ldots", "\\cdots", "\\dots", "?", "answer", "ans", "your answer",
                           "final answer", "the answer", "your final answer", "the final answer"})


def _boxes(text: str) -> list[str]:
    """Every box's content in order: ``\\boxed{...}`` (braces balanced) and ``\\boxed 5``."""
    found: list[str] = []
    for match in _BOXED.finditer(text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 1
            for pos in range(start + 1, len(text)):
                ch = text[pos]
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        found.append(text[start + 1:pos].strip())
                        break
        elif match.group().endswith((" ", "\t")) or text[start:start + 1].isdigit():
            token = _UNBRACED.match(text, start)
            if token:
                found.append(token.group())
    return found


def _placeholder(content: str) -> bool:
    inner = re.sub(r"\\(?:text|mathrm|textbf|mathbf|textit)\{([^{}]*)\}", r"\1", content)
    return inner.strip().strip("$").strip().lower() in _PLACEHOLDERS


def extract_boxed(text: str) -> str | None:
    """The answer of the last box that holds one, or None.

    Empty and placeholder boxes (a reply echoing "in ``\\boxed{}``") are skipped, ``\\boxed 5`` is
    read as 5, and a number followed by sentence punctuation (``\\boxed{113.}``) is that number."""
    for content in reversed(_boxes(text)):
        if _placeholder(content):
            continue
        number = _NUMBER_PUNCT.fullmatch(content)
        return number.group(1) if number else content
    return None


def extract_code(text: str) -> str | None:
    """The last fenced code block, preferring Python-tagged ones when a reply mixes languages; a
    fence inside a list item loses the item's indentation."""
    blocks = [(lang.lower(), textwrap.dedent(body)) for _, lang, body in _FENCE.findall(text)]
    if not blocks:
        return None
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return (python or [body for _, body in blocks])[-1].strip("\n").rstrip() or None


#: Spacing commands and math delimiters; ``\left``/``\right`` only as sizing (``\leftarrow`` stays).
_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right)(?![a-zA-Z])|\$|\\displaystyle")
#: A space matters only between two word characters (``1 2`` is not ``12``, ``\pi x`` is not ``\pix``).
_SPACE = re.compile(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textit|operatorname)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\{?\\circ\}?|°")
_CHOICE = re.compile(r"\(([A-Z])\)")
_EQUATION = re.compile(r"[A-Za-z]=([^=,]+)")
_SET = re.compile(r"\\\{([^{}\\]*)\\\}")
_POWER = re.compile(r"([+-]?\d+)\^\{?(\d+)\}?")
_INT = re.compile(r"[+-]?\d+")
_DEC = re.compile(r"[+-]?\d*\.\d+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+")
#: ``\frac12``, ``\frac1{2}``, ``\sqrt3``: one-character arguments get their braces.
_SHORT_ARG = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])(\d|[a-zA-Z])")
_SHORT_FRAC_SECOND = re.compile(r"\\frac(\{(?:[^{}]|\{[^{}]*\})*\})(\d|[a-zA-Z])")
_FRAC = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH = re.compile(r"([+-]?\d+)/([+-]?\d+)")


def _rational(s: str) -> Fraction | None:
    """The exact value of an integer, decimal or simple fraction written any usual way, else None."""
    if _INT.fullmatch(s) or _DEC.fullmatch(s):
        return Fraction(s)
    for pattern in (_FRAC, _SLASH):
        match = pattern.fullmatch(s)
        if match:
            groups = match.groups()
            sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
            num, den = int(groups[-2]), int(groups[-1])
            return sign * Fraction(num, den) if den else None
    return None


#: Answers that are tool calls start with this; their canonical JSON is compared as it is.
TOOL_CALLS_PREFIX = "tool_calls:"


def tool_calls_key(calls: Sequence[dict[str, Any]]) -> str:
    """The canonical form of a candidate's tool calls (names, and arguments as sorted compact JSON), so
    that calls meaning the same thing vote together however their JSON was spaced or ordered."""
    canonical = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        try:
            parsed: Any = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            parsed = arguments
        canonical.append({"name": function.get("name"), "arguments": parsed})
    return TOOL_CALLS_PREFIX + json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalize_answer(answer: str) -> str:
    """The answer's canonical key: spellings of one value share it, and different answers never do.

    Cheap and conservative; what it leaves apart (``\\sqrt2/2`` and ``\\frac{\\sqrt2}{2}``) the vote's
    equivalence (:mod:`markov_rsa.rsa.votes`) may still merge."""
    if answer.startswith(TOOL_CALLS_PREFIX):
        return answer
    s = _TEXT.sub(r"\1", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", _SPACING.sub(" ", s))
    s = _SPACE.sub("", re.sub(r"\s+", " ", s).strip()).rstrip(".")
    if s.startswith("{") and s.endswith("}") and s.count("{") == 1:
        s = s[1:-1]
    s = _SHORT_ARG.sub(r"\\\1{\2}", s)
    s = _SHORT_FRAC_SECOND.sub(r"\\frac\1{\2}", s)
    if _CHOICE.fullmatch(s):
        s = s[1:-1]
    equation = _EQUATION.fullmatch(s)
    if equation:  # x=5 answers 5, as the grader reads it
        s = equation.group(1)
    elements = _SET.fullmatch(s)
    if elements and "," in s:  # a set's order is not part of its value
        s = "\\{" + ",".join(sorted(normalize_answer(e) for e in elements.group(1).split(","))) + "\\}"
    power = _POWER.fullmatch(s)
    if power and int(power.group(2)) <= 64 and abs(int(power.group(1))) <= 10**6:
        s = str(int(power.group(1)) ** int(power.group(2)))
    if _THOUSANDS.fullmatch(s):  # only well-formed thousands separators: 1,000 is 1000, 3,4 stays 3,4
        s = s.replace(",", "")
    value = _rational(s)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return s


def majority(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> tuple[int | None, int]:
    """Index of the winning candidate and its vote count (see :func:`markov_rsa.rsa.votes.vote`).

    Candidates without an answer do not vote. Answers with the same canonical key vote together,
    and so do answers that ``same`` deems equal. Ties go to the answer that appeared first.
    """
    from markov_rsa.rsa.votes import as_equivalence, vote

    result = vote(answers, as_equivalence(same))
    return result.winner, result.votes


def agreement(answers: Sequence[str | None]) -> float:
    """Share of the population that gave the most common answer (0 when nobody answered)."""
    if not answers:
        return 0.0
    _, votes = majority(answers)
    return votes / len(answers)
