"""The real CPU vLLM (`make vllm`), from tests/support/vllm."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support" / "vllm"))

from vllm_fixtures import smollm2_server, vllm_installed

__all__ = ["smollm2_server", "vllm_installed"]
