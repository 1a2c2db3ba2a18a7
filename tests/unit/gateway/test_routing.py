"""The router: health, exclusion, ejection and the decision callback."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from citadel.gateway.errors import NoReplica
from citadel.gateway.routes import (
    DocumentReading,
    ModelRoute,
    RoutingDocument,
    RoutingStrategy,
)
from citadel.gateway.services.catalog import Catalog, routing_table
from citadel.gateway.services.replicas import (
    EjectionPolicy,
    Endpoint,
    LoadReport,
    Replica,
)
from citadel.gateway.services.routing import Router
from citadel.gateway.services.strategies import RouteRequest

pytestmark = pytest.mark.unit

DOC = RoutingDocument.model_validate(
    {
        "models": [
            {
                "name": "m",
                "namespace": "llm",
                "servedName": "m",
                "service": "m",
                "strategy": "round-robin",
            }
        ]
    }
)


def setup(*endpoints: Endpoint) -> tuple[Catalog, Router, list[tuple[str, ...]]]:
    catalog = Catalog()
    catalog.set_document(DOC)
    catalog.set_endpoints("llm", "m", endpoints)
    decisions: list[tuple[str, ...]] = []
    now = [0.0]
    router = Router(catalog, lambda: now[0], lambda *d: decisions.append(d))
    return catalog, router, decisions


def test_terminating_endpoints_take_no_new_requests_while_others_are_ready() -> None:
    _catalog, router, decisions = setup(
        Endpoint("http://a"), Endpoint("http://b", ready=False, terminating=True)
    )
    route = DOC.models[0]
    urls = {router.choose(route, RouteRequest({})).url for _ in range(4)}
    assert urls == {"http://a"}
    assert decisions[0] == ("m", "round-robin", "rotation")


def test_terminating_but_serving_endpoints_are_the_last_resort() -> None:
    _, router, _ = setup(
        Endpoint("http://b", ready=False, serving=True, terminating=True),
        Endpoint("http://c", ready=False, serving=False),
    )
    assert router.choose(DOC.models[0], RouteRequest({})).url == "http://b"


def test_a_retry_falls_back_to_terminating_endpoints_once_ready_ones_failed() -> None:
    # The only ready replica failed to connect: a terminating one still serving
    # is tried next, as it would be on a first try, not a 502 for the client.
    _, router, _ = setup(
        Endpoint("http://a"),
        Endpoint("http://b", ready=False, serving=True, terminating=True),
        Endpoint("http://c", ready=False, serving=False, terminating=True),
    )
    route = DOC.models[0]
    first = router.choose(route, RouteRequest({}))
    assert first.url == "http://a"
    second = router.choose(route, RouteRequest({}), exclude=[first])
    assert second.url == "http://b"
    with pytest.raises(NoReplica):
        router.choose(route, RouteRequest({}), exclude=[first, second])


def test_exclusion_and_no_replica() -> None:
    _catalog, router, _ = setup(Endpoint("http://a"))
    route = DOC.models[0]
    only = router.choose(route, RouteRequest({}))
    with pytest.raises(NoReplica) as info:
        router.choose(route, RouteRequest({}), exclude=[only])
    assert info.value.headers["retry-after"] == "5"


def test_a_terminating_replica_serves_before_an_ejected_ready_one() -> None:
    # The only ready replica is ejected while an old pod of a rolling update
    # still serves: the old pod takes the request, not the replica that just
    # failed three in a row; with both out, the ejected one is still tried.
    catalog, router, _ = setup(
        Endpoint("http://a"),
        Endpoint("http://b", ready=False, serving=True, terminating=True),
    )
    route = DOC.models[0]
    [ready] = catalog.replicas(route)
    ready.ejected_until = 100.0
    assert router.choose(route, RouteRequest({})).url == "http://b"
    [leaving] = catalog.terminating(route)
    leaving.ejected_until = 100.0
    assert router.choose(route, RouteRequest({})) is ready


def test_all_ejected_are_still_tried() -> None:
    catalog, router, _ = setup(Endpoint("http://a"))
    replica = catalog.replicas(DOC.models[0])[0]
    replica.ejected_until = 100.0
    assert router.choose(DOC.models[0], RouteRequest({})) is replica


def test_ejection_backoff_doubles_and_success_resets() -> None:
    policy = EjectionPolicy(eject_after=2, base_s=5, max_s=12)
    r = Replica("http://a")
    # Each result is of a request sent just before it (`r.ejections` then).
    assert not r.record_failure(0, policy, r.ejections)
    assert r.record_failure(0, policy, r.ejections) and r.ejected_until == 5
    assert not r.available(4) and r.available(5)
    # On trial after the back-off: one failure ejects again, for twice as long.
    assert r.record_failure(6, policy, r.ejections) and r.ejected_until == 16
    assert r.record_failure(20, policy, r.ejections) and r.ejected_until == 32
    assert r.ejections == 3  # the last one capped at 12
    r.record_success(40, r.ejections)
    assert not r.record_failure(40, policy, r.ejections)


def test_failures_from_before_an_ejection_do_not_lengthen_it() -> None:
    # Eight requests in flight when a replica dies fail one after another: the
    # ejection their first failures cause stays the first back-off.
    policy = EjectionPolicy(eject_after=2, base_s=5, max_s=60)
    r = Replica("http://a")
    sent = r.ejections
    ejected = [r.record_failure(100.0, policy, sent) for _ in range(8)]
    assert ejected == [False, True, False, False, False, False, False, False]
    assert r.ejected_until == 105.0 and r.ejections_in_row == 1
    # The trial after the back-off still doubles it.
    assert r.record_failure(106.0, policy, r.ejections) and r.ejected_until == 116.0


def test_a_success_while_ejected_neither_ends_the_ejection_nor_its_doubling() -> None:
    # A stream sent before the replica failed ends well while it is ejected. It
    # cleared the ejections in a row: the replica came back needing two
    # failures, not one failed trial, and the back-off never doubled.
    policy = EjectionPolicy(eject_after=2, base_s=5, max_s=60)
    r = Replica("http://a")
    stream = r.ejections
    r.record_failure(100.0, policy, r.ejections)
    assert r.record_failure(100.0, policy, r.ejections) and r.ejected_until == 105.0
    r.record_success(101.0, stream)
    assert not r.available(104.0) and r.available(105.0)
    assert r.record_failure(106.0, policy, r.ejections) and r.ejected_until == 116.0
    # A success of a trial sent once the ejection is over: healthy again.
    r.record_success(117.0, r.ejections)
    assert (r.failures, r.ejections_in_row) == (0, 0)
    assert not r.record_failure(118.0, policy, r.ejections)


def test_a_success_sent_before_an_ejection_does_not_heal_after_it() -> None:
    # A long stream sent before the replica failed ends well after its
    # ejection (LLM streams outlast the 5 s back-off). Counted, it cleared the
    # ejections in a row: the failed trial after it did not eject the replica
    # again, and the back-off started over at 5 s instead of doubling.
    policy = EjectionPolicy(eject_after=3, base_s=5, max_s=60)
    r = Replica("http://a")
    stream = r.ejections
    for t in (1.0, 2.0, 3.0):
        r.record_failure(t, policy, r.ejections)
    assert r.ejected_until == 8.0 and r.ejections_in_row == 1
    r.record_success(30.0, stream)
    assert r.ejections_in_row == 1
    # The trial fails: ejected again at once, for twice as long.
    assert r.record_failure(31.0, policy, r.ejections) and r.ejected_until == 41.0


def test_a_failure_sent_before_an_ejection_does_not_eject_again_after_it() -> None:
    # A request sent before the replica failed fails after its ejection, before
    # any trial was sent: taken for the trial, it ejected the replica again for
    # twice as long.
    policy = EjectionPolicy(eject_after=3, base_s=5, max_s=60)
    r = Replica("http://a")
    old = r.ejections
    for t in (1.0, 2.0, 3.0):
        r.record_failure(t, policy, r.ejections)
    assert not r.record_failure(9.0, policy, old)
    assert r.available(9.0) and r.ejected_until == 8.0
    assert (r.failures, r.ejections_in_row) == (0, 1)
    # The real trial still doubles the back-off.
    assert r.record_failure(10.0, policy, r.ejections) and r.ejected_until == 20.0


def test_a_guess_sent_while_ejected_judges_only_once_the_ejection_is_over() -> None:
    # With every replica ejected, an ejected one is tried all the same: what
    # its guess does while the replica is ejected changes nothing (the
    # ejection lasts its period); ending after it, it is as good as a trial.
    policy = EjectionPolicy(eject_after=1, base_s=5, max_s=60)
    r = Replica("http://a")
    assert r.record_failure(0.0, policy, r.ejections) and r.ejected_until == 5.0
    guess = r.ejections
    assert not r.record_failure(1.0, policy, guess)
    r.record_success(2.0, guess)
    assert (r.ejected_until, r.ejections_in_row) == (5.0, 1)
    r.record_success(6.0, guess)
    assert r.ejections_in_row == 0


def test_replica_state_survives_endpoint_updates() -> None:
    catalog, _, _ = setup(Endpoint("http://a"))
    replica = catalog.replicas(DOC.models[0])[0]
    replica.in_flight = 2
    catalog.set_endpoints("llm", "m", [Endpoint("http://a"), Endpoint("http://b")])
    assert catalog.replicas(DOC.models[0])[0] is replica
    catalog.set_endpoints("llm", "m", [Endpoint("http://b")])
    assert [r.url for r in catalog.replicas(DOC.models[0])] == ["http://b"]


def _prefix_doc(*served: tuple[str, str]) -> RoutingDocument:
    """One route per (served name, strategy), all on the Service `m`."""
    return RoutingDocument.model_validate(
        {
            "models": [
                {
                    "name": f"m{i}",
                    "namespace": "llm",
                    "servedName": name,
                    "service": "m",
                    "strategy": strategy,
                }
                for i, (name, strategy) in enumerate(served)
            ]
        }
    )


def test_a_new_document_drops_the_state_of_models_gone_and_keeps_the_rest() -> None:
    """A model deleted, renamed or switched to another strategy left its
    prefix-aware table (up to 200,000 hashes) for the life of the process."""
    catalog = Catalog()
    decisions: list[tuple[str, ...]] = []
    router = Router(catalog, lambda: 0.0, lambda *d: decisions.append(d))
    catalog.set_endpoints("llm", "m", [Endpoint("http://a"), Endpoint("http://b")])
    first = _prefix_doc(("stays", "prefix-aware"), ("goes", "prefix-aware"))
    catalog.set_document(first)
    prompt = RouteRequest({"prompt": "p" * 2048})
    for route in first.models:
        router.choose(route, prompt)

    # `goes` is deleted (and, for good measure, `stays` is re-read unchanged).
    catalog.set_document(_prefix_doc(("stays", "prefix-aware")))
    assert len(router._strategies) == 1
    # A renamed or re-created `goes` starts afresh; `stays` knows its prompt.
    catalog.set_document(first)
    decisions.clear()
    for route in first.models:
        router.choose(route, prompt)
    assert decisions == [
        ("stays", "prefix-aware", "cache"),
        ("goes", "prefix-aware", "hash"),
    ]
    # Switched to another strategy: the prefix-aware table goes too.
    catalog.set_document(_prefix_doc(("stays", "least-load"), ("goes", "round-robin")))
    assert router._strategies == {}


class _Unwalkable(tuple[ModelRoute, ...]):
    """Routes that fail whoever walks them."""

    def __iter__(self) -> Iterator[ModelRoute]:
        raise AssertionError("walked every route")


def test_a_new_document_costs_the_router_the_models_it_routed_only() -> None:
    """Its listener runs on the event loop with each reload: walking every
    route of the document took 20 ms there at 40,000 models."""
    catalog = Catalog()
    router = Router(catalog, lambda: 0.0)
    catalog.set_endpoints("llm", "m", [Endpoint("http://a")])
    catalog.set_document(_prefix_doc(("stays", "round-robin"), ("goes", "least-load")))
    for route in catalog.routes():
        router.choose(route, RouteRequest({"prompt": "p"}))
    table = routing_table(
        DocumentReading(_prefix_doc(("stays", "round-robin"))), catalog.document
    )
    models = _Unwalkable(table.document.models)
    unwalkable = table.document.model_copy(update={"models": models})
    catalog.put_in_force(dataclasses.replace(table, document=unwalkable))
    assert list(router._strategies) == [("stays", "round-robin")]


def test_the_router_passes_the_report_age_to_kv_aware() -> None:
    kv = _prefix_doc(("m", "kv-aware"))
    now = [0.0]
    catalog = Catalog()
    catalog.set_document(kv)
    catalog.set_endpoints("llm", "m", [Endpoint("http://a"), Endpoint("http://b")])
    router = Router(catalog, lambda: now[0], load_max_age_s=10.0)
    a, b = catalog.replicas(kv.models[0])
    a.load = LoadReport(running=0, scraped_at=0.0)
    a.in_flight = 2
    b.load = LoadReport(running=8, scraped_at=0.0)
    assert router.choose(kv.models[0], RouteRequest({})) is a
    now[0] = 11.0  # neither report counts now: in flight alone
    assert router.choose(kv.models[0], RouteRequest({})) is b


def test_a_choice_among_replicas_with_room_keeps_prefix_awares_knowledge() -> None:
    """prefix-aware gives a new replica a bit taken from replicas gone, once all
    are held: those at their bound are busy, not gone, and keep their
    conversations."""
    route = DOC.models[0].model_copy(update={"strategy": RoutingStrategy.PREFIX_AWARE})
    catalog = Catalog()
    catalog.set_document(RoutingDocument(models=(route,)))
    router = Router(catalog, lambda: 0.0)

    def chat(text: str) -> RouteRequest:
        return RouteRequest({"messages": [{"role": "user", "content": text * 80}]})

    # 63 replicas met and gone, then `a`, which holds the conversation P: no
    # bit left for the next new replica.
    for i in range(63):
        catalog.set_endpoints("llm", "m", [Endpoint(f"http://old{i}")])
        router.choose(route, chat(f"old {i} "))
    catalog.set_endpoints("llm", "m", [Endpoint("http://a")])
    a = router.choose(route, chat("conversation P. "))
    catalog.set_endpoints("llm", "m", [Endpoint("http://a"), Endpoint("http://b")])
    a.in_flight = 1
    # `a` at its bound of 1: the new replica takes Q.
    assert router.choose_with_room(route, chat("conversation Q. "), (), 1).url == (
        "http://b"
    )
    a.in_flight = 0
    assert router.choose(route, chat("conversation P. ")).url == "http://a"
