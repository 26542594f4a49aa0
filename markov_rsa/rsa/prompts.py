"""Every prompt the engine sends, versioned; results record the name and version they ran with.

Change wording only by adding a new version: old results must stay interpretable. Each prompt
set has an initial prompt, an aggregation prompt for K >= 2 and one for K = 1 (a single earlier
attempt is continued and checked rather than compared).

Version 2 (the default) closes every aggregation prompt with the instruction, after the
candidates, so the text right before the model's turn is what it must do rather than another
solver's mid-thought reasoning; and it presents the K candidates in a seeded random order
(``shuffle``), so no position in the prompt belongs to low or high indices in all N prompts.
Version 1 (candidates sorted by index, instruction first) stays selectable with
``prompt_version="1"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from markov_rsa.backends.base import Message
from markov_rsa.errors import ConfigError


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    initial: str
    aggregate: str
    aggregate_single: str
    candidate: str
    #: Present the K candidates in the sampled (random) order rather than sorted by index.
    shuffle: bool = False

    @property
    def fingerprint(self) -> str:
        parts: tuple[str, ...] = (self.initial, self.aggregate, self.aggregate_single, self.candidate)
        if self.shuffle:
            parts += ("shuffle",)
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]

    def initial_messages(self, problem: str, context: Sequence[Message] = (),
                         trailing: Sequence[Message] = ()) -> tuple[Message, ...]:
        """The round-0 prompt. ``context`` (system messages, earlier turns of a conversation) comes first;
        ``trailing`` (an agent's tool calls and their results after the problem) comes after it."""
        return (*context, {"role": "user", "content": self.initial.format(problem=problem)}, *trailing)

    def aggregation_messages(self, problem: str, tails: Sequence[str], context: Sequence[Message] = (),
                             trailing: Sequence[Message] = ()) -> tuple[Message, ...]:
        """An aggregation prompt; a conversation's ``context`` and ``trailing`` turns are kept before it."""
        before: tuple[Message, ...] = (*context, {"role": "user", "content": problem}, *trailing) if trailing \
            else tuple(context)
        return (*before, self._aggregation_message(problem, tails))

    def _aggregation_message(self, problem: str, tails: Sequence[str]) -> Message:
        if len(tails) == 1:
            content = self.aggregate_single.format(problem=problem, candidate=tails[0])
        else:
            blocks = "\n\n".join(
                self.candidate.format(index=i, candidate=tail) for i, tail in enumerate(tails, 1)
            )
            content = self.aggregate.format(problem=problem, candidates=blocks, count=len(tails))
        return {"role": "user", "content": content}


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

_MATH_AGGREGATE_V2 = """Solve the following problem. Below it are {count} candidate solutions written by \
other solvers. Each candidate is only the final part of its author's reasoning, so it may start \
mid-thought, and any of them may be wrong.

Problem:
{problem}

Candidate solutions:

{candidates}

Now write one improved solution to the problem above. Merge the useful ideas of the candidates, \
check their steps, and where they disagree decide which reasoning is correct. If all of them look \
wrong, discard them and try a different strategy. Reason step by step, and end with your final \
answer within \\boxed{{}}."""

_MATH_SINGLE_V2 = """Solve the following problem. Below it is the final part of an earlier attempt at \
it, which may start mid-thought and may contain mistakes.

Problem:
{problem}

Earlier attempt:
{candidate}

Now continue from where the attempt leaves off: check its reasoning, fix what is wrong, and carry \
it through to a complete solution of the problem above. If the approach is hopeless, start over \
with a different strategy. Reason step by step, and end with your final answer within \\boxed{{}}."""

_CODE_AGGREGATE_V2 = """Solve the following programming problem. Below it are {count} candidate \
attempts by other solvers. Each candidate is only the final part of its author's reasoning and \
code, so it may start mid-thought, and any of them may be wrong.

Problem:
{problem}

Candidate attempts:

{candidates}

Now write one improved program for the problem above. Merge the useful ideas of the candidates, \
check their logic against the problem's constraints and examples, and where they disagree decide \
which approach is correct. If all of them look wrong, try a different approach. End with your \
complete solution as one Python program in a single fenced code block (```python ... ```)."""

_CODE_SINGLE_V2 = """Solve the following programming problem. Below it is the final part of an \
earlier attempt at it, which may start mid-thought and may contain mistakes.

Problem:
{problem}

Earlier attempt:
{candidate}

Now continue from where the attempt leaves off: check its logic against the problem's constraints \
and examples, fix what is wrong, and finish with your complete solution as one Python program in a \
single fenced code block (```python ... ```)."""

_GENERIC_AGGREGATE_V2 = """Complete the following task. Below it are {count} candidate responses \
written by other assistants. Each candidate is only the final part of its author's reasoning, so \
it may start mid-thought, and any of them may be wrong.

Task:
{problem}

Candidate responses:

{candidates}

Now write one improved response to the task above. Merge the useful ideas of the candidates, and \
where they disagree decide which is correct. If all of them look wrong, take a different approach."""

_GENERIC_SINGLE_V2 = """Complete the following task. Below it is the final part of an earlier \
response to it, which may start mid-thought and may contain mistakes.

Task:
{problem}

Earlier response:
{candidate}

Now continue from where it leaves off, fix what is wrong, and give a complete response to the task above."""

MATH_V1 = PromptSet("math", "1", _MATH_INITIAL, _MATH_AGGREGATE, _MATH_SINGLE, _CANDIDATE)
CODE_V1 = PromptSet("code", "1", _CODE_INITIAL, _CODE_AGGREGATE, _CODE_SINGLE, _CANDIDATE)
GENERIC_V1 = PromptSet("generic", "1", _GENERIC_INITIAL, _GENERIC_AGGREGATE, _GENERIC_SINGLE, _CANDIDATE)

MATH_V2 = PromptSet("math", "2", _MATH_INITIAL, _MATH_AGGREGATE_V2, _MATH_SINGLE_V2, _CANDIDATE, shuffle=True)
CODE_V2 = PromptSet("code", "2", _CODE_INITIAL, _CODE_AGGREGATE_V2, _CODE_SINGLE_V2, _CANDIDATE, shuffle=True)
GENERIC_V2 = PromptSet("generic", "2", _GENERIC_INITIAL, _GENERIC_AGGREGATE_V2, _GENERIC_SINGLE_V2, _CANDIDATE,
                       shuffle=True)

_AIME_NOTE = "The answer is an integer from 0 to 999 inclusive. "


def _aime(base: PromptSet) -> PromptSet:
    def note(text: str) -> str:
        return text.replace("Reason step by step,", _AIME_NOTE + "Reason step by step,")

    return PromptSet("aime", base.version, note(base.initial), note(base.aggregate), note(base.aggregate_single),
                     base.candidate, shuffle=base.shuffle)


AIME_V1 = _aime(MATH_V1)
AIME_V2 = _aime(MATH_V2)

#: Every prompt set, by name and version.
PROMPT_SETS: Mapping[tuple[str, str], PromptSet] = MappingProxyType({
    (p.name, p.version): p
    for p in (MATH_V1, AIME_V1, CODE_V1, GENERIC_V1, MATH_V2, AIME_V2, CODE_V2, GENERIC_V2)
})
CURRENT_VERSION = "2"

#: The current prompt set of each task.
PROMPTS: Mapping[str, PromptSet] = MappingProxyType(
    {name: PROMPT_SETS[(name, CURRENT_VERSION)] for name in ("math", "aime", "code", "generic")}
)


def prompt_set(name: str, version: str | None = None) -> PromptSet:
    """The prompt set ``name`` at ``version`` (the current one when ``None``)."""
    key = (name, version or CURRENT_VERSION)
    if key not in PROMPT_SETS:
        known = sorted({v for n, v in PROMPT_SETS if n == name})
        raise ConfigError("prompt_version", f"no version {key[1]!r} of the {name} prompts; known: {', '.join(known)}")
    return PROMPT_SETS[key]

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
