"""The Markovian RSA engine: configuration, rounds, tails, answers, events and results."""

from markov_rsa.rsa.config import PRESETS, Preset, RSAConfig
from markov_rsa.rsa.engine import MarkovianRSA, derive_seed, sample_subsets, solve
from markov_rsa.rsa.events import (
    CandidateFinished,
    Event,
    RoundFinished,
    RoundProgress,
    RoundStarted,
    RunFinished,
    RunStarted,
)
from markov_rsa.rsa.prompts import PROMPTS, PromptSet
from markov_rsa.rsa.result import Candidate, RoundRecord, RSAResult, Usage
from markov_rsa.rsa.tasks import CodeTask, GenericTask, MathTask, Task, task_for

__all__ = [
    "PRESETS", "PROMPTS", "Candidate", "CandidateFinished", "CodeTask", "Event", "GenericTask",
    "MarkovianRSA", "MathTask", "Preset", "PromptSet", "RSAConfig", "RSAResult", "RoundFinished",
    "RoundProgress", "RoundRecord", "RoundStarted", "RunFinished", "RunStarted", "Task", "Usage", "derive_seed",
    "sample_subsets", "solve", "task_for",
]
