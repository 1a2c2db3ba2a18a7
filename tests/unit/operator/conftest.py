"""Fixtures for the operator's unit tests (sample objects: samples.py)."""

from __future__ import annotations

import pytest

from citadel.operator.settings import OperatorSettings


@pytest.fixture
def settings() -> OperatorSettings:
    """Settings as the tests expect them, whatever the environment says."""
    return OperatorSettings(
        watch_namespaces=(),
        gateway_namespace="citadel-system",
        default_vllm_image="vllm/vllm-openai:v0.33.0",
        route_publish_delay=0,
        route_publish_interval=0,
    )
