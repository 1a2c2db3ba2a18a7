"""The real CPU vLLM (`make vllm`), from tests/support/vllm."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support" / "vllm"))

from collections.abc import Iterator

import pytest
from vllm_fixtures import smollm2_adapter_server, vllm_installed
from vllm_server import VLLMServer

__all__ = ["smollm2_adapter_server", "smollm2_server", "vllm_installed"]


@pytest.fixture(scope="session")
def smollm2_server(smollm2_adapter_server: VLLMServer) -> Iterator[VLLMServer]:
    """The one vLLM of these tests: SmolLM2 with LoRA on and the tests' adapter
    (vllm_fixtures), as a platform with adapters runs it; the base model's
    answers are the same as without LoRA."""
    yield smollm2_adapter_server
