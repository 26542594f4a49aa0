"""Every prompt the engine sends, versioned; results record the name and version they ran with.

Change wording only by adding a new version: old results must stay interpretable. Each prompt
set has an initial prompt, an aggregation prompt for K >= 2 and one for K = 1 (a single earlier
attempt is continued and checked rather than compared).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from markov_rsa.backends.base import Message


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    initial: str
    aggregate: str
    aggregate_single: str
    candidate: str

    @property
    def fingerprint(self) -> str:
        text = "\x00".join((self.initial, self.aggregate, self.aggregate_single, self.candidate))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def initial_messages(self, problem: str) -> tuple[Message, ...]:
        return ({"role": "user", "content": self.initial.format(problem=problem)},)

    def aggregation_messages(self, problem: str, tails: Sequence[str]) -> tuple[Message, ...]:
        if len(tails) == 1:
            content = self.aggregate_single.format(problem=problem, candidate=tails[0])
        else:
            blocks = "\n\n".join(
                self.candidate.format(index=i, candidate=tail) for i, tail in enumerate(tails, 1)
            )
            content = self.aggregate.format(problem=problem, candidates=blocks, count=len(tails))
        return ({"role": "user", "content": content},)


_MATH_INITIAL = """Solve the following problem. Reason step by step, and put your final answer within \\boxed{{}}.

{problem}"""

_MATH_AGGREGATE = """You are given a problem and {count} candidate solutions written by other solvers. \
Each candidate is only the final part of its author's reasoning, so it may start mid-thought, and \
any of them may be wrong.

Write one improved solution. Merge the useful ideas of the candidates, check their steps, and \
where they disagree decide which reasoning is correct. If all of them look wrong, discard them and \
try a different strategy. Reason step by step, and end with your final answer within \\boxed{{}}.

Problem:
{problem}

Candidate solutions:

{candidates}"""

_MATH_SINGLE = """You are given a problem and the final part of an earlier attempt at it. The attempt \
may start mid-thought and may contain mistakes.

Continue from where the attempt leaves off: check its reasoning, fix what is wrong, and carry it \
through to a complete solution. If the approach is hopeless, start over with a different strategy. \
Reason step by step, and end with your final answer within \\boxed{{}}.

Problem:
{problem}

Earlier attempt:
{candidate}"""

_CANDIDATE = """--- Candidate {index} ---
{candidate}
--- End of candidate {index} ---"""

_CODE_INITIAL = """{problem}

Think through the problem, then give your complete solution as one Python program in a single \
fenced code block (```python ... ```)."""

_CODE_AGGREGATE = """You are given a programming problem and {count} candidate attempts by other \
solvers. Each candidate is only the final part of its author's reasoning and code, so it may start \
mid-thought, and any of them may be wrong.

Write one improved program. Merge the useful ideas of the candidates, check their logic against the \
problem's constraints and examples, and where they disagree decide which approach is correct. If all \
of them look wrong, try a different approach. End with your complete solution as one Python program \
in a single fenced code block (```python ... ```).

Problem:
{problem}

Candidate attempts:

{candidates}"""

_CODE_SINGLE = """You are given a programming problem and the final part of an earlier attempt at it. \
The attempt may start mid-thought and may contain mistakes.

Continue from where the attempt leaves off: check its logic against the problem's constraints and \
examples, fix what is wrong, and finish with your complete solution as one Python program in a \
single fenced code block (```python ... ```).

Problem:
{problem}

Earlier attempt:
{candidate}"""

_GENERIC_INITIAL = "{problem}"

_GENERIC_AGGREGATE = """You are given a task and {count} candidate responses written by other \
assistants. Each candidate is only the final part of its author's reasoning, so it may start \
mid-thought, and any of them may be wrong.

Write one improved response. Merge the useful ideas of the candidates, and where they disagree \
decide which is correct. If all of them look wrong, take a different approach.

Task:
{problem}

Candidate responses:

{candidates}"""

_GENERIC_SINGLE = """You are given a task and the final part of an earlier response to it, which \
may start mid-thought and may contain mistakes. Continue from where it leaves off, fix what is \
wrong, and give a complete response.

Task:
{problem}

Earlier response:
{candidate}"""

MATH_V1 = PromptSet("math", "1", _MATH_INITIAL, _MATH_AGGREGATE, _MATH_SINGLE, _CANDIDATE)
CODE_V1 = PromptSet("code", "1", _CODE_INITIAL, _CODE_AGGREGATE, _CODE_SINGLE, _CANDIDATE)
GENERIC_V1 = PromptSet("generic", "1", _GENERIC_INITIAL, _GENERIC_AGGREGATE, _GENERIC_SINGLE, _CANDIDATE)

_AIME_NOTE = "The answer is an integer from 0 to 999 inclusive. "
AIME_V1 = PromptSet(
    "aime", "1",
    _MATH_INITIAL.replace("Reason step by step,", _AIME_NOTE + "Reason step by step,"),
    _MATH_AGGREGATE.replace("Reason step by step,", _AIME_NOTE + "Reason step by step,"),
    _MATH_SINGLE.replace("Reason step by step,", _AIME_NOTE + "Reason step by step,"),
    _CANDIDATE,
)

#: The current prompt set of each task.
PROMPTS: Mapping[str, PromptSet] = MappingProxyType(
    {"math": MATH_V1, "aime": AIME_V1, "code": CODE_V1, "generic": GENERIC_V1}
)

CODE_PROBLEM_VERSION = "1"


def code_problem_text(question: str, starter_code: str = "") -> str:
    """A LiveCodeBench question as the problem the code prompts wrap (version ``CODE_PROBLEM_VERSION``)."""
    if starter_code.strip():
        how = ("Complete the following starter code; keep its class and method signature, and do not read "
               "input or print output yourself:\n```python\n" + starter_code.strip("\n") + "\n```")
    else:
        how = ("Your program reads the input from standard input and writes the answer to standard output. "
               "Do not just test it on the sample inputs.")
    return f"{question.strip()}\n\n{how}"
