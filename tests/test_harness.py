"""The test harness's own promises: a llama.cpp server that dies says why, and the binary is portable.

A server that crashes (a CPU-specific kernel, a bad model file) must fail the test with its last
stderr lines, not only an exit code, so the cause is in the CI log.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import llama_server, llama_server_binary


def test_a_llama_server_that_dies_fails_with_its_stderr(tmp_path: Path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing behind it
    with pytest.raises(RuntimeError) as caught, llama_server(str(broken)):
        pass
    message = str(caught.value)
    assert "server exited with" in message and "last stderr lines" in message
    assert "gguf" in message.lower() or "model" in message.lower()


def test_the_llama_server_binary_is_built_without_native_cpu_flags():
    flags = (Path(llama_server_binary()).parent / "flags.txt").read_text().split()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_NATIVE=ON" not in flags
