"""A LoRA adapter through the real gateway to the simulator (bench/simulator,
which answers under whatever `model` it is sent, as vLLM does for a name it
serves), driven with the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

ADAPTER = "sql-expert"


@pytest.fixture
def setup(
    tmp_path: Path, start_gateway: Any, helpers: Any, smol_replica: str
) -> Iterator[dict[str, Any]]:
    keys = tmp_path / "keys.json"
    tenant = helpers.create_key(keys, "tenant", "--models", "sql-*")
    base = helpers.create_key(keys, "base", "--models", "smol")
    models = [
        helpers.route(
            "smol", [], aliases=["chat"], adapters=[ADAPTER], endpoints=[smol_replica]
        )
    ]
    gateway = start_gateway(models, keys)
    clients = [
        openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30
        )
        for key in (tenant, base)
    ]
    with clients[0] as as_tenant, clients[1] as as_base:
        yield {"tenant": as_tenant, "base": as_base, "gateway": gateway}


def test_an_adapter_is_called_by_its_name_and_counted_under_it(
    setup: dict[str, Any], helpers: Any
) -> None:
    tenant: openai.OpenAI = setup["tenant"]
    chat = tenant.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    # The replica answers under the name it was sent: the adapter's, as is.
    assert chat.model == ADAPTER
    assert chat.usage is not None and chat.usage.completion_tokens == 3
    stream = tenant.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        stream=True,
    )
    assert {chunk.model for chunk in stream} == {ADAPTER}
    answer = tenant.responses.create(model=ADAPTER, input="hi", max_output_tokens=2)
    assert answer.model == ADAPTER
    listed = [(m.id, getattr(m, "parent", None)) for m in tenant.models.list()]
    assert listed == [(ADAPTER, "smol")]
    with pytest.raises(openai.PermissionDeniedError):
        tenant.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
    url = setup["gateway"].url
    assert helpers.counted(url, "citadel_gateway_requests_total", model=ADAPTER) == 3
    assert helpers.counted(url, "citadel_gateway_tokens_total", model=ADAPTER) > 0


def test_the_base_model_s_key_may_not_use_the_adapter(setup: dict[str, Any]) -> None:
    base: openai.OpenAI = setup["base"]
    chat = base.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.model == "smol"  # an alias is still sent as the served name
    assert [m.id for m in base.models.list()] == ["smol", "chat"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        base.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.code == "model_not_allowed"
