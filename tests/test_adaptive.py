"""Consensus early exit: the rule (threshold, min rounds, equivalence, code tasks), its events, result and
server field, pinned with a scripted backend (one character = one token)."""

from __future__ import annotations

import httpx
import pytest

from markov_rsa import MarkovianRSA, RSAConfig
from markov_rsa.errors import ConfigError
from markov_rsa.rsa.consensus import answer_agreement, outcome_agreement
from markov_rsa.rsa.events import ConsensusReached, RoundFinished, RunFinished
from markov_rsa.rsa.result import Candidate
from markov_rsa.rsa.tasks import CodeTask, MathTask
from markov_rsa.rsa.votes import CanonicalEquivalence
from markov_rsa.server import ServerSettings, create_app
from tests.doubles import ScriptedBackend
from tests.servers import serve_app


def scripted(per_round: dict[int, list[str]]):
    """Candidate i of round t answers per_round[t][i] (the last round's list for later rounds)."""

    def reply(request, _number):
        t, i = request.tags["round"], request.tags["index"]
        answers = per_round.get(t, per_round[max(per_round)])
        return f"thinking {'x' * 10} \\boxed{{{answers[i % len(answers)]}}}"

    return reply


NINE_OF_TEN = ["2"] * 9 + ["3"]


def cfg(**kw) -> RSAConfig:
    base = {"population": 10, "k": 2, "rounds": 2, "budget": 200, "tail": 20, "seed": 3}
    return RSAConfig(**{**base, **kw})


async def solve(backend, config, task=None):
    events = []
    async for event in MarkovianRSA(backend, config, task=task).stream("What is 1+1?"):
        events.append(event)
    assert isinstance(events[-1], RunFinished)
    return events[-1].result, events


async def test_threshold_reached_stops_after_that_round_and_it_votes():
    backend = ScriptedBackend(scripted({0: NINE_OF_TEN, 1: ["2"] * 10}))
    result, events = await solve(backend, cfg(early_exit=0.9))
    assert len(result.rounds) == 1 and len(backend.requests) == 10
    assert result.stop_reason == "consensus" and result.answer == "2" and result.selection == "majority"
    assert result.consensus == {"round": 0, "agreement": 0.9, "threshold": 0.9}
    reached = [e for e in events if isinstance(e, ConsensusReached)]
    assert reached == [ConsensusReached(round=0, agreement=0.9, threshold=0.9)]
    assert events.index(reached[0]) > max(i for i, e in enumerate(events) if isinstance(e, RoundFinished))


async def test_threshold_not_reached_runs_every_round():
    backend = ScriptedBackend(scripted({0: NINE_OF_TEN, 1: NINE_OF_TEN}))
    result, events = await solve(backend, cfg(early_exit=1.0))
    assert len(result.rounds) == 3 and result.stop_reason == "complete" and result.consensus is None
    assert not any(isinstance(e, ConsensusReached) for e in events)


async def test_unanimous_later_round_stops_there():
    backend = ScriptedBackend(scripted({0: ["1", "2", "3", "4", "5"], 1: ["2"]}))
    result, _ = await solve(backend, cfg(early_exit=1.0, rounds=4))
    assert [r.index for r in result.rounds] == [0, 1] and result.stop_reason == "consensus"
    assert result.consensus is not None and result.consensus["round"] == 1


async def test_off_by_default_and_the_report_presets_keep_every_round():
    backend = ScriptedBackend(scripted({0: ["2"]}))
    result, _ = await solve(backend, cfg())
    assert len(result.rounds) == 3 and result.stop_reason == "complete"
    for name in ("zaya-16k", "zaya-40k", "light", "apex-high", "rsa-paper"):
        assert RSAConfig.from_preset(name).early_exit is None
        assert RSAConfig.from_preset(f"{name}-adaptive").early_exit == 0.9
    # An -adaptive preset run as one stage has nothing to stop: its early exit goes, not the run.
    assert RSAConfig.from_preset("light-adaptive", rounds=0).early_exit is None


async def test_min_rounds_holds_the_exit_back():
    backend = ScriptedBackend(scripted({0: ["2"]}))
    result, _ = await solve(backend, cfg(early_exit=0.9, min_rounds=1))
    assert [r.index for r in result.rounds] == [0, 1] and result.consensus is not None
    assert result.consensus["round"] == 1


async def test_last_round_agreeing_skips_the_final_aggregation():
    backend = ScriptedBackend(scripted({0: ["1", "2"], 1: ["2"]}))
    result, _ = await solve(backend, cfg(early_exit=1.0, rounds=1, final="aggregate", final_n=2))
    assert [r.kind for r in result.rounds] == ["initial", "aggregate"]
    assert result.stop_reason == "consensus" and result.answer == "2" and result.selection == "majority"


async def test_equal_answers_written_differently_agree():
    backend = ScriptedBackend(scripted({0: ["\\frac12", "0.5", "1/2", "\\dfrac{1}{2}"]}))
    result, _ = await solve(backend, cfg(early_exit=1.0))
    assert result.stop_reason == "consensus" and len(result.rounds) == 1


async def test_the_votes_own_equivalence_decides_agreement():
    """Agreement is the vote's: math-verify calls x+1 and 1+x equal, canonical keys do not."""
    keys_only = MathTask(equivalence=CanonicalEquivalence())
    plain, _ = await solve(ScriptedBackend(scripted({0: ["x+1", "1+x"]})), cfg(early_exit=1.0, rounds=1), keys_only)
    assert plain.stop_reason == "complete"
    merged, _ = await solve(ScriptedBackend(scripted({0: ["x+1", "1+x"]})), cfg(early_exit=1.0, rounds=1))
    assert merged.stop_reason == "consensus" and len(merged.rounds) == 1
    commutes = lambda a, b: sorted(a.split("+")) == sorted(b.split("+"))  # noqa: E731
    assert answer_agreement(["x+1", "1+x", None, "y"], commutes) == 0.5


def program_reply(programs: dict[int, list[str]]):
    def reply(request, _number):
        t, i = request.tags["round"], request.tags["index"]
        options = programs.get(t, programs[max(programs)])
        return f"```python\n{options[i % len(options)]}\n```"

    return reply


async def outcomes_of(program: str) -> tuple[bool, ...]:
    """Public tests: programs printing 4 pass both; 'print(5)' fails the second; the rest fail both."""
    if "4" in program:
        return (True, True)
    return (True, False) if "5" in program else (False, False)


async def score_of(program: str) -> int:
    return sum(await outcomes_of(program))


async def test_code_agreement_is_on_the_chosen_programs_public_test_outcomes():
    # Four different texts, one outcome vector: they agree.
    texts = ["print(4)", "print(2 + 2)  # 4", "x = 4\nprint(x)", "print(int('4'))"]
    task = CodeTask(scorer=score_of, outcomes=outcomes_of)
    result, _ = await solve(ScriptedBackend(program_reply({0: texts})), cfg(task="code", population=4,
                                                                          early_exit=1.0), task)
    assert result.stop_reason == "consensus" and len(result.rounds) == 1
    # The same texts against tests that tell them apart do not.
    split = ["print(4)", "print(5)", "print(4)", "print(4)"]
    result, _ = await solve(ScriptedBackend(program_reply({0: split})), cfg(task="code", population=4,
                                                                          early_exit=0.8), task)
    assert result.stop_reason == "complete"
    result, _ = await solve(ScriptedBackend(program_reply({0: split})), cfg(task="code", population=4,
                                                                          early_exit=0.75), task)
    assert result.stop_reason == "consensus" and result.consensus is not None
    assert result.consensus["agreement"] == 0.75


async def test_code_agreement_counts_the_chosen_programs_vector_not_the_commonest():
    population = [Candidate(round=0, index=i, answer=a) for i, a in enumerate(["print(5)", "print(5)", "print(4)"])]
    assert await outcome_agreement(population, 2, outcomes_of) == pytest.approx(1 / 3)
    assert await outcome_agreement(population, None, outcomes_of) == 0.0


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"early_exit": 0}, "early_exit", "(0, 1]"),
    ({"early_exit": 1.5}, "early_exit", "(0, 1]"),
    ({"early_exit": True}, "early_exit", "(0, 1]"),
    ({"min_rounds": 1}, "min_rounds", "set early_exit as well"),
    ({"early_exit": 0.9, "min_rounds": 3}, "min_rounds", "exceeds rounds"),
    ({"early_exit": 0.9, "min_rounds": -1}, "min_rounds", "at least 0"),
    ({"early_exit": 0.9, "rounds": 0}, "early_exit", "nothing to stop early"),
])
def test_bad_early_exit_settings_name_the_field(changes, field, message):
    with pytest.raises(ConfigError) as caught:
        cfg(**changes)
    assert caught.value.field == field and message in str(caught.value)


def test_server_field_rsa_early_exit():
    backend = ScriptedBackend(scripted({0: ["2"]}))
    settings = ServerSettings(backend=backend, config=cfg(preset="small", early_exit=0.9), model_name="m")
    body = {"model": "m", "messages": [{"role": "user", "content": "What is 1+1?"}], "return_rsa_metadata": True}
    with serve_app(create_app(settings)) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json={**body, "rsa": {"early_exit": 0.9}}, timeout=30)
        assert reply.status_code == 200, reply.text
        meta = reply.json()["rsa_metadata"]
        assert meta["stop_reason"] == "consensus" and meta["consensus"]["round"] == 0
        assert meta["config"]["early_exit"] == 0.9 and len(meta["rounds"]) == 1
        full = httpx.post(f"{url}/v1/chat/completions", json={**body, "rsa": {"early_exit": None}}, timeout=30)
        assert len(full.json()["rsa_metadata"]["rounds"]) == 3
        one_stage = httpx.post(f"{url}/v1/chat/completions", json={**body, "rsa": {"rounds": 0}}, timeout=30)
        assert one_stage.status_code == 200 and one_stage.json()["rsa_metadata"]["config"]["early_exit"] is None
        bad = httpx.post(f"{url}/v1/chat/completions", json={**body, "rsa": {"early_exit": 2}}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rsa.early_exit"
        assert "(0, 1]" in bad.json()["error"]["message"]


def test_rsa_solve_flag_shows_the_exit_in_its_table():
    import os
    import subprocess
    import sys

    from tests.servers import FaultServer

    server = FaultServer(reply=lambda body: "Adding. \\boxed{2}")
    with serve_app(server.app()) as url:
        out = subprocess.run([sys.executable, "-m", "markov_rsa", "solve", "What is 1+1?", "--base-url", f"{url}/v1",
                              "--model", "m", "--population", "4", "--k", "2", "--rounds", "2", "--budget", "64",
                              "--tail", "16", "--early-exit", "0.9", "--seed", "1"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    assert "0 (consensus)" in out.stderr and "stopped early: consensus, 100% agree at round 0" in out.stderr
    assert "4 generations" in out.stderr
