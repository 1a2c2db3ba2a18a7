"""Fixtures for the chart's template tests: `helm template` with the helm binary the
cluster build makes (`make unit` builds it first; `$CITADEL_CACHE/bin/helm`, else
`helm` on PATH), parsed into objects."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
# CITADEL_CHART tests another copy of the chart, such as an unpacked `helm package`.
CHART = Path(os.environ.get("CITADEL_CHART") or ROOT / "charts" / "citadel")
RELEASE = "citadel"
NAMESPACE = "citadel-system"
MONITORING_API = "monitoring.coreos.com/v1"

Obj = dict[str, Any]


def find_tool(name: str) -> str | None:
    """A tool from the cluster build's cache, else from PATH."""
    cache = Path(os.environ.get("CITADEL_CACHE") or Path.home() / ".cache/citadel")
    built = cache / "bin" / name
    return str(built) if built.exists() else shutil.which(name)


def load_script(name: str) -> ModuleType:
    """A script from charts/ (dashboards, values_reference) as a module."""
    path = ROOT / "charts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"citadel_charts_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script() -> Callable[[str], ModuleType]:
    """Loads a script from charts/ by name."""
    return load_script


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary; the tests are skipped, saying why, when there is none."""
    found = find_tool("helm")
    if not found:
        pytest.skip(
            "no helm binary: run `make binaries` (or `make unit`, which builds it)"
        )
    return found


def _set_args(values: dict[str, Any]) -> list[str]:
    # --set-json keeps the types (numbers, lists, booleans) exactly as written here.
    return [
        arg for k, v in values.items() for arg in ("--set-json", f"{k}={json.dumps(v)}")
    ]


def run_helm(
    helm: str, *args: str, kubeconfig: str = "/dev/null"
) -> subprocess.CompletedProcess[str]:
    """Runs helm with no kubeconfig (unless given) and a throw-away cache."""
    env = {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "HELM_CACHE_HOME": "/tmp/citadel-helm",
    }
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


class FakeApiServer:
    """An API server on localhost that answers what the chart's `lookup`s ask,
    for `helm template --dry-run=server`: the kopf.dev/v1 discovery and the list
    of ClusterKopfPeerings. Everything else is 404 (a Secret looked up is then
    not found). With `peerings` None, kopf.dev/v1 is not served at all, as on a
    cluster without Kopf's CRDs.
    """

    def __init__(self, workdir: Path) -> None:
        self.peerings: list[Obj] | None = None
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._http.server_address[:2]
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "fake",
                            "cluster": {"server": f"http://{host!s}:{port}"},
                        }
                    ],
                    "users": [{"name": "fake", "user": {"token": "fake"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake"}}
                    ],
                    "current-context": "fake",
                }
            )
        )

    def close(self) -> None:
        """Stops serving."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def answer(self, path: str) -> tuple[int, Obj]:
        """The status and JSON body for a GET of `path`."""
        if self.peerings is not None:
            if path == "/apis/kopf.dev/v1":
                resource = {
                    "name": "clusterkopfpeerings",
                    "singularName": "clusterkopfpeering",
                    "namespaced": False,
                    "kind": "ClusterKopfPeering",
                    "verbs": ["get", "list"],
                }
                return 200, {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": "kopf.dev/v1",
                    "resources": [resource],
                }
            if path == "/apis/kopf.dev/v1/clusterkopfpeerings":
                return 200, {
                    "kind": "ClusterKopfPeeringList",
                    "apiVersion": "kopf.dev/v1",
                    "metadata": {"resourceVersion": "1"},
                    "items": self.peerings,
                }
        return 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "NotFound",
            "code": 404,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = fake.answer(self.path.partition("?")[0])
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # not the test's output

        return Handler


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[FakeApiServer]:
    """An API server for the chart's lookups (FakeApiServer)."""
    server = FakeApiServer(tmp_path)
    yield server
    server.close()


class ChartKit:
    """Renders the chart and picks objects out of what it rendered."""

    release = RELEASE
    namespace = NAMESPACE
    path = CHART
    root = ROOT

    def __init__(self, helm: str) -> None:
        self.helm = helm

    def run(
        self, *args: str, kubeconfig: str = "/dev/null"
    ) -> subprocess.CompletedProcess[str]:
        """Runs helm offline (template and lint read no kubeconfig), unless a
        kubeconfig is given."""
        return run_helm(self.helm, *args, kubeconfig=kubeconfig)

    def render(
        self,
        values: dict[str, Any] | None = None,
        *,
        monitoring: bool = False,
        namespace: str = NAMESPACE,
        expect_error: str | None = None,
        path: Path = CHART,
        api: FakeApiServer | None = None,
        api_versions: Sequence[str] = (),
    ) -> list[Obj]:
        """Renders the chart with `--set-json` values and returns its objects (the
        `helm test` Pod included).

        Args:
            values: dotted value paths to JSON-able values.
            monitoring: pretend the monitoring.coreos.com/v1 API is served.
            namespace: the release namespace.
            expect_error: text of the error expected instead of objects.
            path: the chart's folder, when not the chart itself (a copy).
            api: a server for the lookups (`--dry-run=server`), else none.
            api_versions: more APIs to pretend are served.
        """
        args = ["template", RELEASE, str(path), "--namespace", namespace]
        args += _set_args(values or {})
        for version in [*api_versions, *([MONITORING_API] if monitoring else [])]:
            args += ["--api-versions", version]
        kubeconfig = "/dev/null"
        if api is not None:
            args.append("--dry-run=server")
            kubeconfig = str(api.kubeconfig)
        result = self.run(*args, kubeconfig=kubeconfig)
        if expect_error is not None:
            assert result.returncode != 0, "rendered although it should have failed"
            assert expect_error in result.stderr, result.stderr
            return []
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def notes(self, values: dict[str, Any], workdir: Path) -> str:
        """NOTES.txt as `helm install` would print it with these values.

        `helm template` never renders NOTES.txt (and `helm install --dry-run` needs
        a cluster), so a copy of the chart gets a template that renders it inside
        a YAML document.

        Args:
            values: dotted value paths to JSON-able values.
            workdir: an empty folder for the copy of the chart.
        """
        copy = workdir / "citadel"
        # The CRDs are symbolic links to crds/: copy what they point at.
        shutil.copytree(CHART, copy)
        notes = (copy / "templates" / "NOTES.txt").read_text()
        (copy / "templates" / "zz-notes.yaml").write_text(
            '{{- define "test.notes" }}' + notes + "{{- end }}\n"
            "kind: Notes\n"
            'text: {{ include "test.notes" . | toJson }}\n'
        )
        args = ["template", RELEASE, str(copy), "--namespace", NAMESPACE]
        args += ["--show-only", "templates/zz-notes.yaml", *_set_args(values)]
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return str(yaml.safe_load(result.stdout)["text"])

    @staticmethod
    def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
        """The objects of one kind (and name)."""
        return [
            o
            for o in objs
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
        ]

    def one(self, objs: list[Obj], kind: str, name: str | None = None) -> Obj:
        """The single object of one kind (and name)."""
        found = self.find(objs, kind, name)
        assert len(found) == 1, (
            f"{len(found)} {kind} {name or ''} in {self.names(objs)}"
        )
        return found[0]

    @staticmethod
    def names(objs: list[Obj]) -> list[str]:
        """`Kind/namespace/name` of every object, for messages."""
        return [
            f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}"
            for o in objs
        ]

    @staticmethod
    def env_of(container: Obj) -> dict[str, Any]:
        """A container's env as name -> value (or its valueFrom)."""
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}

    @staticmethod
    def container(deployment: Obj) -> Obj:
        """The first container of a Deployment."""
        return deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def chart(helm: str) -> ChartKit:
    """The chart and helpers to render it."""
    return ChartKit(helm)
