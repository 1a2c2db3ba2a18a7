"""pytest fixtures that serve the real CPU vLLM (session scope).

Use them from a conftest.py with this folder on sys.path (see tests/vllm/conftest.py):

    from vllm_fixtures import smollm2_server, vllm_installed  # noqa: F401

- `vllm_installed`: skips with the reason when `make vllm` has not run; under CI
  (CI set) or with CITADEL_VLLM_INSTALL=1 it installs instead, so that CI never
  skips silently.
- `smollm2_server`: SmolLM2-135M-Instruct served as "smollm2" (real answers).
- `tiny_random_server`: random weights served as "tiny-random" (fast, nonsense).

Each server is started once per session on a free loopback port and stopped at the
end; its log is in pytest's temporary folder (printed on start-up failure).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from vllm_server import (
    SMOLLM2,
    TINY_RANDOM,
    VLLMServer,
    ensure_installed,
    free_port,
    missing_reason,
    model_path,
    run_vllm,
)

SMOLLM2_SERVED = "smollm2"


@pytest.fixture(scope="session")
def vllm_installed() -> None:
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("CI") or os.environ.get("CITADEL_VLLM_INSTALL") == "1":
        ensure_installed()
        return
    pytest.skip(reason)


def serve(
    name: str, served: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    log = tmp_path_factory.mktemp("vllm") / f"{name}.log"
    with run_vllm(
        model_path(name), port=free_port(), served_names=[served], log_path=log
    ) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_server(
    vllm_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    yield from serve(SMOLLM2, SMOLLM2_SERVED, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_random_server(
    vllm_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    yield from serve(TINY_RANDOM, TINY_RANDOM, tmp_path_factory)
