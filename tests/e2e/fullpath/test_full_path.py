"""The full path: apply, Ready, answers through the gateway with a key; scaling,
a pod deleted under load, key revocation, restarts, and model deletion.

The tests share one platform and run in file order; the last one deletes the model.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from harness import demo
from harness.wait import wait_for
from openai import NotFoundError, OpenAI
from vllm_server import ADAPTER_RANK, ensure_adapter

from .conftest import MODEL_NS, RELEASE, SYSTEM_NS, Platform

pytestmark = pytest.mark.e2e
MODEL = demo.MODEL


def client(platform: Platform, key: str | None = None) -> OpenAI:
    return OpenAI(
        base_url=f"{platform.gateway_url()}/v1",
        api_key=key or platform.key,
        timeout=120,
        max_retries=0,
    )


def ask(openai: OpenAI, prompt: str, max_tokens: int = 8) -> str:
    reply = openai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def model_pods(platform: Platform) -> list[dict[str, Any]]:
    return model_pods_of(platform, MODEL)


def served_requests(pod_ip: str) -> float:
    """Requests a vLLM replica has finished, from its own /metrics."""
    text = httpx.get(f"http://{pod_ip}:8000/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


def test_chat_and_completion_plain_and_streaming(platform: Platform) -> None:
    openai = client(platform)
    assert "Paris" in ask(openai, "What is the capital of France?", 30)
    completion = openai.completions.create(
        model="chat-default", prompt="The capital of France is", max_tokens=5
    )
    assert completion.choices[0].text.strip()
    chunks = list(
        openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count from one to five."}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len(chunks) > 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_responses_plain_and_streaming(platform: Platform) -> None:
    """The Responses API (the openai client's default) through the chart's
    gateway to the model's vLLM pod, as a user's client calls it."""
    openai = client(platform)
    reply = openai.responses.create(
        model=MODEL,
        input="What is the capital of France?",
        max_output_tokens=30,
        temperature=0,
    )
    assert "Paris" in reply.output_text
    assert reply.usage is not None and reply.usage.output_tokens > 0
    with openai.responses.stream(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input=[{"role": "user", "content": "Count from one to five."}],
        max_output_tokens=20,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds
    assert kinds[-1] == "response.completed"
    assert final.output_text and final.usage is not None


ADAPTED = "smollm2-adapted"
ADAPTER = "smollm2-sql"


def second_model(name: str, **spec: Any) -> dict[str, Any]:
    """SmolLM2 as `name` on hx-llm-server-02, on the pod runtime like the
    demo's model; `spec` adds to (or replaces) its spec's fields."""
    base: dict[str, Any] = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "resources": {"gpus": 1},
        "placement": {"nodeName": "hx-llm-server-02"},
        "engine": {"maxModelLen": 2048},
        "pod": {"annotations": {"citadel.ai/runtime": "local"}},
    }
    return {
        "apiVersion": "citadel.ai/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": name, "namespace": MODEL_NS},
        "spec": {**base, **spec},
    }


def adapted_model(source: str) -> dict[str, Any]:
    """SmolLM2 with one LoRA adapter."""
    return second_model(
        ADAPTED,
        engine={"maxModelLen": 2048, "maxLoraRank": ADAPTER_RANK},
        adapters=[{"name": ADAPTER, "source": source}],
    )


def test_adapter_answers_through_the_gateway(platform: Platform) -> None:
    """A model with a LoRA adapter: the operator starts vLLM with it, the routes
    name it, and a request for it goes through the gateway to the model's replica
    as it is, where vLLM applies it: its answer is not the base model's."""
    # The pod runtime's programs see this machine's files: an absolute path is
    # a path in the container, as spec.adapters allows.
    manifest = adapted_model(str(ensure_adapter()))
    platform.cluster.kubectl("apply", "-f", "-", input_text=json.dumps(manifest))
    try:

        def ready() -> bool:
            out = platform.cluster.kubectl(
                "get", "llmmodel", ADAPTED, "-n", MODEL_NS, "-o", "json"
            )
            return bool(json.loads(out).get("status", {}).get("phase") == "Ready")

        wait_for(f"{ADAPTED} Ready", ready, timeout=300, interval=2)
        openai = client(platform)
        listed = {m.id for m in openai.models.list()}
        assert {ADAPTED, ADAPTER} <= listed

        def answer(model: str) -> Any:
            return openai.chat.completions.create(
                model=model,
                messages=[
                    {"role": "user", "content": "What is the capital of France?"}
                ],
                max_tokens=12,
                temperature=0,
            )

        base, adapted = wait_for(
            f"{ADAPTER} answering through the gateway",
            lambda: _answers_or_none(answer),
            timeout=60,
            interval=1,
        )
        assert adapted.model == ADAPTER
        assert adapted.usage is not None and adapted.usage.completion_tokens > 0
        assert adapted.choices[0].message.content != base.choices[0].message.content
    finally:
        platform.cluster.kubectl(
            "delete", "llmmodel", ADAPTED, "-n", MODEL_NS, "--wait=true", check=False
        )


def _answers_or_none(answer: Any) -> tuple[Any, Any] | None:
    """(the base model's answer, the adapter's), or None while the gateway has
    not yet learned the new model's route (a 404 for its names)."""
    try:
        return answer(ADAPTED), answer(ADAPTER)
    except NotFoundError:
        return None


IDLE = "smollm2-idle"


def idle_model() -> dict[str, Any]:
    """SmolLM2 sized by the operator's autoscaler, down to zero when idle; made
    at zero, so its first request is the one that wakes it."""
    return second_model(
        IDLE,
        replicas=0,
        autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 5},
    )


def model_state(platform: Platform, name: str) -> dict[str, Any]:
    out = platform.cluster.kubectl(
        "get", "llmmodel", name, "-n", MODEL_NS, "-o", "json"
    )
    state: dict[str, Any] = json.loads(out)
    return state


def wait_routed(openai: OpenAI, name: str) -> None:
    """Until the gateway knows the model (at zero: listed, not ready), once the
    operator published its route."""

    def routed() -> bool:
        try:
            openai.models.retrieve(name)
        except NotFoundError:
            return False
        return True

    wait_for(f"{name}'s route in the gateway", routed, timeout=60, interval=1)


def events_of(platform: Platform, name: str, reason: str) -> list[str]:
    """The messages of the model `name`'s Events of `reason`, oldest first."""
    out = platform.cluster.kubectl(
        "get",
        "events",
        "-n",
        MODEL_NS,
        "--field-selector",
        f"involvedObject.name={name},reason={reason}",
        "--sort-by=.metadata.creationTimestamp",
        "-o",
        "json",
    )
    return [e["message"] for e in json.loads(out)["items"]]


def test_a_model_at_zero_wakes_on_a_request_and_sleeps_when_idle(
    platform: Platform,
) -> None:
    """The autoscaler with the chart's wiring: a request for a model at zero is
    held by the gateway, counted as waiting, read by the operator from the
    gateway pods, which scales the model to one; the request is answered once
    vLLM is ready; with no requests for scaleDownDelaySeconds, back to zero."""
    platform.cluster.kubectl("apply", "-f", "-", input_text=json.dumps(idle_model()))
    try:
        openai = OpenAI(
            base_url=f"{platform.gateway_url()}/v1",
            api_key=platform.key,
            timeout=600,
            max_retries=0,
        )

        wait_routed(openai, IDLE)
        conditions = {
            c["type"]: c for c in model_state(platform, IDLE)["status"]["conditions"]
        }
        assert conditions["Ready"]["reason"] == "ScaledToZero"
        assert not model_pods_of(platform, IDLE)
        started = time.monotonic()
        reply = openai.chat.completions.create(
            model=IDLE,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
        )
        woke_s = time.monotonic() - started
        print(f"{IDLE} answered from zero in {woke_s:.1f} s")
        assert "Paris" in (reply.choices[0].message.content or "")
        assert model_state(platform, IDLE)["spec"]["replicas"] == 1
        assert any("from 0 to 1" in m for m in events_of(platform, IDLE, "Autoscaled"))

        def asleep() -> bool:
            state = model_state(platform, IDLE)
            return bool(
                state["spec"]["replicas"] == 0 and not model_pods_of(platform, IDLE)
            )

        # 5 s of no requests, the operator's ticks, and the pod's graceful stop.
        wait_for(f"{IDLE} back to zero", asleep, timeout=180, interval=2)
        assert any("from 1 to 0" in m for m in events_of(platform, IDLE, "Autoscaled"))
    finally:
        platform.cluster.kubectl(
            "delete", "llmmodel", IDLE, "-n", MODEL_NS, "--wait=true", check=False
        )


CONTESTED = "smollm2-contested"


def test_a_model_an_hpa_sizes_too_is_left_to_it(platform: Platform) -> None:
    """An HPA pointed at a model with spec.autoscaling: the chart's operator
    lists it (its grant), leaves the model to it, and says so in an Event."""
    model = second_model(
        CONTESTED,
        replicas=0,
        autoscaling={"minReplicas": 0, "maxReplicas": 2},
    )
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"{CONTESTED}-hpa", "namespace": MODEL_NS},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "citadel.ai/v1alpha1",
                "kind": "LLMModel",
                "name": CONTESTED,
            },
            "minReplicas": 1,
            "maxReplicas": 2,
        },
    }
    kubectl = platform.cluster.kubectl
    kubectl("apply", "-f", "-", input_text=json.dumps(hpa))
    kubectl("apply", "-f", "-", input_text=json.dumps(model))
    try:
        [message] = wait_for(
            "the AutoscalingConflict Event",
            lambda: events_of(platform, CONTESTED, "AutoscalingConflict"),
            timeout=60,
            interval=1,
        )
        assert f"HorizontalPodAutoscaler {CONTESTED}-hpa also sizes" in message
    finally:
        kubectl("delete", "hpa", f"{CONTESTED}-hpa", "-n", MODEL_NS, check=False)
        kubectl(
            "delete", "llmmodel", CONTESTED, "-n", MODEL_NS, "--wait=true", check=False
        )


FALLING = "smollm2-falling"
UNMADE = "smollm2-unmade"


def falling_model() -> dict[str, Any]:
    """SmolLM2 at zero, woken on demand, with the demo's model as its fallback:
    its requests are answered by the fallback while it wakes. Its second
    fallback names no model (never reached: the first answers)."""
    return second_model(
        FALLING,
        replicas=0,
        autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleDownDelaySeconds": 60},
        routing={"fallbacks": [MODEL, UNMADE]},
    )


def test_a_model_at_zero_with_a_fallback_is_answered_by_it_while_it_wakes(
    platform: Platform,
) -> None:
    """spec.routing.fallbacks through the chart's operator and gateway: a
    request for a model at zero is not held but answered by its fallback (the
    demo's model), which the answer's header and model say; the request still
    wakes the model, which then answers for itself. A fallback that names no
    model gets a Warning Event on the model."""
    platform.cluster.kubectl("apply", "-f", "-", input_text=json.dumps(falling_model()))
    try:
        openai = client(platform)

        wait_routed(openai, FALLING)
        assert not model_pods_of(platform, FALLING)
        # The fallback that names no model shows where the model's owner looks.
        [told] = wait_for(
            "the UnknownFallback Event",
            lambda: events_of(platform, FALLING, "UnknownFallback"),
            timeout=30,
            interval=1,
        )
        assert told.startswith(f"spec.routing.fallbacks: '{UNMADE}' names no model")

        def chat() -> Any:
            return openai.chat.completions.with_raw_response.create(
                model=FALLING,
                messages=[
                    {"role": "user", "content": "What is the capital of France?"}
                ],
                max_tokens=8,
                temperature=0,
            )

        started = time.monotonic()
        raw = chat()
        print(
            f"{FALLING} answered by its fallback in {time.monotonic() - started:.1f} s"
        )
        assert raw.headers.get("x-citadel-fallback") == MODEL
        reply = raw.parse()
        assert reply.model == MODEL
        assert "Paris" in (reply.choices[0].message.content or "")

        def woken() -> bool:
            return bool(model_state(platform, FALLING)["spec"]["replicas"] == 1)

        # The request counted as waiting for the autoscaler's next ticks.
        wait_for(f"{FALLING} woken by the request", woken, timeout=60, interval=1)

        def answers_itself() -> bool:
            raw = chat()
            return raw.headers.get("x-citadel-fallback") is None

        wait_for(f"{FALLING} answering itself", answers_itself, timeout=300, interval=3)
        assert chat().parse().model == FALLING
    finally:
        platform.cluster.kubectl(
            "delete", "llmmodel", FALLING, "-n", MODEL_NS, "--wait=true", check=False
        )


CANARY = "smollm2-canary"


def split_of(platform: Platform, weight: int | None) -> None:
    """Sets the demo model's spec.routing.split to `weight` percent for the
    canary (None: no split)."""
    split = [{"model": CANARY, "weight": weight}] if weight is not None else None
    routing_of(platform, split=split)


def routing_of(platform: Platform, **fields: object) -> None:
    """Sets fields of the demo model's spec.routing (None: unset) with a merge
    patch."""
    patch = {"spec": {"routing": fields}}
    platform.cluster.kubectl(
        "patch",
        "llmmodel",
        MODEL,
        "-n",
        MODEL_NS,
        "--type=merge",
        "-p",
        json.dumps(patch),
    )


def test_a_split_sends_a_share_of_a_models_requests_to_another(
    platform: Platform,
) -> None:
    """spec.routing.split through the chart's operator and gateway: half of the
    demo model's requests go to a second model (a canary), which the answer's
    header and model say, a conversation (its session header) stays on one of
    them, and without the split every request is the demo model's again."""
    platform.cluster.kubectl(
        "apply", "-f", "-", input_text=json.dumps(second_model(CANARY))
    )
    try:
        openai = client(platform)
        wait_for(
            f"{CANARY} Ready",
            lambda: (
                model_state(platform, CANARY).get("status", {}).get("phase") == "Ready"
            ),
            timeout=300,
            interval=2,
        )
        split_of(platform, 50)

        def chat(session: str | None = None) -> Any:
            headers = {"x-session-id": session} if session else None
            return openai.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=2,
                temperature=0,
                extra_headers=headers,
            )

        def split_once() -> bool:
            return chat().headers.get("x-citadel-split") == CANARY

        wait_for("the split in the gateway", split_once, timeout=60, interval=0.5)
        answered: dict[str, int] = {MODEL: 0, CANARY: 0}
        for _ in range(30):
            raw = chat()
            model = raw.parse().model
            answered[model] += 1
            assert (raw.headers.get("x-citadel-split") == CANARY) == (model == CANARY)
        print(f"30 requests for {MODEL} at a split of 50: {answered}")
        # Both, by chance: each misses with a chance of 2 in a billion.
        assert answered[MODEL] and answered[CANARY]
        for session in ("conversation-1", "conversation-2", "conversation-3"):
            models = {chat(session).parse().model for _ in range(4)}
            assert len(models) == 1, f"{session} answered by {models}"
        split_of(platform, None)

        def whole_again() -> bool:
            return all(chat().headers.get("x-citadel-split") is None for _ in range(16))

        wait_for(f"{MODEL} whole again", whole_again, timeout=60, interval=0.5)
    finally:
        split_of(platform, None)
        platform.cluster.kubectl(
            "delete", "llmmodel", CANARY, "-n", MODEL_NS, "--wait=true", check=False
        )


def model_pods_of(platform: Platform, name: str) -> list[dict[str, Any]]:
    """The live pods of the model `name`."""
    out = platform.cluster.kubectl(
        "get",
        "pods",
        "-n",
        MODEL_NS,
        "-l",
        f"app.kubernetes.io/instance={name}",
        "-o",
        "json",
    )
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def test_scaled_to_two_replicas_both_receive_traffic(platform: Platform) -> None:
    platform.cluster.kubectl("scale", "llmmodel", MODEL, "-n", MODEL_NS, "--replicas=2")
    demo.watch_until_ready(platform.cluster, 600, MODEL_NS, replicas=2)
    ips = wait_for(
        "two running replicas",
        lambda: (
            [p["status"]["podIP"] for p in model_pods(platform)]
            if len(model_pods(platform)) == 2
            else None
        ),
    )
    before = {ip: served_requests(ip) for ip in ips}
    openai = client(platform)
    # Distinct prompts: prefix-aware routing spreads unrelated conversations.
    for _ in range(12):
        ask(openai, f"Say the word {uuid.uuid4().hex[:8]}.")
    after = {ip: served_requests(ip) for ip in ips}
    assert all(after[ip] > before[ip] for ip in ips), (before, after)


def say_hi(platform: Platform, key: str) -> httpx.Response:
    """A raw chat request with `key`, for the status code the gateway gives."""
    return httpx.post(
        f"{platform.gateway_url()}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )


def test_deleting_a_pod_under_load_fails_no_request(platform: Platform) -> None:
    pods = model_pods(platform)
    assert len(pods) == 2
    openai = client(platform)

    def one(i: int) -> str:
        return ask(openai, f"Reply with the number {i}.")

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(one, i) for i in range(40)]
        time.sleep(2)
        platform.cluster.kubectl(
            "delete",
            "pod",
            pods[0]["metadata"]["name"],
            "-n",
            MODEL_NS,
            "--wait=false",
        )
        results = [f.result() for f in futures]
    assert len(results) == 40


def test_revoked_key_is_refused_within_seconds(platform: Platform) -> None:
    key = demo.create_key(platform.cluster, SYSTEM_NS, "fullpath-revoke")
    openai = client(platform, key)
    wait_for("the new key to work", lambda: ask(openai, "Hi"), timeout=30)
    subprocess.run(
        [
            str(demo.REPO / ".venv/bin/citadel"),
            "keys",
            f"--kubeconfig={platform.cluster.kubeconfig}",
            f"--namespace={SYSTEM_NS}",
            "revoke",
            "fullpath-revoke",
        ],
        check=True,
        capture_output=True,
    )

    def refused() -> bool:
        return say_hi(platform, key).status_code == 401

    wait_for("the revoked key to get 401", refused, timeout=30)


def test_a_sheddable_key_made_by_the_cli_is_served_as_one(platform: Platform) -> None:
    """`citadel keys create --priority sheddable` writes the priority into the
    key's Secret, and the chart's gateway reads it from there: GraphQL's
    `usage` tells it, and an idle model answers the key (nothing is shed
    without load). Shedding under load is tested on the real vLLM beside the
    gateway (tests/gateway/vllm/test_shedding_on_vllm.py)."""
    key = demo.create_key(
        platform.cluster, SYSTEM_NS, "fullpath-batch", "--priority", "sheddable"
    )
    openai = client(platform, key)
    wait_for("the new key to work", lambda: ask(openai, "Hi"), timeout=30)
    answer = httpx.post(
        f"{platform.gateway_url()}/graphql",
        headers={"Authorization": f"Bearer {key}"},
        json={"query": "{ usage { key priority } }"},
        timeout=30,
    )
    assert answer.json()["data"]["usage"] == {
        "key": "fullpath-batch",
        "priority": "sheddable",
    }
    # A header that names no priority is refused through the whole path.
    refused = httpx.post(
        f"{platform.gateway_url()}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "x-citadel-priority": "urgent"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    assert refused.status_code == 400, refused.text
    assert "x-citadel-priority" in refused.json()["error"]["message"]


def gateway_counted(platform: Platform, name: str) -> float:
    """The sum of the samples of `name` the gateway pod serves on its metrics
    port (the chart's gateway.metricsPort, 9090)."""
    host = httpx.URL(platform.gateway_url()).host
    text = httpx.get(f"http://{host}:9090/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{")
    )


def bound_of(platform: Platform, bound: int | None) -> None:
    """Sets the demo model's spec.routing.maxRequestsPerReplica (None: none)."""
    routing_of(platform, maxRequestsPerReplica=bound)


def test_requests_past_the_replicas_bound_wait_at_the_gateway(
    platform: Platform,
) -> None:
    """spec.routing.maxRequestsPerReplica through the chart's operator and
    gateway: with a bound of 1 on each of the demo model's replicas, two
    requests more than it has replicas, sent at once, are all answered, and
    those that found every replica busy waited at the gateway (its
    queue_wait_seconds count); without the bound none waits again."""
    at_once = len(model_pods(platform)) + 2
    waited = "citadel_gateway_queue_wait_seconds_count"

    def all_at_once() -> list[str]:
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            return list(
                pool.map(
                    lambda i: ask(client(platform), f"Count to {i}.", max_tokens=24),
                    range(at_once),
                )
            )

    bound_of(platform, 1)
    try:
        before = gateway_counted(platform, waited)

        def queued_some() -> bool:
            all_at_once()
            return gateway_counted(platform, waited) > before

        wait_for("requests queued at the gateway", queued_some, timeout=120)
        bound_of(platform, None)

        def none_queued() -> bool:
            seen = gateway_counted(platform, waited)
            all_at_once()
            return gateway_counted(platform, waited) == seen

        wait_for("no request queued without the bound", none_queued, timeout=120)
    finally:
        bound_of(platform, None)


def owned_objects(platform: Platform) -> dict[str, int]:
    counts = {}
    for kind in ("deployments", "services", "replicasets"):
        out = platform.cluster.kubectl(
            "get",
            kind,
            "-n",
            MODEL_NS,
            "-l",
            f"app.kubernetes.io/instance={MODEL}",
            "-o",
            "name",
        )
        counts[kind] = len(out.split())
    return counts


def test_operator_and_gateway_restart_under_load_converge(platform: Platform) -> None:
    before = owned_objects(platform)
    openai = client(platform)
    errors: list[str] = []

    def load() -> None:
        for i in range(20):
            try:
                ask(client(platform), f"Number {i}?")
            except Exception as err:
                errors.append(str(err))

    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(load)
        for component in ("operator", "gateway"):
            platform.cluster.kubectl(
                "delete",
                "pod",
                "-n",
                SYSTEM_NS,
                "-l",
                f"app.kubernetes.io/instance={RELEASE},"
                f"app.kubernetes.io/component={component}",
                "--wait=false",
            )
        running.result()
    platform.cluster.kubectl(
        "rollout",
        "status",
        "deployment",
        "-n",
        SYSTEM_NS,
        "--timeout=180s",
        "-l",
        f"app.kubernetes.io/instance={RELEASE}",
        timeout=200,
    )
    # Converged: the model still answers through the new gateway, and nothing
    # was made twice by the new operator.
    openai = wait_for(
        "the new gateway to answer",
        lambda: client(platform) if _answers(client(platform)) else None,
        timeout=120,
    )
    assert "Paris" in ask(openai, "What is the capital of France?", 30)
    assert owned_objects(platform) == before
    # The new operator works: it may first pause for up to a minute in favour of
    # the old pod's peering record, then it must act on a change.
    platform.cluster.kubectl("scale", "llmmodel", MODEL, "-n", MODEL_NS, "--replicas=1")
    wait_for(
        "the new operator to scale the Deployment",
        lambda: platform.cluster.kubectl(
            "get", "deployment", MODEL, "-n", MODEL_NS,
            "-o", "jsonpath={.spec.replicas}",
        ).strip()
        == "1",
        timeout=150,
    )  # fmt: skip
    routes = json.loads(
        platform.cluster.kubectl(
            "get",
            "configmap",
            "citadel-routes",
            "-n",
            SYSTEM_NS,
            "-o",
            "jsonpath={.data.routes\\.json}",
        )
    )
    assert [m["name"] for m in routes["models"]] == [MODEL]
    print(f"requests that failed while the gateway restarted: {len(errors)}")


def _answers(openai: OpenAI) -> bool:
    try:
        ask(openai, "Hi")
    except Exception:
        return False
    return True


def test_deleted_model_is_not_found_within_seconds(platform: Platform) -> None:
    platform.cluster.kubectl("delete", "llmmodel", MODEL, "-n", MODEL_NS)

    def not_found() -> bool:
        response = say_hi(platform, platform.key)
        body = response.json()
        return response.status_code == 404 and (
            body["error"]["code"] == "model_not_found"
        )

    wait_for("model_not_found", not_found, timeout=30)
