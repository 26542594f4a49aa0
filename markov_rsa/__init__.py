"""markov-rsa: Markovian Recursive Self-Aggregation for test-time compute.

The public surface is re-exported here; everything else lives in private-by-convention modules
under ``markov_rsa.rsa`` (the engine), ``markov_rsa.backends``, ``markov_rsa.evals`` and
``markov_rsa.cli``. Importing this package never imports torch.
"""

from markov_rsa.backends.base import (
    Backend,
    BackendInfo,
    Generation,
    GenerationRequest,
    SamplingParams,
)
from markov_rsa.errors import (
    AuthenticationError,
    BackendError,
    BackendRequestError,
    BackendUnavailableError,
    ConfigError,
    MarkovRSAError,
    MissingDependencyError,
    ModelNotFoundError,
)
from markov_rsa.rsa import (
    PRESETS,
    Candidate,
    CandidateFinished,
    Event,
    MarkovianRSA,
    RoundFinished,
    RoundProgress,
    RoundRecord,
    RoundStarted,
    RSAConfig,
    RSAResult,
    RunFinished,
    RunStarted,
    Usage,
    solve,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "AuthenticationError", "Backend", "BackendError", "BackendInfo", "BackendRequestError",
    "BackendUnavailableError", "Candidate", "CandidateFinished", "ConfigError", "Event", "Generation",
    "GenerationRequest", "MarkovRSAError", "MarkovianRSA", "MissingDependencyError", "ModelNotFoundError",
    "RSAConfig", "RSAResult", "RoundFinished", "RoundProgress", "RoundRecord", "RoundStarted", "RunFinished",
    "RunStarted",
    "SamplingParams", "Usage", "__version__", "solve",
]
