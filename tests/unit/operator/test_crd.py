"""The CRD: generated from the typed models, strict, and committed up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from citadel.operator import names
from citadel.operator.crd import llmmodel_crd, openapi_schema
from citadel.operator.generate import main, render_files
from citadel.operator.schema import structural_schema
from citadel.operator.spec import LLMModelSpec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("relative", sorted(render_files()))
def test_committed_file_is_up_to_date(relative: str) -> None:
    committed = ROOT / relative
    assert committed.exists(), f"{relative} is missing: run `make crds`"
    assert committed.read_text() == render_files()[relative], (
        f"{relative} is stale: run `make crds` and commit the result"
    )


def test_generator_writes_every_file(tmp_path: Path) -> None:
    assert main([str(tmp_path)]) == 0
    for relative, text in render_files().items():
        assert (tmp_path / relative).read_text() == text


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_schema_is_structural() -> None:
    for path, node in _walk(openapi_schema()):
        assert "$ref" not in node and "allOf" not in node and "title" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        else:
            assert node.get("type") in {
                "object",
                "array",
                "string",
                "integer",
                "number",
                "boolean",
            }, path
        assert node.get("default", 0) is not None, path


def test_every_spec_field_is_described() -> None:
    spec = openapi_schema()["properties"]["spec"]
    missing = [
        path
        for path, node in _walk(spec)
        if path
        and not path.endswith(("[]", "{}"))
        and not node.get("description")
        and not path.startswith(".placement.tolerations[].operator")
        and "enum" not in node
    ]
    assert missing == []


def test_bounds_and_enums_are_in_the_schema() -> None:
    spec = structural_schema(LLMModelSpec)["properties"]
    assert spec["replicas"]["minimum"] == 0
    gpus = spec["resources"]["properties"]["gpus"]
    assert (gpus["minimum"], gpus["maximum"]) == (0, 64)
    util = spec["engine"]["properties"]["gpuMemoryUtilization"]
    assert util["minimum"] == 0 and util["exclusiveMinimum"] is True
    assert util["maximum"] == 1
    assert "bfloat16" in spec["engine"]["properties"]["dtype"]["enum"]
    assert spec["routing"]["properties"]["strategy"]["enum"][0] == "round-robin"
    assert spec["model"]["pattern"].startswith("^")


def test_cel_rules_are_attached() -> None:
    spec = openapi_schema()["properties"]["spec"]
    placement = spec["properties"]["placement"]
    assert "nodeName" in placement["x-kubernetes-validations"][0]["rule"]
    extra = spec["properties"]["engine"]["properties"]["extraArgs"]
    assert "--model" in extra["x-kubernetes-validations"][0]["message"]
    size = spec["properties"]["cache"]["properties"]["size"]
    assert "oldSelf" in size["x-kubernetes-validations"][0]["rule"]


def test_name_is_limited_so_derived_names_stay_legal() -> None:
    name = openapi_schema()["properties"]["metadata"]["properties"]["name"]
    # <name>-<pod-template-hash (10)> must still be a 63-character DNS label.
    assert name["maxLength"] + 1 + 10 <= 63
    assert name["pattern"] == names.DNS1035_LABEL


def test_crd_has_columns_short_names_and_subresources() -> None:
    crd = llmmodel_crd()
    assert crd["metadata"]["name"] == "llmmodels.citadel.ai"
    assert "llm" in crd["spec"]["names"]["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:7] == [
        "Served",
        "Phase",
        "Ready",
        "Replicas",
        "GPUs",
        "Node",
        "Age",
    ]
