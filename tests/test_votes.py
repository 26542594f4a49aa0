"""The vote agrees with the math grader: answers it calls equal vote together, others never do;
the grader's equivalence is bounded (deadline, cache, fallback to keys) and the result deterministic."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from markov_rsa.evals.grading.math import grade_one
from markov_rsa.rsa import votes as votes_module
from markov_rsa.rsa.answers import normalize_answer
from markov_rsa.rsa.tasks import MathTask
from markov_rsa.rsa.votes import CanonicalEquivalence, MathEquivalence, vote
from tests.answer_pairs import PAIRS


@pytest.fixture(scope="module")
def math_eq():
    eq = MathEquivalence(deadline=5.0)
    yield eq
    eq.close()


def test_the_table_covers_every_form():
    categories = {c for c, *_ in PAIRS}
    assert len(PAIRS) >= 60
    assert categories >= {"integer", "fraction", "radical", "degrees", "set", "tuple", "interval", "choice",
                          "equation", "text"}
    assert sum(equal for *_, equal in PAIRS) >= 25 and sum(not equal for *_, equal in PAIRS) >= 25


@pytest.mark.parametrize(("category", "a", "b", "equal"), PAIRS, ids=[f"{c}:{a}|{b}" for c, a, b, _ in PAIRS])
def test_labels_are_the_graders_own(category, a, b, equal):
    assert (grade_one(a, b, False) or grade_one(b, a, False)) == equal


def test_the_vote_merges_exactly_the_equal_pairs(math_eq):
    wrong = [(a, b, equal) for _, a, b, equal in PAIRS if (vote([a, b], math_eq).votes == 2) != equal]
    assert not wrong
    assert math_eq.stats.undecided == 0


@pytest.mark.parametrize(("category", "a", "b"), [(c, a, b) for c, a, b, equal in PAIRS if not equal])
def test_canonical_keys_never_merge_different_answers(category, a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_winners_the_grader_agrees_with(math_eq):
    radicals = [r"\sqrt2/2", r"\frac{\sqrt2}{2}", r"\frac{\sqrt{2}}{2}", "1", "1"]
    assert vote(radicals, math_eq).winner == 0 and vote(radicals, math_eq).votes == 3
    equations = ["x=5", "5", "k=5", "6", "6"]
    assert vote(equations, math_eq).answer == "x=5" and vote(equations, math_eq).votes == 3
    assert vote(["\\leftarrow", "\\rightarrow", "\\rightarrow"], math_eq).answer == "\\rightarrow"
    assert vote(["1 2", "12", "12"], math_eq).votes == 2


def test_clusters_do_not_depend_on_the_order_answers_came_in(math_eq):
    answers = [r"\sqrt2/2", "x=5", r"\frac{1}{\sqrt2}", "5", r"\{1,2\}", r"\{2,1\}", "7"]
    expected = {frozenset(answers[i] for i in c.members) for c in vote(answers, math_eq).clusters}
    for perm in itertools.islice(itertools.permutations(answers), 0, 5040, 997):
        got = {frozenset(perm[i] for i in c.members) for c in vote(list(perm), math_eq).clusters}
        assert got == expected


def test_ties_go_to_the_earliest_answer_and_none_abstains():
    result = vote(["7", None, "5", "5", "7", "3"])
    assert (result.winner, result.votes, result.abstained) == (0, 2, (1,))
    assert vote([None, None]).winner is None and vote([]).votes == 0


def test_pairs_are_compared_once(math_eq):
    before = math_eq.stats.compared
    for _ in range(3):
        vote([r"\sqrt{8}", r"2\sqrt{2}", r"\sqrt{8}"], math_eq)
    assert math_eq.stats.compared - before <= 1 and math_eq.stats.cached >= 2


def test_integers_never_reach_the_symbolic_grader():
    class Counting:
        name = "counting"
        calls = 0

        def same(self, a, b):
            Counting.calls += 1
            return False

    assert vote(["1", "2", "03", "4", "1000", "1,000"], Counting()).votes == 2
    assert Counting.calls == 0


def test_a_pair_that_overruns_its_deadline_falls_back_to_keys():
    eq = MathEquivalence(deadline=0.5, max_overruns=1)
    try:
        slow = r"(x+1)^{100000}"
        result = vote([slow, "x^2", "x^2", "(x)^2"], eq)
        assert result.undecided >= 1 and result.votes >= 2, "keys still decide what they can"
        assert eq.unavailable and "overran" in eq.unavailable
        later = vote([r"\sqrt2/2", r"\frac{\sqrt2}{2}"], eq)  # no more worker: keys only, counted
        assert later.votes == 1 and later.undecided == 1
    finally:
        eq.close()


def test_without_math_verify_keys_decide_and_say_so(monkeypatch):
    monkeypatch.setattr(votes_module.importlib.util, "find_spec", lambda name: None)
    eq = MathEquivalence()
    assert eq.unavailable and "math-verify" in eq.unavailable
    result = vote(["x=5", "5", r"\sqrt2/2", r"\frac{\sqrt2}{2}"], eq)
    assert result.votes == 2 and result.undecided >= 1


def test_math_tasks_vote_with_the_graders_equivalence_by_default():
    task = MathTask()
    assert isinstance(task.equivalence, MathEquivalence)
    assert vote(["a", "A"], CanonicalEquivalence()).votes == 1


def test_importing_the_vote_loads_no_symbolic_stack():
    code = ("import sys, markov_rsa, markov_rsa.rsa.votes;"
            "print(sorted(m for m in ('torch', 'sympy', 'math_verify') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_run_picks_the_answer_the_grader_would_count():
    from markov_rsa import MarkovianRSA, RSAConfig
    from tests.doubles import ScriptedBackend

    answers = ["x=5", "6", "5", "6", "k=5"]
    backend = ScriptedBackend(lambda req, n: f"So \\boxed{{{answers[req.tags['index']]}}}")
    result = await MarkovianRSA(backend, RSAConfig(population=5, k=2, rounds=0, budget=50, tail=10, seed=1)).solve("p")
    assert (result.answer, result.votes) == ("x=5", 3)
    assert result.equivalence == "math-verify" and result.vote_undecided == 0
