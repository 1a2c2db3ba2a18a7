"""Turns a pydantic model's JSON Schema into a Kubernetes structural schema.

Kubernetes wants OpenAPI v3.0 without references: every `$ref` is inlined, optional
fields lose their `null` branch, JSON Schema 2020's numeric `exclusiveMinimum` becomes
v3.0's boolean form, and pydantic's titles and `null` defaults are dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

# Keys that pass through unchanged; anything else pydantic emits is dropped.
_KEEP = frozenset(
    {
        "type",
        "description",
        "enum",
        "pattern",
        "format",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "required",
        "default",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields",
    }
)


def structural_schema(model: type[BaseModel]) -> Schema:
    """The structural OpenAPI schema of `model`, with camelCase field names."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Schema] = raw.pop("$defs", {})
    return _convert(raw, defs)


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inlines a `$ref` (or a one-element allOf); sibling keys win over the target."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return {**_resolve(target, defs), **siblings}
    if len(node.get("allOf", ())) == 1:
        siblings = {k: v for k, v in node.items() if k != "allOf"}
        return {**_resolve(node["allOf"][0], defs), **siblings}
    return node


def _drop_null_branch(node: Schema, defs: dict[str, Schema]) -> Schema:
    branches = node.get("anyOf")
    if not branches:
        return node
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) == len(branches):
        return node  # a real union such as int-or-string: left to the schema below
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    if len(kept) == 1:
        return {**_resolve(kept[0], defs), **outer}
    return {**outer, "anyOf": kept}


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _drop_null_branch(_resolve(node, defs), defs)
    out: Schema = {}
    if node.get("x-kubernetes-int-or-string"):
        # The canonical int-or-string shape: anyOf of the two types, no `type`.
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for key, value in node.items():
        if key in _KEEP:
            out[key] = value
    if "description" in out:
        # Docstrings are wrapped at 88 columns; kubectl explain re-wraps anyway.
        out["description"] = " ".join(out["description"].split())
    if "const" in node:
        out["enum"] = [node["const"]]
    for bound, flag in (
        ("exclusiveMinimum", "minimum"),
        ("exclusiveMaximum", "maximum"),
    ):
        if bound in node:
            out[flag] = node[bound]
            out[bound] = True
    if out.get("default", 0) is None or out.get("default") == []:
        del out["default"]  # absent is the default for optional fields and lists
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {
            name: _convert(child, defs) for name, child in node["properties"].items()
        }
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], defs)
    if "items" in node:
        out["items"] = _convert(node["items"], defs)
    return out
