"""The chart as a whole: `helm lint`, the values schema, the generated values
reference, and CRDs that are the generated files themselves."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import ChartKit

pytestmark = pytest.mark.unit

LINT_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["llm"], "networkPolicy": {"enabled": True}},
    "ingress-hpa": {
        "gateway": {
            "ingress": {"enabled": True, "className": "nginx"},
            "autoscaling": {"enabled": True},
        }
    },
    "external-redis": {"redis": {"externalUrl": "redis://redis:6379/0"}},
    "auth-off": {"gateway": {"auth": "disabled", "adminKey": {"create": False}}},
    "own-admin-key": {
        "gateway": {"adminKey": {"existingSecret": "my-admin", "sha256": "0f" * 32}}
    },
}


@pytest.mark.parametrize("case", sorted(LINT_CASES))
def test_helm_lint_strict(chart: ChartKit, case: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(LINT_CASES[case]))
    result = chart.run("lint", "--strict", str(chart.path), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"gateway.replica": 2}, "additional properties 'replica' not allowed"),
        ({"operator.image.tag": "latest"}, "/operator/image/tag"),
        ({"gateway.auth": "maybe"}, "/gateway/auth"),
        (
            {"gateway.podLabels": {"app.kubernetes.io/component": "x"}},
            "gateway.podLabels may not set app.kubernetes.io/component: "
            "the Deployment's selector uses it",
        ),
        (
            {"operator.podLabels": {"app.kubernetes.io/instance": "x"}},
            "operator.podLabels may not set app.kubernetes.io/instance",
        ),
        ({"redis.externalUrl": "http://redis"}, "/redis/externalUrl"),
        ({"watchNamespaces": ["Bad_NS"]}, "/watchNamespaces/0"),
        ({"monitoring.rules.errorRatio": 2}, "/monitoring/rules/errorRatio"),
        ({"monitoring.rules.modelNotReadyFor": "soon"}, "modelNotReadyFor"),
        ({"gateway.ingress.hosts": []}, "/gateway/ingress/hosts"),
        # An Ingress rule without paths is refused by the API server at install.
        (
            {"gateway.ingress.hosts": [{"host": "a.example.com", "paths": []}]},
            "/gateway/ingress/hosts/0/paths",
        ),
        # Helm merges maps with the defaults: only a null empties this one. No
        # label would select every pod of the namespace.
        (
            {"networkPolicy.modelPodLabels": {"app.kubernetes.io/managed-by": None}},
            "/networkPolicy/modelPodLabels",
        ),
        ({"redis.image.tag": ""}, "redis.image.tag (or digest) must be set"),
        # A misspelled field would leave the one it meant as it was.
        (
            {"operator.podSecurityContext.runAsUSer": None},
            "/operator/podSecurityContext",
        ),
        (
            {"gateway.securityContext.allowPrivilegeEscalation": "no"},
            "/gateway/securityContext/allowPrivilegeEscalation",
        ),
        # The admin key's hash: 64 lowercase hex digits, no more, nothing else
        # (not the record's "sha256:" prefix, nor sha256sum's trailing " -").
        ({"gateway.adminKey.sha256": "ABCD" * 16}, "/gateway/adminKey/sha256"),
        ({"gateway.adminKey.sha256": "abcd" * 15}, "/gateway/adminKey/sha256"),
        (
            {"gateway.adminKey.sha256": "sha256:" + "abcd" * 16},
            "/gateway/adminKey/sha256",
        ),
        ({"gateway.adminKey.sha256": "abcd" * 16 + "  -"}, "/gateway/adminKey/sha256"),
        (
            {"gateway.adminKey.existingSecret": "My_Secret"},
            "at '/gateway/adminKey/existingSecret'",
        ),
        (
            {"gateway.adminKey.existingSecretKey": ""},
            "at '/gateway/adminKey/existingSecretKey'",
        ),
    ],
)
def test_schema_refuses_bad_values(
    chart: ChartKit, values: dict[str, Any], error: str
) -> None:
    chart.render(values, expect_error=error)


def walk(node: dict[str, Any], root: dict[str, Any], path: str) -> list[str]:
    """Paths of schema objects that accept unknown keys or lack a description."""
    problems = []
    if "$ref" in node:
        ref = node["$ref"].removeprefix("#/definitions/")
        node = {**root["definitions"][ref], **node}
    if path and not node.get("description"):
        problems.append(f"{path}: no description")
    if node.get("type") == "object" and "properties" in node:
        if node.get("additionalProperties") is not False:
            problems.append(f"{path}: accepts unknown keys")
        for key, child in node["properties"].items():
            problems += walk(child, root, f"{path}.{key}" if path else key)
    return problems


def test_schema_is_strict_and_described(chart: ChartKit) -> None:
    schema = json.loads((chart.path / "values.schema.json").read_text())
    assert walk(schema, schema, "") == []


def test_values_reference_in_install_guide_is_fresh(
    script: Callable[[str], ModuleType],
) -> None:
    reference = script("values_reference")
    doc = reference.DOC.read_text()
    assert reference.render_doc(doc) == doc, "run `make chart-docs`"
    assert "| `gateway.ingress.className` |" in doc


def test_crds_are_the_generated_files(chart: ChartKit) -> None:
    root_crds = chart.root / "crds"
    for name in ("llmmodels.citadel.ai.yaml", "kopf-peering.yaml"):
        link = chart.root / "charts/citadel/crds" / name
        assert link.is_symlink(), f"{link} must be a link to crds/{name}"
        assert link.resolve() == (root_crds / name).resolve()


def test_helm_show_crds_gives_every_crd(chart: ChartKit) -> None:
    """docs/install.md upgrades the CRDs by piping this to kubectl apply: helm
    joins the files with nothing between them, so no CRD may merge into the
    one before it."""
    result = chart.run("show", "crds", str(chart.path))
    assert result.returncode == 0, result.stderr
    crds = [d["metadata"]["name"] for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted(crds) == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
        "llmmodels.citadel.ai",
    ]


def test_helm_package_ships_the_crd_content(chart: ChartKit, tmp_path: Path) -> None:
    result = chart.run("package", str(chart.path), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("citadel-*.tgz")
    with tarfile.open(package) as tar:
        for name in ("llmmodels.citadel.ai.yaml", "kopf-peering.yaml"):
            member = tar.extractfile(f"citadel/crds/{name}")
            assert member is not None
            shipped = member.read()
            assert shipped == (chart.path / "crds" / name).read_bytes()
            kinds = {d["kind"] for d in yaml.safe_load_all(shipped) if d}
            assert kinds == {"CustomResourceDefinition"}
        files = tar.getnames()
    assert "citadel/values.schema.json" in files
    assert {f for f in files if f.startswith("citadel/dashboards/")} == {
        f"citadel/dashboards/{n}"
        for n in ("overview.json", "model-serving.json", "key-usage.json")
    }
