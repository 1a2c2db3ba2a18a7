"""The local pod runtime: plays the kubelet for pods annotated
`citadel.ai/runtime: local` by running a real local program for each.

kwok plays the kubelet of the fake nodes but runs nothing; for the full path (a
real model answering through the gateway), this daemon takes over the pods that ask
for it: it gives each its own network namespace and address (podnet), starts the
program that stands in for its image (images), reports the pod Running, marks it
Ready only when its readiness probe answers, restarts it when it exits (with
CrashLoopBackOff in the status, as a kubelet would), and on deletion drains it
(preStop sleep), stops it within the grace period and removes the pod.

Programs in a pod reach the API server at https://10.244.128.1:26443 (a forwarder
to the loopback API server) with a token of the pod's ServiceAccount.

Run by `harness up` as the component `pod-runtime`; `python -m harness.podruntime`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from . import images, podnet
from .config import Layout, Ports

log = logging.getLogger("pod-runtime")
Obj = dict[str, Any]
PROBE_PERIOD_S = 1.0
MAX_BACKOFF_S = 60.0


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """The few API calls the runtime makes, as the cluster admin."""

    def __init__(self, layout: Layout, ports: Ports) -> None:
        pki = layout.pki
        self.base = f"https://127.0.0.1:{ports.apiserver}"
        self.ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ssl.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.session:
            await self.session.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    async def request(
        self, method: str, path: str, body: Obj | None = None, ctype: str | None = None
    ) -> Obj:
        headers = {"Content-Type": ctype or "application/json"}
        data = json.dumps(body) if body is not None else None
        async with self.http.request(
            method, self.base + path, data=data, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status == 404 and method in ("DELETE", "PATCH"):
                return {}
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]}")
            result: Obj = json.loads(text) if text else {}
            return result

    async def patch_status(self, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        await self.request(
            "PATCH", path, {"status": status}, "application/merge-patch+json"
        )

    async def token(self, pod: Obj) -> str:
        """A ServiceAccount token bound to the pod, as the kubelet would mount."""
        meta, spec = pod["metadata"], pod["spec"]
        sa = spec.get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 86400,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token"
        result = await self.request("POST", path, body)
        return str(result["status"]["token"])

    async def env_value(self, namespace: str, pod: Obj, source: Obj) -> str | None:
        if ref := source.get("fieldRef"):
            value: Any = pod
            for part in ref["fieldPath"].split("."):
                value = value.get(part, {}) if isinstance(value, dict) else {}
            return value if isinstance(value, str) else None
        for kind, plural in (
            ("secretKeyRef", "secrets"),
            ("configMapKeyRef", "configmaps"),
        ):
            if ref := source.get(kind):
                obj = await self.request(
                    "GET", f"/api/v1/namespaces/{namespace}/{plural}/{ref['name']}"
                )
                raw = obj.get("data", {}).get(ref["key"])
                if raw is None:
                    return None
                return (
                    base64.b64decode(raw).decode()
                    if kind == "secretKeyRef"
                    else str(raw)
                )
        return None


@dataclass
class PodRun:
    """One pod the runtime runs."""

    pod: Obj
    ip: str
    netns: str
    directory: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    started_at: str = field(default_factory=now)
    last_exit: Obj | None = None
    waiting: tuple[str, str] | None = None
    stopping: bool = False
    supervisor: asyncio.Task[None] | None = None
    # Status writes go one at a time and each is built inside the lock, so the
    # last write always carries the newest state: two concurrent PATCHes could
    # land out of order and leave a ready pod reported as not ready.
    reporting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def stopped(self) -> bool:
        """Whether the pod is being stopped (read anew after every await)."""
        return self.stopping

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def container(self) -> Obj:
        first: Obj = self.pod["spec"]["containers"][0]
        return first


class Runtime:
    """Watches pods and keeps the local programs in step with them."""

    def __init__(self, api: Api, layout: Layout, ports: Ports) -> None:
        self.api = api
        self.layout = layout
        self.ports = ports
        self.runs: dict[str, PodRun] = {}
        self.used_ips: set[str] = set()
        self.root = layout.state / "pods"
        self.tasks: set[asyncio.Task[None]] = set()
        # Pods whose termination has begun. Every status write during the drain
        # brings another MODIFIED event with the deletionTimestamp; each must not
        # start a second termination, which would delete the pod at once and so
        # void its ServiceAccount token while the program still shuts down.
        self.terminating: set[str] = set()

    # -- addresses -------------------------------------------------------------

    def allocate_ip(self) -> str:
        for host in podnet.NETWORK.hosts():
            ip = str(host)
            if ip != podnet.BRIDGE_IP and ip not in self.used_ips:
                self.used_ips.add(ip)
                return ip
        raise RuntimeError("pod network exhausted")

    # -- status ----------------------------------------------------------------

    def status_of(self, run: PodRun) -> Obj:
        name = run.container["name"]
        image = run.container["image"]
        state: Obj
        if run.waiting:
            state = {"waiting": {"reason": run.waiting[0], "message": run.waiting[1]}}
        else:
            state = {"running": {"startedAt": run.started_at}}
        container: Obj = {
            "name": name,
            "image": image,
            "imageID": "",
            "ready": run.ready,
            "started": run.waiting is None,
            "restartCount": run.restarts,
            "state": state,
        }
        if run.last_exit:
            container["lastState"] = {"terminated": run.last_exit}
        ready = "True" if run.ready else "False"
        stamp = now()
        return {
            "phase": "Running",
            "hostIP": "10.255.0.1",
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.pod.get("status", {}).get("startTime") or run.started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                {
                    "type": "ContainersReady",
                    "status": ready,
                    "lastTransitionTime": stamp,
                },
                {"type": "Ready", "status": ready, "lastTransitionTime": stamp},
            ],
            "containerStatuses": [container],
        }

    async def report(self, run: PodRun) -> None:
        async with run.reporting:
            try:
                await self.api.patch_status(run.pod, self.status_of(run))
            except RuntimeError as err:
                log.warning("status of %s not written: %s", run.key, err)

    # -- starting ----------------------------------------------------------------

    async def command_for(self, run: PodRun) -> images.LocalCommand:
        pod, c = run.pod, run.container
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for item in c.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "valueFrom" in item:
                value = await self.api.env_value(namespace, pod, item["valueFrom"])
                if value is not None:
                    env[item["name"]] = value
        kubeconfig = run.directory / "kubeconfig"
        token = await self.api.token(pod)
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "in-cluster",
                            "cluster": {
                                "server": f"https://{podnet.BRIDGE_IP}:{self.ports.apiserver}",
                                "certificate-authority": str(
                                    self.layout.pki / "ca.crt"
                                ),
                            },
                        }
                    ],
                    "users": [{"name": "pod", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "in-cluster",
                            "context": {"cluster": "in-cluster", "user": "pod"},
                        }
                    ],
                    "current-context": "in-cluster",
                }
            )
        )
        kubeconfig.chmod(0o600)
        # The local program replaces the image's entrypoint and any `command`
        # (such as vLLM's `python3 -m ...api_server`); the arguments carry over.
        return images.resolve(c["image"], c.get("args", []), env, kubeconfig)

    async def spawn(self, run: PodRun) -> None:
        command = await self.command_for(run)
        log_path = run.directory / "container.log"
        with log_path.open("ab") as out:
            out.write(f"--- {now()} $ {' '.join(command.argv)}\n".encode())
            out.flush()
            run.proc = await asyncio.create_subprocess_exec(
                *podnet.exec_prefix(run.netns),
                *command.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=command.env,
                cwd=run.directory,
                start_new_session=True,
            )
        run.started_at = now()
        run.waiting = None
        run.ready = False
        log.info(
            "%s: started %s (pid %s) at %s",
            run.key,
            command.argv[0],
            run.proc.pid,
            run.ip,
        )

    async def start(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        directory = self.root / f"{meta['namespace']}_{meta['name']}"
        directory.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            pod=pod,
            ip=self.allocate_ip(),
            netns=podnet.netns_name(uid),
            directory=directory,
        )
        self.runs[uid] = run
        run.supervisor = asyncio.create_task(self.supervise(run))

    async def supervise(self, run: PodRun) -> None:
        """Runs the program, restarting it with back-off whenever it exits."""
        backoff = 10.0
        while not run.stopped():
            try:
                uid = run.pod["metadata"]["uid"]
                await asyncio.to_thread(podnet.add_pod, uid, run.ip)
                break
            except podnet.PodNetworkError as err:
                # One pod's network failing must not stop the others.
                run.waiting = ("CreatePodSandboxError", str(err))
                await self.report(run)
                await asyncio.sleep(backoff)
        while not run.stopped():
            try:
                await self.spawn(run)
            except images.ImageNotMapped as err:
                run.waiting = ("ErrImagePull", str(err))
                await self.report(run)
                return
            except Exception as err:
                run.waiting = ("CreateContainerError", str(err))
                await self.report(run)
                await asyncio.sleep(backoff)
                continue
            await self.report(run)
            assert run.proc is not None
            code = await run.proc.wait()
            if run.stopped():
                return
            run.restarts += 1
            run.ready = False
            run.last_exit = {
                "exitCode": code,
                "reason": "Error" if code else "Completed",
                "startedAt": run.started_at,
                "finishedAt": now(),
            }
            run.waiting = (
                "CrashLoopBackOff",
                f"back-off {backoff:.0f}s restarting failed container "
                f"(exit code {code})",
            )
            log.info("%s: exited with %s; restarting in %.0fs", run.key, code, backoff)
            await self.report(run)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    # -- readiness ---------------------------------------------------------------

    def probe_target(self, run: PodRun) -> tuple[int, str] | None:
        probe = run.container.get("readinessProbe", {}).get("httpGet")
        if not probe:
            return None
        port = probe.get("port")
        if isinstance(port, str):
            named = {
                p.get("name"): p["containerPort"]
                for p in run.container.get("ports", [])
            }
            port = named.get(port)
        if not isinstance(port, int):
            return None
        return port, probe.get("path", "/")

    async def probe(self, http: aiohttp.ClientSession, run: PodRun) -> bool:
        if run.proc is None or run.proc.returncode is not None or run.waiting:
            return False
        target = self.probe_target(run)
        if target is None:
            return True
        port, path = target
        try:
            async with http.get(f"http://{run.ip}:{port}{path}") as resp:
                return resp.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def probe_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                for run in list(self.runs.values()):
                    if run.stopping:
                        continue
                    ready = await self.probe(http, run)
                    if ready != run.ready:
                        run.ready = ready
                        log.info("%s: ready=%s", run.key, ready)
                        await self.report(run)
                await asyncio.sleep(PROBE_PERIOD_S)

    # -- stopping ----------------------------------------------------------------

    async def stop_run(self, run: PodRun, grace: float, pre_stop: float) -> None:
        run.stopping = True
        if run.ready:
            run.ready = False
            await self.report(run)
        if pre_stop > 0:
            # The drain: endpoints drop the pod while the program still serves.
            await asyncio.sleep(pre_stop)
        proc = run.proc
        if proc is not None and proc.returncode is None:
            # Like a container runtime: SIGTERM to the main process alone (vLLM's
            # API server then stops its engine process gracefully; signalled
            # directly, the engine died at once and aborted requests in flight),
            # SIGKILL to everything left when the grace period ends.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=max(grace, 1.0))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if run.supervisor:
            run.supervisor.cancel()
        await asyncio.to_thread(podnet.remove_pod, run.pod["metadata"]["uid"])
        self.used_ips.discard(run.ip)

    async def terminate(self, pod: Obj) -> None:
        """A pod being deleted: drain, stop its program, then remove the pod."""
        meta, spec = pod["metadata"], pod["spec"]
        run = self.runs.pop(meta["uid"], None)
        if run is not None and not run.stopping:
            lifecycle = run.container.get("lifecycle", {}).get("preStop", {})
            pre_stop = float(lifecycle.get("sleep", {}).get("seconds", 0))
            grace = float(spec.get("terminationGracePeriodSeconds", 30))
            log.info(
                "%s: stopping (preStop %.0fs, grace %.0fs)", run.key, pre_stop, grace
            )
            await self.stop_run(run, grace, pre_stop)
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        with contextlib.suppress(RuntimeError):
            await self.api.request("DELETE", path, body)

    # -- the watch ---------------------------------------------------------------

    async def handle(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        if images.RUNTIME_ANNOTATION not in (meta.get("annotations") or {}):
            return
        uid = meta["uid"]
        if kind == "DELETED":
            run = self.runs.pop(uid, None)
            if run:
                await self.stop_run(run, 5, 0)
            return
        if meta.get("deletionTimestamp"):
            if uid in self.terminating:
                return
            self.terminating.add(uid)
            task = asyncio.create_task(self.terminate(pod))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(lambda _: self.terminating.discard(uid))
            return
        if not spec.get("nodeName"):
            return
        if uid in self.runs:
            self.runs[uid].pod = pod
            return
        await self.start(pod)

    async def watch(self) -> None:
        while True:
            try:
                listing = await self.api.request("GET", "/api/v1/pods")
                version = listing["metadata"]["resourceVersion"]
                for pod in listing["items"]:
                    await self.handle("ADDED", pod)
                url = (
                    f"{self.api.base}/api/v1/pods?watch=1"
                    f"&resourceVersion={version}&allowWatchBookmarks=true"
                )
                async with self.api.http.get(url) as resp:
                    async for line in resp.content:
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            break
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            await self.handle(event["type"], event["object"])
            except (aiohttp.ClientError, RuntimeError, TimeoutError) as err:
                log.warning("watch interrupted: %s", err)
                await asyncio.sleep(1)

    async def shutdown(self) -> None:
        for run in list(self.runs.values()):
            await self.stop_run(run, 10, 0)
        self.runs.clear()
        await asyncio.to_thread(podnet.remove_all)


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def serve_api_forwarder(ports: Ports) -> asyncio.Server:
    """Pods reach the loopback API server through the bridge address."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", ports.apiserver
            )
        except OSError:
            writer.close()
            return
        await asyncio.gather(forward(reader, up_writer), forward(up_reader, writer))

    return await asyncio.start_server(handle, podnet.BRIDGE_IP, ports.apiserver)


async def main_async(layout: Layout, ports: Ports) -> None:
    await asyncio.to_thread(podnet.remove_all)
    await asyncio.to_thread(podnet.ensure_bridge)
    forwarder = await serve_api_forwarder(ports)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    health = web.Application()
    health.router.add_get("/healthz", healthz)
    runner = web.AppRunner(health)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ports.pod_runtime).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Api(layout, ports) as api:
        runtime = Runtime(api, layout, ports)
        tasks = [
            asyncio.create_task(runtime.watch()),
            asyncio.create_task(runtime.probe_loop()),
        ]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await runtime.shutdown()
    forwarder.close()
    await runner.cleanup()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(main_async(Layout.from_env(), Ports()))


if __name__ == "__main__":
    main()
