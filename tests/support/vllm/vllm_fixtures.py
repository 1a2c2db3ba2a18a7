"""pytest fixtures that serve the real CPU vLLM (session scope).

Use them from a conftest.py with this folder on sys.path (see tests/vllm/conftest.py):

    from vllm_fixtures import smollm2_server, vllm_installed  # noqa: F401

- `vllm_installed`: skips with the reason when `make vllm` has not run; under CI
  (CI set) or with CITADEL_VLLM_INSTALL=1 it installs instead, so that CI never
  skips silently.
- `smollm2_server`: SmolLM2-135M-Instruct served as "smollm2" (real answers).
- `tiny_random_server`: random weights served as "tiny-random" (fast, nonsense).
- `smollm2_adapter_server`: SmolLM2 as "smollm2" with LoRA on, serving the tests'
  adapter (`vllm_server.ensure_adapter`) as "smollm2-lora".

Each server is started once per session on a free loopback port and stopped at the
end; its log is in pytest's temporary folder (printed on start-up failure).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest
from vllm_server import (
    ADAPTER_RANK,
    SMOLLM2,
    TINY_RANDOM,
    VLLMServer,
    ensure_adapter,
    ensure_installed,
    free_port,
    missing_reason,
    model_path,
    run_vllm,
)

from citadel.operator.builders.deployment import lora_args
from citadel.operator.model import LLMModel

SMOLLM2_SERVED = "smollm2"
SMOLLM2_ADAPTER_SERVED = "smollm2-lora"


def adapter_args(name: str, base_served: str) -> list[str]:
    """vLLM's flags serving the test adapter as `name` on `base_served`: the
    operator's own (its Deployment builder's `lora_args`), so that these tests
    load on the real vLLM what the operator would write."""
    model = LLMModel.from_body(
        {
            "apiVersion": "citadel.ai/v1alpha1",
            "kind": "LLMModel",
            "metadata": {"name": "tests", "namespace": "tests"},
            "spec": {
                "model": base_served,
                "servedName": base_served,
                "adapters": [{"name": name, "source": str(ensure_adapter())}],
                "engine": {"maxLoraRank": ADAPTER_RANK},
            },
        }
    )
    return lora_args(model)


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
    name: str,
    served: str,
    tmp_path_factory: pytest.TempPathFactory,
    extra_args: Sequence[str] = (),
) -> Iterator[VLLMServer]:
    log = tmp_path_factory.mktemp("vllm") / f"{name}.log"
    with run_vllm(
        model_path(name),
        port=free_port(),
        served_names=[served],
        extra_args=extra_args,
        log_path=log,
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


@pytest.fixture(scope="session")
def smollm2_adapter_server(
    vllm_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    args = adapter_args(SMOLLM2_ADAPTER_SERVED, SMOLLM2_SERVED)
    yield from serve(SMOLLM2, SMOLLM2_SERVED, tmp_path_factory, args)
