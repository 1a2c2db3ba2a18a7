"""Fixtures that serve the real CPU vLLM: see tests/support/vllm/vllm_fixtures.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support" / "vllm"))

from vllm_fixtures import (
    smollm2_server,
    tiny_random_server,
    vllm_installed,
)

__all__ = ["smollm2_server", "tiny_random_server", "vllm_installed"]
