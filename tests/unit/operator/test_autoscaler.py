"""The autoscaler's loop: gateways read, scale written, Events posted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from citadel.operator.autoscaler import HPA_RECHECK_S, Autoscaler, hpa_sizers
from citadel.operator.gateways import Demand, Reading
from citadel.operator.kube.client import ApiError
from citadel.operator.kube.fake import FakeKube
from citadel.operator.kube.resources import HPAS, LLMMODELS
from citadel.operator.metrics import Metrics
from citadel.operator.settings import OperatorSettings
from citadel.operator.view import ApiView

from .samples import model_body

pytestmark = pytest.mark.unit
SCALING = {"minReplicas": 0, "maxReplicas": 4, "scaleDownDelaySeconds": 10}


class FakeGateways:
    """Answers each read with the next reading given."""

    def __init__(self) -> None:
        self.reading = Reading()
        self.reads = 0
        self.closed = False

    async def read(self) -> Reading:
        self.reads += 1
        return self.reading

    async def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reading(
    answered: int = 1, failures: tuple[str, ...] = (), **demand: Any
) -> Reading:
    """Demand by model name in namespace `llm`: (in_flight, waiting)."""
    return Reading(
        demand={("llm", name): Demand(*value) for name, value in demand.items()},
        answered=answered,
        failures=list(failures),
    )


class Harness:
    def __init__(self, *bodies: dict[str, Any], window_s: float = 0) -> None:
        self.kube = FakeKube(bodies)
        self.gateways = FakeGateways()
        self.clock = Clock()
        self.active = True
        self.metrics = Metrics()
        settings = OperatorSettings(
            autoscale_interval_seconds=2, autoscale_window_seconds=window_s
        )
        view = ApiView(self.kube)
        self.autoscaler = Autoscaler(
            self.kube,
            settings,
            self.metrics,
            models=view.models,
            active=lambda: self.active,
            gateways=self.gateways,
            clock=self.clock,
            wall=lambda: "2026-05-01T12:00:00Z",
        )

    async def tick(self, advance: float = 2.0) -> None:
        await self.autoscaler.tick()
        self.clock.now += advance

    def replicas(self, name: str = "mixtral") -> int:
        spec = self.kube.stored(LLMMODELS, name, "llm")["spec"]
        return int(spec.get("replicas", 1))

    def events(self) -> list[tuple[str, str, str]]:
        return [
            (e["involvedObject"]["name"], e["reason"], e["message"])
            for e in self.kube.events
        ]


def assert_stopped_after_the_delay(h: Harness) -> None:
    """The model is at zero, the last Event saying it idled for SCALING's delay."""
    assert h.replicas() == 0
    assert h.events()[-1] == (
        "mixtral",
        "Autoscaled",
        "scaled from 1 to 0: no requests for 10 s",
    )


async def test_scales_up_through_the_scale_subresource_with_an_event() -> None:
    h = Harness(model_body(replicas=1, autoscaling=SCALING))
    version = h.kube.stored(LLMMODELS, "mixtral", "llm")["metadata"]["resourceVersion"]
    h.gateways.reading = reading(mixtral=(19, 2))
    await h.tick()
    [(plural, namespace, name, sub, body)] = h.kube.merged
    assert (plural, namespace, name, sub) == ("llmmodels", "llm", "mixtral", "scale")
    assert body == {"metadata": {"resourceVersion": version}, "spec": {"replicas": 3}}
    assert h.replicas() == 3
    assert h.events() == [
        (
            "mixtral",
            "Autoscaled",
            "scaled from 1 to 3: 21 requests for a target of 8 per replica",
        )
    ]
    assert h.kube.events[0]["type"] == "Normal"
    assert (
        h.metrics.registry.get_sample_value(
            "citadel_operator_autoscaler_scales_total", {"direction": "up"}
        )
        == 1
    )
    assert (
        h.metrics.registry.get_sample_value(
            "citadel_operator_autoscaler_demand",
            {"model_namespace": "llm", "model": "mixtral", "state": "waiting"},
        )
        == 2
    )


async def test_wakes_from_zero_and_stops_after_the_delay() -> None:
    h = Harness(model_body(replicas=0, autoscaling=SCALING))
    h.gateways.reading = reading(mixtral=(0, 1))
    await h.tick()
    assert h.replicas() == 1
    h.gateways.reading = reading(mixtral=(0, 0))
    for _ in range(5):  # 8 s of nothing since the scale: not yet 10
        await h.tick()
    assert h.replicas() == 1
    await h.tick()
    assert_stopped_after_the_delay(h)


async def test_a_window_holds_the_scale_down_until_its_mean_is_low() -> None:
    # The loop's own history (a deque) through the window's mean: a busy
    # minute, then nothing; the 10 s delay starts counting once the 30 s
    # window no longer holds the busy samples.
    h = Harness(model_body(replicas=0, autoscaling=SCALING), window_s=30)
    h.gateways.reading = reading(mixtral=(0, 1))
    await h.tick()
    assert h.replicas() == 1
    h.gateways.reading = reading(mixtral=(8, 0))
    for _ in range(30):
        await h.tick()
    assert h.replicas() == 1
    h.gateways.reading = reading(mixtral=(0, 0))
    # The window empties of busy samples after 30 s, then 10 s of wanting 0.
    for _ in range(19):
        await h.tick()
    assert h.replicas() == 1
    for _ in range(4):
        await h.tick()
    assert_stopped_after_the_delay(h)


async def test_at_max_replicas_an_overload_writes_and_posts_nothing() -> None:
    h = Harness(model_body(replicas=4, autoscaling=SCALING), window_s=30)
    h.gateways.reading = reading(mixtral=(100, 0))
    for _ in range(5):
        await h.tick()
    assert h.kube.merged == [] and h.events() == []
    assert h.replicas() == 4


async def test_no_scale_down_when_one_gateway_failed() -> None:
    h = Harness(model_body(replicas=2, autoscaling=SCALING))
    h.gateways.reading = reading(failures=("http://10.0.0.2:9090/metrics: x",))
    for _ in range(10):
        await h.tick()
    assert h.replicas() == 2 and h.kube.merged == []
    assert h.events() == []  # one answered: not blind
    h.gateways.reading = reading()
    await h.tick()
    assert h.replicas() == 0


async def test_blind_ticks_warn_once_per_model_until_the_gateways_answer() -> None:
    h = Harness(
        model_body("a", replicas=2, autoscaling=SCALING),
        model_body("b", replicas=1, autoscaling=SCALING),
        model_body("c", replicas=1),
    )
    h.gateways.reading = reading(answered=0, failures=("no gateway to read",))
    for _ in range(3):
        await h.tick()
    message = "no gateway could be read, replicas left as they are: no gateway to read"
    assert h.events() == [
        ("a", "AutoscalingBlind", message),
        ("b", "AutoscalingBlind", message),
    ]
    assert all(e["type"] == "Warning" for e in h.kube.events)
    assert h.kube.merged == []
    h.gateways.reading = reading(a=(16, 0), b=(8, 0))
    await h.tick()
    # Demand met (a: 2 for 16, b: 1 for 8): nothing written, nothing told.
    assert len(h.events()) == 2 and h.kube.merged == []
    h.gateways.reading = reading(answered=0, failures=("down",))
    await h.tick()
    # Answered in between: blind again, told again.
    assert [e[1] for e in h.events()[2:]] == ["AutoscalingBlind"] * 2


async def test_nothing_read_when_no_model_has_autoscaling() -> None:
    h = Harness(model_body(replicas=1))
    await h.tick()
    assert h.gateways.reads == 0
    assert h.kube.merged == [] and h.events() == []


async def test_a_model_being_deleted_is_left_alone() -> None:
    body = model_body(replicas=0, autoscaling=SCALING)
    body["metadata"]["deletionTimestamp"] = "2026-05-01T12:00:00Z"
    h = Harness(body)
    h.gateways.reading = reading(mixtral=(0, 5))
    await h.tick()
    assert h.kube.merged == [] and h.gateways.reads == 0


async def test_a_standby_replica_reads_and_writes_nothing() -> None:
    h = Harness(model_body(replicas=0, autoscaling=SCALING))
    h.active = False
    h.gateways.reading = reading(mixtral=(0, 5))
    await h.tick()
    assert h.gateways.reads == 0 and h.kube.merged == []
    h.active = True
    await h.tick()
    assert h.replicas() == 1


async def test_a_model_changed_since_it_was_read_is_not_overwritten() -> None:
    h = Harness(model_body(replicas=1, autoscaling=SCALING))

    async def stale() -> list[dict[str, Any]]:
        # The copy read is one version behind what the API server holds.
        body = h.kube.stored(LLMMODELS, "mixtral", "llm")
        return [{**body, "metadata": {**body["metadata"], "resourceVersion": "0"}}]

    h.autoscaler._models = stale
    h.gateways.reading = reading(mixtral=(30, 0))
    await h.tick()
    assert len(h.kube.merged) == 1  # sent, refused (409)
    assert h.replicas() == 1 and h.events() == []


async def test_the_loop_closes_the_gateway_reader_when_stopped() -> None:
    h = Harness()
    task = asyncio.create_task(h.autoscaler.run())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.gateways.closed


def hpa(name: str, target: str = "mixtral", **ref: str) -> dict[str, Any]:
    """An HPA in namespace `llm` sizing the LLMModel `target` (or what `ref`
    says instead)."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": "llm"},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "citadel.ai/v1alpha1",
                "kind": "LLMModel",
                "name": target,
                **ref,
            },
            "minReplicas": 1,
            "maxReplicas": 4,
        },
    }


def test_hpa_sizers_names_the_hpas_of_each_llmmodel() -> None:
    assert hpa_sizers(
        [
            hpa("b"),
            hpa("a"),
            hpa("other", "qwen"),
            hpa("any-version", "qwen", apiVersion="citadel.ai/v1"),
            hpa("a-deployment", kind="Deployment", apiVersion="apps/v1"),
            hpa("elsewhere", apiVersion="example.com/v1alpha1"),
            {"metadata": {"name": "no-spec"}},
        ]
    ) == {"mixtral": ("a", "b"), "qwen": ("any-version", "other")}


async def test_a_model_an_hpa_sizes_too_is_left_to_it_and_told_once() -> None:
    h = Harness(model_body(replicas=1, autoscaling=SCALING), hpa("team-hpa"))
    h.gateways.reading = reading(mixtral=(30, 0))
    for _ in range(3):
        await h.tick()
    assert h.kube.merged == [] and h.replicas() == 1
    assert h.events() == [
        (
            "mixtral",
            "AutoscalingConflict",
            "HorizontalPodAutoscaler team-hpa also sizes this model through its "
            "scale subresource: spec.autoscaling is not applied while it does "
            "(delete the HPA, or spec.autoscaling)",
        )
    ]
    assert h.kube.events[0]["type"] == "Warning"
    # Listed once for the three ticks (6 s), again once HPA_RECHECK_S passed.
    assert h.kube.reads.count(("list", "horizontalpodautoscalers")) == 1
    await h.kube.delete(HPAS, "team-hpa", "llm")
    await h.tick()
    assert h.replicas() == 1  # the listing still says it is there
    h.clock.now += HPA_RECHECK_S
    await h.tick()
    assert h.kube.reads.count(("list", "horizontalpodautoscalers")) == 2
    assert h.replicas() == 4


async def test_a_second_hpa_is_told_again() -> None:
    h = Harness(model_body(replicas=1, autoscaling=SCALING), hpa("one"))
    h.gateways.reading = reading(mixtral=(30, 0))
    await h.tick()
    h.kube.put(hpa("two"))
    h.clock.now += HPA_RECHECK_S
    await h.tick()
    await h.tick()
    assert [m for _, reason, m in h.events() if reason == "AutoscalingConflict"] == [
        "HorizontalPodAutoscaler one also sizes this model through its scale "
        "subresource: spec.autoscaling is not applied while it does (delete the "
        "HPA, or spec.autoscaling)",
        "HorizontalPodAutoscalers one, two also size this model through its scale "
        "subresource: spec.autoscaling is not applied while it does (delete the "
        "HPA, or spec.autoscaling)",
    ]


async def test_an_hpa_of_another_target_changes_nothing() -> None:
    h = Harness(
        model_body(replicas=1, autoscaling=SCALING),
        hpa("web", "mixtral", kind="Deployment", apiVersion="apps/v1"),
    )
    h.gateways.reading = reading(mixtral=(30, 0))
    await h.tick()
    assert h.replicas() == 4
    assert [reason for _, reason, _ in h.events()] == ["Autoscaled"]


async def test_hpas_that_cannot_be_listed_leave_the_autoscaler_as_it_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(model_body(replicas=1, autoscaling=SCALING), hpa("unseen"))
    h.kube.fail[HPAS.plural] = ApiError(403, "Forbidden", "no grant")
    h.gateways.reading = reading(mixtral=(30, 0))
    await h.tick()
    h.clock.now += HPA_RECHECK_S
    await h.tick()
    assert h.replicas() == 4
    told = [r for r in caplog.records if "HorizontalPodAutoscalers" in r.message]
    assert len(told) == 1 and "no grant" in told[0].message


async def test_a_failed_listing_of_hpas_keeps_the_last_one() -> None:
    # A 500 once the listing is due again: the HPA still sizes the model as
    # far as the autoscaler knows, so it writes nothing and tells nothing new.
    h = Harness(model_body(replicas=1, autoscaling=SCALING), hpa("team-hpa"))
    h.gateways.reading = reading(mixtral=(30, 0))
    await h.tick()
    h.clock.now += HPA_RECHECK_S
    h.kube.fail[HPAS.plural] = ApiError(500, "InternalError", "etcd timeout")
    await h.tick()
    await h.tick()  # listed again at the next tick, not HPA_RECHECK_S later
    assert h.kube.reads.count(("list", "horizontalpodautoscalers")) == 3
    del h.kube.fail[HPAS.plural]
    await h.tick()
    assert h.kube.merged == [] and h.replicas() == 1
    assert [reason for _, reason, _ in h.events()] == ["AutoscalingConflict"]
