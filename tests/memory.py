"""Peak memory of one Markovian RSA run, measured in a fresh process after the model is loaded.

Loading weights peaks far above anything a run does, so the high-water mark is reset (Linux
``/proc/self/clear_refs``) after loading and a warm-up generation: what is left is the run's own peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, re, sys
    from markov_rsa import GenerationRequest, MarkovianRSA, RSAConfig
    from markov_rsa.backends.transformers import TransformersBackend

    def high_water_kib():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    backend = TransformersBackend(sys.argv[1], device="cpu")
    cfg = RSAConfig.from_dict(json.loads(sys.argv[2]))
    warm = GenerationRequest(({"role": "user", "content": "Hi"},), 4)
    asyncio.run(backend.generate(warm))
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    after_load = high_water_kib()
    result = asyncio.run(MarkovianRSA(backend, cfg).solve("Explain why the sky is blue, in detail."))
    context = max(c.usage.prompt_tokens // max(c.usage.requests, 1) + c.usage.completion_tokens // max(c.chunks, 1)
                  for r in result.rounds for c in r.candidates)
    print(json.dumps({"peak_kib": high_water_kib(), "after_load_kib": after_load, "context": context}))
    """
)


def run_peak(model_dir: Path, config: dict[str, Any]) -> dict[str, int]:
    """``peak_kib``: resident high-water mark of the run; ``context``: its longest sequence in tokens."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), json.dumps(config)],
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
