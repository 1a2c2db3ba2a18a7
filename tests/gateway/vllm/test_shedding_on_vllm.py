"""Load shedding on the real CPU vLLM: the gateway judges the replica full by
vLLM's own `/metrics` (its KV-cache use while a request runs, nothing once it
is done), refuses sheddable requests meanwhile and serves standard ones.

The threshold is set low enough that one running request fills the replica:
what is tested is that vLLM's figure is read, rises under load and falls after
it, and what the gateway does with it, not the default thresholds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

QUESTION: Any = [{"role": "user", "content": "Tell me a long story."}]
SHEDDABLE = {"x-citadel-priority": "sheddable"}
# Long enough for several scrapes (0.5 s apart) while it runs: SmolLM2 makes
# some tens of tokens a second on two cores.
LONG = {"max_tokens": 300, "extra_body": {"ignore_eos": True}}


def _shed(client: openai.OpenAI) -> bool:
    """Sends a one-token sheddable request: True if it was refused for load."""
    try:
        client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=1, extra_headers=SHEDDABLE
        )
    except openai.InternalServerError as err:
        assert err.status_code == 503
        assert err.code == "model_overloaded", err
        assert err.response.headers["retry-after"] == "1"
        return True
    return False


def test_sheddable_requests_are_refused_while_vllm_is_full(
    tmp_path: Path, smollm2_server: VLLMServer, start_gateway: Any, helpers: Any
) -> None:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "batch", "--models", "smollm2")
    route = helpers.route("smollm2", [], endpoints=[smollm2_server.base_url])
    gateway = start_gateway([route], keys, shed_kv_cache_usage="0.0001")
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=120
    )
    with client, ThreadPoolExecutor(1) as pool:
        # Idle (and not yet watched): answered; its replica is read from now on.
        assert not _shed(client)
        running = pool.submit(
            client.chat.completions.create,
            model="smollm2",
            messages=QUESTION,
            **LONG,  # type: ignore[arg-type]
        )
        shed = False
        while not running.done() and not shed:
            shed = _shed(client)
            time.sleep(0.1)
        assert shed, "no sheddable request was refused while vLLM was busy"
        assert smollm2_server.metric("vllm:kv_cache_usage_perc") > 0.0001
        # A standard request is served meanwhile: it waits its turn.
        standard = client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=1
        )
        assert standard.choices[0].message.content is not None
        answer = running.result(timeout=180)
        assert answer.usage is not None and answer.usage.completion_tokens == 300
        # Once vLLM is idle (its next scrape), sheddable requests are served.
        deadline = time.monotonic() + 10
        while _shed(client):
            assert time.monotonic() < deadline, "still shed once vLLM was idle"
            time.sleep(0.2)
    refused = helpers.counted(
        gateway.url, "citadel_gateway_shed_total", model="smollm2", key="batch"
    )
    assert refused >= 1
