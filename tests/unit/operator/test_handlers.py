"""The Kopf wiring: handlers registered, errors translated, settings applied."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, cast

import kopf
import orjson
import pytest
from kopf._core.intents.stoppers import DaemonStopper

from citadel.operator import __version__, names, view
from citadel.operator.builders.objects import build_service
from citadel.operator.handlers import _translated, build_registry
from citadel.operator.kopfstate import MemoryState
from citadel.operator.kube.client import ApiError, Manifest
from citadel.operator.kube.fake import FakeKube
from citadel.operator.main import kopf_settings, main
from citadel.operator.metrics import Metrics
from citadel.operator.reconcile import ReconcileError, Reconciler, service_drifted
from citadel.operator.settings import OperatorSettings, PeeringMode
from citadel.operator.sweep import IndexSweep

from .samples import make_model, model_body

pytestmark = pytest.mark.unit


async def _fail(retryable: bool) -> None:
    raise ReconcileError("boom", retryable=retryable, delay=3)


async def test_retryable_errors_become_temporary() -> None:
    with pytest.raises(kopf.TemporaryError) as err:
        await _translated(_fail(True))
    assert err.value.delay == 3
    with pytest.raises(kopf.PermanentError):
        await _translated(_fail(False))


@pytest.mark.parametrize(
    ("failure", "delay"),
    [
        # The overload filter's 429 asks for longer than the back-off.
        (ApiError(429, "TooManyRequests", "slow down", retry_after_s=30), 30),
        # Bounded, so that a failure that lasts is still retried and reported.
        (ApiError(429, "TooManyRequests", "slow down", retry_after_s=3600), 600),
        # Never sooner than the back-off.
        (ApiError(503, "ServiceUnavailable", "etcd", retry_after_s=1), 5),
        (ApiError(503, "ServiceUnavailable", "etcd"), 5),
    ],
)
async def test_a_retry_waits_as_long_as_the_api_server_asks(
    settings: OperatorSettings, failure: ApiError, delay: float
) -> None:
    kube = FakeKube([model_body()])
    kube.fail["services"] = failure
    reconciler = Reconciler(kube, settings, Metrics())
    with pytest.raises(kopf.TemporaryError) as err:
        await _translated(reconciler.reconcile(model_body()))
    assert err.value.delay == delay


def _login() -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server="https://127.0.0.1:1")


async def _noop() -> None:
    return None


@pytest.mark.parametrize("resync", [0.0, 60.0])
def test_registry_has_every_handler(settings: OperatorSettings, resync: float) -> None:
    settings = settings.model_copy(update={"resync_seconds": resync})
    reconciler = Reconciler(FakeKube(), settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    changing = {h.id for h in registry._changing.get_all_handlers()}
    assert {"reconcile-create", "reconcile-update", "reconcile-resume"} <= changing
    watching = {h.id for h in registry._watching.get_all_handlers()}
    assert {"llmmodel-event", "deployment-event", "service-event", "pod-event"} <= (
        watching
    )
    spawning = registry._spawning.get_all_handlers()
    assert [h.id for h in spawning] == (["resync"] if resync else []) + [
        "peering-pause/metadata.name"
    ]
    # No finalizers: deleting a model (or the peering object) must never wait
    # for the operator.
    for handler in [*spawning, *registry._changing.get_all_handlers()]:
        assert not handler.requires_finalizer, handler.id


def test_kopf_settings_keep_state_in_memory(settings: OperatorSettings) -> None:
    state = MemoryState()
    ks = kopf_settings(
        settings.model_copy(update={"peering": PeeringMode.MANDATORY}), state
    )
    assert ks.persistence.diffbase_storage is state.diffbase
    assert ks.persistence.progress_storage is state.progress
    assert ks.persistence.finalizer == "citadel.ai/finalizer"
    assert ks.peering.mandatory and not ks.peering.standalone
    assert ks.peering.name == "citadel-operator"
    assert kopf_settings(settings, state, default_priority=7).peering.priority == 7
    fixed = settings.model_copy(update={"peering_priority": 3})
    assert kopf_settings(fixed, state, default_priority=7).peering.priority == 3


def test_watches_of_our_objects_carry_our_label_selector(
    settings: OperatorSettings,
) -> None:
    # Kopf's `labels=` on a handler filters in the operator, after the API server
    # has sent every pod of the cluster; the selector makes it filter.
    selectors = kopf_settings(settings, MemoryState()).watching.label_selectors

    def selector(group: str, plural: str, kind: str) -> list[str]:
        resource = kopf.Resource(group, "v1", plural, kind=kind, namespaced=True)
        return list(selectors.collect(resource))

    managed = ["app.kubernetes.io/managed-by=citadel-operator"]
    assert selector("", "pods", "Pod") == managed
    assert selector("apps", "deployments", "Deployment") == managed
    assert selector("", "services", "Service") == managed
    # Models, and nodes that are anyone's, come whole.
    assert selector("citadel.ai", "llmmodels", "LLMModel") == []
    assert selector("", "nodes", "Node") == []


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == __version__


async def test_indexes_keep_objects_without_field_ownership(
    settings: OperatorSettings,
) -> None:
    reconciler = Reconciler(FakeKube(), settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    labels = {names.LABEL_MANAGED_BY: names.MANAGER_NAME, names.LABEL_MODEL: "m"}
    raw: dict[str, Any] = {
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "labels": labels,
            "resourceVersion": "7",
            "managedFields": [{"manager": "kube-controller-manager"}],
        },
        "spec": {"replicas": 1},
        "status": {"readyReplicas": 1},
    }
    indexes = {h.id: h for h in registry._indexing.get_all_handlers()}
    assert set(indexes) == {
        view.MODELS_INDEX,
        view.DEPLOYMENTS_INDEX,
        view.PODS_INDEX,
        view.NODES_INDEX,
    }
    for handler in indexes.values():
        index_fn: Any = handler.fn
        entry = await index_fn(
            namespace="ns",
            name="m",
            labels=labels,
            body=kopf.Body(cast(kopf.RawBody, raw)),
        )
        [kept] = entry.values()
        assert "managedFields" not in kept["metadata"], handler.id
        assert kept["metadata"]["resourceVersion"] == "7"
        assert kept["spec"] == raw["spec"] and kept["status"] == raw["status"]
    # The watch event's own body is left as it came.
    assert raw["metadata"]["managedFields"]


async def test_pod_and_deployment_events_hand_the_refresh_to_a_task(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # Kopf holds an event's body until its handler returns; a refresh may wait
    # long for a burst of new models, so the handlers return at once.
    gate = asyncio.Event()
    asked: list[tuple[str, str, bool]] = []

    class Waiting(Reconciler):
        async def refresh(
            self,
            namespace: str,
            name: str,
            *,
            fix_drift: bool = False,
            fix_service: bool = False,
        ) -> None:
            asked.append((namespace, name, fix_drift))
            await gate.wait()
            raise RuntimeError("a bug")

    reconciler = Waiting(FakeKube(), settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    handlers = {h.id: h.fn for h in registry._watching.get_all_handlers()}
    labels = {names.LABEL_MANAGED_BY: names.MANAGER_NAME, names.LABEL_MODEL: "m"}
    for handler_id in ("pod-event", "deployment-event"):
        handler: Any = handlers[handler_id]
        await asyncio.wait_for(handler(labels=labels, namespace="ns"), timeout=1)
    await asyncio.sleep(0)
    assert asked == [("ns", "m", False), ("ns", "m", True)]
    # A failure nobody awaits is still logged.
    gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    failed = [r.getMessage() for r in caplog.records]
    assert failed.count("status refresh of ns/m failed") == 2
    # Cleanup cancels what still runs.
    gate.clear()
    await handlers["pod-event"](labels=labels, namespace="ns")
    [cleanup] = [
        h for h in registry._activities.get_all_handlers() if "cleanup" in h.id
    ]
    cleanup_fn: Any = cleanup.fn
    await asyncio.wait_for(cleanup_fn(), timeout=1)
    assert len(asked) == 3


async def test_a_failed_event_post_is_logged_as_one(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Tasks that post the unknown-names Events were logged as a failed status
    refresh."""

    class Failing(Reconciler):
        async def _post_unknown_names(
            self, key: str, field: str, unknown: tuple[str, ...]
        ) -> None:
            raise RuntimeError("a bug")

    reconciler = Failing(FakeKube(), settings, Metrics())
    reconciler._tell_unknown_names({("ns/m", "fallbacks"): ("later",)})
    for _ in range(3):
        await asyncio.sleep(0)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["the fallbacks Event of ns/m failed"]


async def test_a_deleted_or_edited_service_of_a_live_model_is_fixed_at_once(
    settings: OperatorSettings,
) -> None:
    # As a deleted or edited Deployment is: through a refresh in a task of its
    # own, not at the next periodic pass.
    asked: list[tuple[str, str, bool]] = []

    class Recording(Reconciler):
        async def refresh(
            self,
            namespace: str,
            name: str,
            *,
            fix_drift: bool = False,
            fix_service: bool = False,
        ) -> None:
            asked.append((namespace, name, fix_service))

    reconciler = Recording(FakeKube([model_body()]), settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    handlers = {h.id: h.fn for h in registry._watching.get_all_handlers()}
    service_event: Any = handlers["service-event"]
    service = build_service(make_model())
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-mixtral"

    async def event(type: str | None, body: Manifest, name: str = "mixtral") -> None:
        labels = {**body["metadata"]["labels"], names.LABEL_MODEL: name}
        await asyncio.wait_for(
            service_event(
                type=type,
                labels=labels,
                namespace="llm",
                body=kopf.Body(cast(kopf.RawBody, body)),
            ),
            timeout=1,
        )
        await asyncio.sleep(0)

    for type_ in (None, "ADDED", "MODIFIED"):
        await event(type_, service)  # nothing of ours lost
    # Another controller's annotation and a default the API server fills in
    # take nothing the operator sets.
    annotated = copy.deepcopy(service)
    annotated["metadata"]["annotations"] = {"example.com/seen": "yes"}
    annotated["spec"]["clusterIP"] = "10.96.0.12"
    await event("MODIFIED", annotated)
    # The garbage collector's, of a model gone or made again under its name.
    other = copy.deepcopy(service)
    other["metadata"]["ownerReferences"][0]["uid"] = "uid-before"
    await event("DELETED", other)
    await event("DELETED", service, name="gone")
    edited_other = copy.deepcopy(other)
    edited_other["spec"]["selector"] = {"app": "theirs"}
    await event("MODIFIED", edited_other)
    assert asked == []
    await event("DELETED", service)
    assert asked == [("llm", "mixtral", True)]
    # A hand edit of what the operator sets: the selector, the port.
    rerouted = copy.deepcopy(service)
    rerouted["spec"]["selector"] = {"app": "theirs"}
    await event("MODIFIED", rerouted)
    moved = copy.deepcopy(service)
    moved["spec"]["ports"][0]["port"] = 9000
    await event("MODIFIED", moved)
    assert asked == [("llm", "mixtral", True)] * 3


async def test_routes_wait_for_the_first_resource_handler(
    settings: OperatorSettings,
) -> None:
    """Kopf runs startup handlers on still empty indexes, and resource handlers
    only once every index has its first listing (never while standing by for a
    peer): a document written before that drops every model it misses."""
    settings = settings.model_copy(update={"route_publish_delay": 0.0})
    kube = FakeKube()
    reconciler = Reconciler(kube, settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    indexes: dict[str, dict[object, list[dict[str, Any]]]] = {
        name: {}
        for name in (
            view.MODELS_INDEX,
            view.DEPLOYMENTS_INDEX,
            view.PODS_INDEX,
            view.NODES_INDEX,
        )
    }
    activities = {h.id: h.fn for h in registry._activities.get_all_handlers()}
    [startup] = [fn for id_, fn in activities.items() if "startup" in id_]
    [cleanup] = [fn for id_, fn in activities.items() if "cleanup" in id_]
    start: Any = startup
    await start(**indexes)

    def writes() -> list[list[str]]:
        return [
            [m["name"] for m in orjson.loads(obj["data"]["routes.json"])["models"]]
            for _, obj in kube.applied
            if obj["kind"] == "ConfigMap"
        ]

    try:
        await asyncio.sleep(0.2)
        assert writes() == []  # kicked at start, held
        body = model_body("a")
        indexes[view.MODELS_INDEX][("llm", "a")] = [body]  # the listing came
        handlers = {h.id: h.fn for h in registry._watching.get_all_handlers()}
        node_event: Any = handlers["node-event"]
        await node_event()
        for _ in range(100):
            if writes():
                break
            await asyncio.sleep(0.01)
        assert writes() == [["a"]]
    finally:
        stop: Any = cleanup
        await stop()


def _activity(registry: kopf.OperatorRegistry, kind: str) -> Any:
    [fn] = [h.fn for h in registry._activities.get_all_handlers() if kind in h.id]
    return fn


def _empty_indexes() -> dict[str, dict[object, list[dict[str, Any]]]]:
    return {
        name: {}
        for name in (
            view.MODELS_INDEX,
            view.DEPLOYMENTS_INDEX,
            view.PODS_INDEX,
            view.NODES_INDEX,
        )
    }


async def test_startup_run_again_starts_each_task_once(
    settings: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kopf runs a start-up handler that failed again: a second publisher and
    a second sweep were started beside the first."""
    settings = settings.model_copy(update={"resync_seconds": 60.0})
    started: list[str] = []

    async def sweeping(self: IndexSweep, interval: float) -> None:
        started.append("sweep")
        await asyncio.Event().wait()

    monkeypatch.setattr(IndexSweep, "run", sweeping)

    class Failing(FakeKube):
        failures = 1

        async def create(self, obj: Manifest) -> Manifest:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("an answer of a shape not foreseen")
            return await super().create(obj)

    reconciler = Reconciler(Failing(), settings, Metrics())

    async def publishing(on_result: Any = None) -> None:
        started.append("publisher")
        await asyncio.Event().wait()

    reconciler.routes.run = publishing  # type: ignore[method-assign]
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    startup = _activity(registry, "startup")
    try:
        with pytest.raises(RuntimeError):
            await startup(**_empty_indexes())
        await startup(**_empty_indexes())  # as Kopf retries it
        await asyncio.sleep(0)
        assert sorted(started) == ["publisher", "sweep"]
    finally:
        await _activity(registry, "cleanup")()


async def test_liveness_fails_once_a_background_task_ends(
    settings: OperatorSettings,
) -> None:
    """Nothing awaited the publisher's task: once it ended, the routing
    ConfigMap was never written again and /healthz still answered 200."""
    settings = settings.model_copy(update={"resync_seconds": 60.0})
    reconciler = Reconciler(FakeKube(), settings, Metrics())
    crash = asyncio.Event()

    async def publishing(on_result: Any = None) -> None:
        await crash.wait()
        raise RuntimeError("a bug")

    reconciler.routes.run = publishing  # type: ignore[method-assign]
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    probe = _activity(registry, "background-tasks")
    await _activity(registry, "startup")(**_empty_indexes())
    try:
        # Started, and held as a replica standing by for a peer is: alive.
        assert await probe() == ["autoscaler", "index-sweep", "route-publisher"]
        crash.set()
        for _ in range(3):
            await asyncio.sleep(0)
        # Permanent, so that Kopf answers the probe at once instead of trying
        # the handler again within the request.
        with pytest.raises(kopf.PermanentError, match="route-publisher"):
            await probe()
    finally:
        await _activity(registry, "cleanup")()


@pytest.mark.parametrize(
    ("watched", "plural"), [((), "clusterkopfpeerings"), (("llm",), "kopfpeerings")]
)
async def test_a_daemon_on_the_peering_object_tells_pauses_and_resumes(
    settings: OperatorSettings, watched: tuple[str, ...], plural: str
) -> None:
    """Kopf stops every daemon when it pauses the replica for a peer, and
    starts them again once it resumes: the reconciler learns both from one on
    the peering object, and stops writing in between."""
    settings = settings.model_copy(update={"watch_namespaces": watched})
    reconciler = Reconciler(FakeKube(), settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    [daemon] = [
        h
        for h in registry._spawning.get_all_handlers()
        if h.id == "peering-pause/metadata.name"
    ]
    assert daemon.selector is not None
    assert (daemon.selector.group, daemon.selector.any_name) == ("kopf.dev", plural)
    assert (daemon.field, daemon.value) == (("metadata", "name"), "citadel-operator")
    fn: Any = daemon.fn

    async def run_until(reason: kopf.DaemonStoppingReason) -> None:
        stopper = DaemonStopper()
        task = asyncio.create_task(fn(stopped=kopf.AsyncDaemonStopperChecker(stopper)))
        await asyncio.sleep(0.01)
        assert not reconciler.routes.paused  # running: the replica is active
        stopper.set(reason=reason)
        await asyncio.wait_for(task, timeout=1)

    await run_until(kopf.DaemonStoppingReason.OPERATOR_PAUSING)
    assert reconciler.routes.paused
    await run_until(kopf.DaemonStoppingReason.OPERATOR_EXITING)  # resumed, then
    assert not reconciler.routes.paused


def test_a_standalone_operator_senses_no_pauses(settings: OperatorSettings) -> None:
    settings = settings.model_copy(update={"peering": PeeringMode.STANDALONE})
    reconciler = Reconciler(FakeKube(), settings, Metrics())
    registry = build_registry(reconciler, settings, _login, _noop, MemoryState())
    spawning = {h.id for h in registry._spawning.get_all_handlers()}
    assert not [i for i in spawning if i.startswith("peering-pause")]


def test_a_service_of_a_model_it_cannot_read_is_left_to_the_periodic_pass() -> None:
    service = build_service(make_model())
    service["spec"]["selector"] = {"app": "theirs"}
    assert service_drifted(model_body(), service)
    unreadable = model_body()
    unreadable["spec"]["replicas"] = "many"
    assert not service_drifted(unreadable, service)
