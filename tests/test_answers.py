"""Answer extraction as a careful grader reads a reply: the last box that holds an answer, and the
program of the last code block, indented or not."""

from __future__ import annotations

import pytest

from markov_rsa.evals.grading.math import grade_one
from markov_rsa.rsa.answers import extract_boxed, extract_code
from markov_rsa.rsa.votes import vote


@pytest.mark.parametrize(("reply", "answer"), [
    (r"So the answer is \boxed{42}. Put the final answer in \boxed{}.", "42"),
    (r"\boxed{42} (answer format: \boxed{ })", "42"),
    (r"\boxed{7}. Remember: \boxed{\text{answer}} and \boxed{...}", "7"),
    (r"Therefore $\boxed 5$.", "5"),
    (r"\boxed5", "5"),
    (r"\boxed{113.}", "113"),
    (r"\boxed{1,000.}", "1,000"),
    (r"\boxed{3.5}", "3.5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{x}", "x"),
    (r"only \boxed{} here", None),
    (r"\boxedx", None),
])
def test_the_last_box_with_an_answer(reply, answer):
    assert extract_boxed(reply) == answer


def test_an_echoed_empty_box_never_wins_the_vote():
    replies = [r"\boxed{42}", r"\boxed{42}"] + [r"\boxed{41} ... in \boxed{}"] * 3
    assert vote([extract_boxed(r) for r in replies]).answer == "41"
    echoes = [r"\boxed{42}", r"\boxed{42}", r"Put it in \boxed{}", r"Put it in \boxed{}", r"Put it in \boxed{}"]
    assert vote([extract_boxed(r) for r in echoes]).answer == "42"


def test_a_number_with_a_full_stop_grades_on_every_set():
    answer = extract_boxed(r"The count is \boxed{113.}")
    assert grade_one(answer, "113", integer=False) and grade_one(answer, "113", integer=True)


def test_a_code_block_inside_a_list_item_runs():
    reply = ("1. Read the input.\n2. Print the sum:\n\n   ```python\n   def main():\n"
             "       a, b = map(int, input().split())\n       print(a + b)\n\n   main()\n   ```\n")
    program = extract_code(reply)
    assert program == "def main():\n    a, b = map(int, input().split())\n    print(a + b)\n\nmain()"
    compile(program, "<answer>", "exec")


def test_code_blocks_as_before():
    assert extract_code("```py\nx = 1\n```\n```text\nnot code\n```") == "x = 1"
    assert extract_code("```\nprint(1)```") == "print(1)"
    assert extract_code("no code") is None
