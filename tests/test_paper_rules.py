"""Rules that keep a run faithful to the papers' settings (issue: final budget, prompt order,
lineages, stated sampling, equivalence voting, selection under limits, truncation, Delethink chunks).

Pinned with the scripted backend (one character = one token); backends' own behaviour is tested
against real servers in their own files.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest

from markov_rsa import BackendRequestError, BackendUnavailableError, Generation, MarkovianRSA, RSAConfig
from markov_rsa.errors import ConfigError
from markov_rsa.rsa.answers import majority, normalize_answer
from markov_rsa.rsa.prompts import MATH_V1, PROMPTS, prompt_set
from markov_rsa.rsa.rollout import combine_chunks
from tests.doubles import ScriptedBackend, prompt_of

MARK = re.compile(r"<R(\d+)C(\d+)>")


def marked(request, _number):
    t, i = request.tags["round"], request.tags["index"]
    return f"{'x' * 40} \\boxed{{{i % 3}}} <R{t}C{i}>"


async def solve(backend, **kw):
    base = {"population": 6, "k": 3, "rounds": 2, "budget": 200, "tail": 60, "seed": 7}
    return await MarkovianRSA(backend, RSAConfig(**{**base, **kw})).solve("What is 1+1?")


# -- 1. final budget ------------------------------------------------------------------------------
async def test_final_budget_is_the_last_stage_max_tokens():
    backend = ScriptedBackend(marked)
    result = await solve(backend, rounds=2, final_budget=900)
    budgets = {r.tags["round"]: r.max_tokens for r in backend.requests}
    assert budgets == {0: 200, 1: 200, 2: 900}
    assert [r.budget for r in result.rounds] == [200, 200, 900]


async def test_final_budget_applies_to_the_final_aggregation_when_there_is_one():
    backend = ScriptedBackend(marked)
    await solve(backend, rounds=1, final="aggregate", final_n=2, final_budget=700)
    budgets = Counter((r.tags["round"], r.max_tokens) for r in backend.requests)
    assert budgets == {(0, 200): 6, (1, 200): 6, (2, 700): 2}


def test_report_presets_give_the_last_stage_40k_and_default_is_beta():
    for name in ("zaya-16k", "zaya-40k", "light", "apex-high"):
        assert RSAConfig.from_preset(name).last_stage_budget == 40960, name
    assert RSAConfig(budget=1000, tail=10).last_stage_budget == 1000
    assert RSAConfig() == RSAConfig.from_preset("zaya-16k") and RSAConfig().last_stage_budget == 40960, \
        "the library and the CLI start from the same preset"
    assert RSAConfig(population=4, k=2).last_stage_budget == 40960
    assert RSAConfig.from_preset("zaya-16k", budget=24, tail=8).last_stage_budget == 24, \
        "a budget set by hand is every stage's"
    assert RSAConfig.from_preset("zaya-16k", budget=24, tail=8, final_budget=99).last_stage_budget == 99


# -- 2. aggregation prompt ------------------------------------------------------------------------
async def test_v2_prompt_ends_with_the_instruction_and_shuffles_candidates():
    backend = ScriptedBackend(marked)
    result = await solve(backend, population=8, k=4, rounds=1)
    assert result.prompts["version"] == "2" and result.prompts["fingerprint"] == PROMPTS["math"].fingerprint
    orders = []
    for request in backend.requests:
        if request.tags["round"] != 1:
            continue
        prompt = prompt_of(request)
        last_candidate = prompt.rfind("--- End of candidate")
        instruction = prompt.rfind("Now write one improved solution")
        assert instruction > last_candidate, "the instruction comes after the candidates"
        assert prompt.rstrip().endswith("\\boxed{}."), "the text before the model's turn is the instruction"
        orders.append([int(c) for _, c in MARK.findall(prompt)])
    assert any(order != sorted(order) for order in orders), "candidates are not sorted by index"
    first_slot = Counter(order[0] for order in orders)
    assert len(first_slot) > 2, "no index owns the first position in all prompts"


async def test_v1_stays_selectable_sorted_and_recorded():
    backend = ScriptedBackend(marked)
    result = await solve(backend, prompt_version="1", rounds=1)
    assert result.prompts == {"name": "math", "version": "1", "fingerprint": MATH_V1.fingerprint}
    for request in backend.requests:
        if request.tags["round"] == 1:
            order = [int(c) for _, c in MARK.findall(prompt_of(request))]
            assert order == sorted(order)
            assert prompt_of(request).rstrip().endswith("--- End of candidate 3 ---")


def test_unknown_prompt_version_is_a_config_error():
    with pytest.raises(ConfigError, match="prompt_version"):
        prompt_set("math", "9")


# -- 3. K=1 keeps lineages -----------------------------------------------------------------------
async def test_k1_child_i_continues_parent_i():
    backend = ScriptedBackend(marked)
    result = await solve(backend, population=8, k=1, rounds=3)
    for record in result.rounds[1:]:
        assert [c.parents for c in record.candidates] == [[i] for i in range(8)]
    for request in backend.requests:
        t, i = request.tags["round"], request.tags["index"]
        if t:
            assert MARK.findall(prompt_of(request)) == [(str(t - 1), str(i))]


# -- 4. sampling is stated ------------------------------------------------------------------------
async def test_result_records_the_sampling_every_request_stated():
    backend = ScriptedBackend(marked)
    result = await solve(backend, rounds=1, final="aggregate", final_temperature=0.6, final_top_p=0.95,
                         final_top_k=40)
    assert result.sampling == {"rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": None},
                               "final": {"temperature": 0.6, "top_p": 0.95, "top_k": 40}}
    finals = [r.sampling for r in backend.requests if r.tags["round"] == 2]
    assert {(s.temperature, s.top_p, s.top_k) for s in finals} == {(0.6, 0.95, 40)}


# -- 6. majority by equivalence -------------------------------------------------------------------
@pytest.mark.parametrize("forms", [
    [r"\frac12", "1/2", "0.5", r"\dfrac{1}{2}", r"\frac{1}{2}", "0.50"],
    [r"\sqrt3", r"\sqrt{3}"],
    [r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}"],
    ["-3/6", r"-\frac{1}{2}", "-0.5"],
    ["1,000", "1000", "01000"],
])
def test_equal_values_vote_together(forms):
    assert len({normalize_answer(f) for f in forms}) == 1
    winner, votes = majority([*forms, "7", "7"])
    assert votes == len(forms) and winner == 0


def test_different_values_stay_apart_and_ties_are_deterministic():
    assert normalize_answer("3,4") != normalize_answer("34")
    assert normalize_answer("0.5") != normalize_answer("0.05")
    assert majority(["2", "1/2", "0.5", "2.0"]) == (0, 2), "tie: the answer that came first"
    assert majority(["a", "b"], same=lambda x, y: True) == (0, 2), "a grader's equivalence merges more"


# -- 7. selection under limits and failures -------------------------------------------------------
async def test_time_limit_mid_round_selects_from_the_last_complete_round():
    def reply(request, _n):
        t, i = request.tags["round"], request.tags["index"]
        answer = 5 if t == 0 else 9  # round 1's early finishers would vote 9
        return f"ok \\boxed{{{answer}}} <R{t}C{i}>"

    class Slow(ScriptedBackend):
        async def generate(self, request):
            if request.tags["round"] == 1 and request.tags["index"] > 0:
                import asyncio
                await asyncio.sleep(30)
            return await super().generate(request)

    backend = Slow(reply)
    result = await solve(backend, rounds=1, time_limit=1.0)
    assert result.stop_reason == "time_limit"
    assert len(result.rounds[1].candidates) == 1 and not result.rounds[1].complete
    assert result.selection == "last_complete_round"
    assert result.answer == "5" and result.selected[0] == 0


async def test_final_aggregation_without_answer_falls_back_to_population_majority():
    def reply(request, _n):
        if request.tags["round"] == 2:
            return "y" * 500  # truncated: no answer
        return f"ok \\boxed{{4}} <R{request.tags['round']}C{request.tags['index']}>"

    result = await solve(ScriptedBackend(reply), rounds=1, final="aggregate", final_n=2)
    assert result.rounds[-1].kind == "final" and all(c.answer is None for c in result.rounds[-1].candidates)
    assert result.selection == "majority_after_final"
    assert result.answer == "4" and result.selected[0] == 1


async def test_final_aggregation_answer_is_chosen_when_it_has_one():
    def reply(request, _n):
        answer = 8 if request.tags["round"] == 2 else 4
        return f"ok \\boxed{{{answer}}}"

    result = await solve(ScriptedBackend(reply), rounds=1, final="aggregate", final_n=3)
    assert result.selection == "final_aggregate" and result.answer == "8" and result.votes == 3


# -- 8. truncation is consistent ------------------------------------------------------------------
@pytest.mark.parametrize("generation", [
    Generation("", "length", 50, 10, reasoning="so \\boxed{3} maybe, but wait"),  # server split reasoning out
    Generation("<think>so \\boxed{3} maybe, but wait", "length", 50, 10),  # <think> inline
    Generation("so \\boxed{3} maybe, but wait", "length", 50, 10, think_opened=True),  # the template opened it
])
async def test_a_rollout_cut_inside_its_reasoning_never_votes(generation):
    def reply(request, _n):
        return generation if request.tags["index"] < 4 else "done: \\boxed{7}"

    result = await solve(ScriptedBackend(reply), rounds=0)
    assert [c.answer for c in result.rounds[0].candidates] == [None] * 4 + ["7", "7"]
    assert result.answer == "7"


@pytest.mark.parametrize("finished_first", [True, False])
async def test_a_template_opened_think_block_is_recognised_without_the_servers_word(finished_first):
    """No tokenize endpoint, so the server cannot say the template opened <think>; a reply that closes a
    think block it never opened says so, and replies cut at the budget without </think> never vote."""
    def reply(request, _n):
        cut = request.tags["index"] < 4
        if cut:
            return Generation("so \\boxed{9} maybe, but wait", "length", 50, 10)
        return "checked it</think>done: \\boxed{7}"

    class Ordered(ScriptedBackend):
        async def generate(self, request):
            if (request.tags["index"] < 4) == finished_first:
                await asyncio.sleep(0.05)
            return await super().generate(request)

    result = await solve(Ordered(reply), rounds=1, population=6, k=2)
    for stage in result.rounds:
        assert [c.answer for c in stage.candidates] == [None] * 4 + ["7", "7"]
        assert not any(c.finished for c in stage.candidates[:4])
    assert result.answer == "7"


async def test_a_plain_models_reply_cut_at_the_budget_still_votes():
    """Without a think block there is no reasoning apart from the answer: the reply counts as written."""
    def reply(request, _n):
        return Generation("The answer is \\boxed{3}, and more", "length", 50, 10)

    result = await solve(ScriptedBackend(reply), rounds=0, population=2)
    assert [c.answer for c in result.rounds[0].candidates] == ["3", "3"]


async def test_the_local_backend_says_when_its_template_opened_the_think_block(smol):
    plain = list(await smol.tokenize("Hello"))
    opened = list(await smol.tokenize("<|im_start|>assistant\n<think>\n"))
    assert not smol._opens_think(plain) and smol._opens_think(opened)


# -- 9. Delethink chunks --------------------------------------------------------------------------
async def test_context_mode_first_chunk_generates_c_later_ones_c_minus_m():
    backend = ScriptedBackend(lambda request, n: "z" * 1000)
    cfg = {"population": 1, "k": 1, "rounds": 0, "budget": 400, "tail": 50, "chunk_size": 100, "carryover": 40,
           "keep_head": 10}
    await solve(backend, **cfg, chunk_mode="context")
    assert [r.max_tokens for r in backend.requests] == [100, 60, 60, 60, 60, 60]
    backend = ScriptedBackend(lambda request, n: "z" * 1000)
    await solve(backend, **cfg)
    assert [r.max_tokens for r in backend.requests] == [100, 100, 100, 100]


def test_delethink_preset_is_the_reference_setting():
    d = RSAConfig.from_preset("delethink")
    assert (d.chunk_size, d.carryover, d.max_chunks, d.keep_head, d.chunk_mode) == (8192, 4096, 5, 100, "context")
    assert d.budget == 8192 + 4 * 4096


def test_an_answer_split_across_a_chunk_boundary_survives():
    chunks = [
        Generation("", "length", 10, 5, reasoning="think think"),
        Generation("The answer is \\boxed{4", "length", 10, 5, reasoning="more thinking"),
        Generation("", "stop", 3, 5, reasoning="2}."),  # the parser saw no </think> in this chunk
    ]
    combined = combine_chunks(chunks)
    assert combined.reasoning == "think thinkmore thinking"
    assert combined.text == "The answer is \\boxed{42}."
    assert combined.completion_tokens == 23


# -- 10. a tail-cutting failure is not a run failure ----------------------------------------------
async def test_tokenizer_failure_gives_an_approximate_tail_not_a_failed_run():
    class BrokenTokenizer(ScriptedBackend):
        async def tokenize(self, text):
            raise BackendRequestError("tokenize: HTTP 400")

    result = await solve(BrokenTokenizer(lambda request, n: "w" * 150 + " \\boxed{1}"), rounds=1, tail=20)
    assert all(c.ok for r in result.rounds for c in r.candidates)
    assert all(c.tail_approximate for r in result.rounds for c in r.candidates)
    assert result.tails_approximate and result.answer == "1"


async def test_chunk_carry_over_failure_gives_an_approximate_carry_over_not_a_failed_rollout():
    class BrokenDetokenizer(ScriptedBackend):
        calls = 0

        async def detokenize(self, ids):
            self.calls += 1
            if self.calls == 1:
                raise BackendUnavailableError("detokenize: connection reset")
            return await super().detokenize(ids)

    backend = BrokenDetokenizer(lambda request, n: "z" * 1000)
    result = await solve(backend, population=2, k=1, rounds=0, budget=300, chunk_size=100, carryover=20,
                         candidate_retries=0)
    assert all(c.ok and c.chunks == 3 for c in result.rounds[0].candidates)
    assert sorted(c.tail_approximate for c in result.rounds[0].candidates) == [False, True]
    assert result.tails_approximate


async def test_delethink_survives_a_tokenizer_that_fails_once():
    class FlakyTokenizer(ScriptedBackend):
        failed = False

        async def tokenize(self, text):
            if not self.failed:
                self.failed = True
                raise BackendUnavailableError("tokenize: HTTP 503")
            return await super().tokenize(text)

    backend = FlakyTokenizer(lambda request, n: Generation("z" * request.max_tokens, "length", request.max_tokens, 5)
                             if request.tags["chunk"] < 2 else "done \\boxed{6}")
    config = RSAConfig.from_preset("delethink", budget=600, chunk_size=200, carryover=100, keep_head=10, max_chunks=4)
    result = await MarkovianRSA(backend, config).solve("p")
    (candidate,) = result.rounds[0].candidates
    assert candidate.ok and candidate.chunks == 3 and candidate.tail_approximate and result.answer == "6"


# -- 11. validation follows meaning; abnormal finish reasons are failures --------------------------
def test_k_only_matters_when_something_aggregates():
    RSAConfig.from_preset("parallel", population=1)
    with pytest.raises(ConfigError, match="k"):
        RSAConfig(population=2, k=4, rounds=1)
    with pytest.raises(ConfigError, match="k"):
        RSAConfig(population=2, k=4, rounds=0, final="aggregate")


@pytest.mark.parametrize("reason", ["abort", "content_filter"])
async def test_abnormal_finish_reasons_are_failures_not_answers(reason):
    def reply(request, _n):
        if request.tags["index"] == 0:
            return Generation("\\boxed{3}", reason, 5, 5)
        return "\\boxed{1}"

    result = await solve(ScriptedBackend(reply), rounds=0, candidate_retries=1)
    first = result.rounds[0].candidates[0]
    assert not first.ok and first.finish_reason == reason and first.answer is None
    assert first.usage.completion_tokens == 10, "both attempts' tokens were paid for and are counted"
    assert result.answer == "1"


# -- 11. full-chain RSA carries whole replies -----------------------------------------------------
async def test_full_chain_rsa_carries_the_answer_sections_of_a_thinking_model():
    """A server that splits reasoning out: rsa-paper's prompts hold each candidate's reasoning and answer."""
    def reply(request, _n):
        return Generation(f"ANSWER-{request.tags['index']} \\boxed{{4}}", "stop", 40, 10,
                          reasoning=f"REASONING-{request.tags['index']} " + "r" * 20)

    backend = ScriptedBackend(reply)
    config = RSAConfig.from_preset("rsa-paper", population=4, k=2, rounds=1, budget=200, tail=200, seed=3)
    assert config.tail_source == "full"
    await MarkovianRSA(backend, config).solve("p")
    for request in (r for r in backend.requests if r.tags["round"] == 1):
        prompt = prompt_of(request)
        assert len(re.findall(r"REASONING-\d", prompt)) == 2 and len(re.findall(r"ANSWER-\d", prompt)) == 2
    cut = await MarkovianRSA(ScriptedBackend(reply), config.replace(tail=12)).solve("p")
    assert {c.tail for c in cut.rounds[0].candidates} == {f"ANSWER-{i} \\boxed{{4}}"[-12:] for i in range(4)}, \
        "τ keeps the end of everything the candidate wrote"


def test_delethink_samples_as_its_reference():
    assert RSAConfig.from_preset("delethink").temperature == 0.6
