"""The CRD: generated from the typed models, strict, and committed up to date."""

from __future__ import annotations

import ipaddress
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from citadel.operator import names
from citadel.operator.crd import llmmodel_crd, openapi_schema
from citadel.operator.generate import main, render_files
from citadel.operator.schema import structural_schema
from citadel.operator.spec import (
    FALLBACKS_MESSAGE,
    IMAGE_PATTERN,
    LABEL_VALUE,
    LAST_ARG_RULE,
    MODEL_SOURCE_PATTERN,
    PVC_DOT_DOT_PATTERN,
    QUALIFIED_NAME,
    SPLIT_MESSAGE,
    SPLIT_WEIGHTS_MESSAGE,
    LLMModelSpec,
)

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


def _at(path: str) -> dict[str, Any]:
    """The schema node at a dotted path under spec (`[]`: a list's items)."""
    node = openapi_schema()["properties"]["spec"]
    for part in path.split("."):
        items = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if items:
            node = node["items"]
    return node


def _rules(path: str) -> list[dict[str, str]]:
    rules: list[dict[str, str]] = _at(path).get("x-kubernetes-validations", [])
    return rules


def _all_rules() -> list[dict[str, str]]:
    return [
        rule
        for _, node in _walk(openapi_schema())
        for rule in node.get("x-kubernetes-validations", ())
    ]


def test_every_rule_says_what_to_fix() -> None:
    for rule in _all_rules():
        assert len(rule.get("message", "")) > 20, rule


# What the rules may call: each was compiled in Kubernetes 1.30's CEL environment,
# the oldest the chart supports (apiextensions-apiserver's cel.Compile with
# environment.MustBaseEnvSet(1.30)). `format.*` came in 1.31, and `sign` is a
# function there, not a method: `quantity(x).sign()` does not compile.
CEL_CALLS_OF_KUBERNETES_1_30 = {
    "all",
    "compareTo",
    "has",
    "indexOf",
    "isGreaterThan",
    "isLessThan",
    "isQuantity",
    "lowerAscii",
    "map",  # CEL's standard macros, in every release
    "matches",
    "quantity",
    "size",  # CEL's standard library, in every release
    "startsWith",
    "sum",  # Kubernetes' lists library, in every release's base environment
    "type",
}


def test_rules_call_only_what_kubernetes_1_30_offers() -> None:
    for rule in _all_rules():
        # Not inside string literals: a pattern's `pi(p(e...)?)?` calls nothing.
        code = re.sub(r"'[^']*'", "''", rule["rule"])
        called = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", code))
        assert called <= CEL_CALLS_OF_KUBERNETES_1_30, rule["rule"]
        assert "format." not in rule["rule"], rule["rule"]


def test_affinity_shape_is_checked_and_the_rest_kept() -> None:
    affinity = _at("placement.affinity")
    assert affinity["x-kubernetes-preserve-unknown-fields"] is True
    required = _at(
        "placement.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
    )
    terms = required["properties"]["nodeSelectorTerms"]
    # A map where the list belongs is refused by the API server at once.
    assert terms["type"] == "array"
    assert terms["items"]["type"] == "object"
    assert terms["items"]["x-kubernetes-preserve-unknown-fields"] is True
    for name in ("matchExpressions", "matchFields"):
        assert terms["items"]["properties"][name]["type"] == "array"
    for kind in ("podAffinity", "podAntiAffinity"):
        for when in ("required", "preferred"):
            field = f"{when}DuringSchedulingIgnoredDuringExecution"
            assert _at(f"placement.affinity.{kind}")["properties"][field]["items"] == {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
            }


@pytest.mark.parametrize(
    ("path", "rule", "message"),
    [
        ("placement.tolerations[]", "self.operator == 'Exists'", "without a key"),
        ("placement.tolerations[]", "self.key.matches(", "qualified name"),
        ("placement.tolerations[]", "self.value == ''", "leave value out"),
        ("placement.tolerations[]", "'NoExecute'", "needs effect NoExecute"),
        ("placement.nodeSelector", "self.all(k, k.matches(", "qualified names"),
        ("pod.labels", "self.all(k, k.matches(", "qualified names"),
        ("pod.annotations", "k.lowerAscii().matches(", "qualified names"),
        ("engine.env[]", "has(self.valueFrom)", "value or valueFrom, not both"),
        ("engine.image", "self.matches(", "lowercase repository path"),
        ("adapters[].source", "!self.startsWith('s3://')", "cannot be s3://"),
        ("resources.cpu", "isLessThan(quantity('0'))", "at least 0"),
        ("resources.memory", "isLessThan(quantity('0'))", "at least 0"),
        ("engine.shmSize", "isLessThan(quantity('0'))", "at least 0"),
        ("cache.size", "isGreaterThan(quantity('0'))", "greater than 0"),
    ],
)
def test_admission_rules_are_attached(path: str, rule: str, message: str) -> None:
    assert any(rule in r["rule"] and message in r["message"] for r in _rules(path))


def test_a_read_write_once_pod_cache_needs_one_pod() -> None:
    rule = next(
        r
        for r in openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
        if "ReadWriteOncePod" in r["rule"]
    )
    assert rule["fieldPath"] == ".cache.accessMode"
    assert "self.replicas <= 1" in rule["rule"]
    assert "self.rollout.maxSurge == 0" in rule["rule"]
    assert "only one pod" in rule["message"]


def test_quantities_cannot_be_negative_integers() -> None:
    for path in ("resources.cpu", "resources.memory"):
        node = _at(path)
        assert node["x-kubernetes-int-or-string"] and node["minimum"] == 0


def test_env_is_a_map_keyed_by_name_with_string_values() -> None:
    env = _at("engine.env")
    assert env["x-kubernetes-list-type"] == "map"
    assert env["x-kubernetes-list-map-keys"] == ["name"]
    assert env["items"]["required"] == ["name"]
    assert env["items"]["properties"]["value"]["type"] == "string"
    assert _at("placement.tolerations[]")["properties"]["value"]["pattern"] == (
        LABEL_VALUE
    )


def _legal_image(image: str) -> bool:
    """The image rule's verdict. The API server matches with RE2 (Go's regexp),
    Python's `re` here: the same answers for these patterns (no lookarounds or
    backreferences, which RE2 lacks), but `re` warns that `[[]` might one day
    open a nested set; RE2 has no nested sets, and `re` reads it as RE2 does, as
    the bracket itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Possible nested set", FutureWarning)
        return bool(re.search(IMAGE_PATTERN, image))


# The patterns the rules match with (RE2 in the API server; the same here).
@pytest.mark.parametrize(
    ("image", "legal"),
    [
        ("vllm/vllm-openai:v0.33.0", True),
        ("vllm/vllm-openai:Latest", True),
        ("registry.example.com/ml/vllm-openai:v0.8.5-CUDA12", True),
        ("Registry.Example.com:5000/ml/vllm_openai__x:v1", True),
        ("localhost/vllm", True),
        ("localhost:5000/a/b.c-d:_tag", True),
        ("vllm/vllm-openai@sha256:" + "a" * 64, True),
        ("ghcr.io/a/b:v1@sha256:" + "0" * 64, True),
        ("vllm/VLLM-openai:latest", False),
        ("Vllm/vllm-openai", False),
        ("vllm/vllm openai", False),
        ("vllm/vllm-openai:", False),
        ("vllm/vllm-openai:-dash", False),
        ("vllm/x:" + "a" * 129, False),
        ("vllm//x", False),
        ("vllm/x@sha256:abc", False),
        # A registry host may be an IPv6 address in brackets, with a port or not.
        ("[fd00::1]:5000/vllm/vllm-openai:v0.8.0", True),
        ("[::1]/repo/img@sha256:" + "a" * 64, True),
        ("[2001:DB8:0:0:0:0:0:1]:443/ml/vllm", True),
        ("[::]/vllm", True),
        ("[::1/repo/img", False),
        ("::1]/repo/img", False),
        ("[::1]", False),
        ("[::1]:/vllm", False),
        ("[::1]/Vllm", False),
        ("[]/vllm", False),
        ("[registry]/vllm", False),
        ("[registry.example.com]/vllm", False),
        ("[192.0.2.1]:5000/vllm", False),
        # Refused by the distribution grammar too.
        ("[::ffff:192.0.2.1]/vllm", False),
        ("[fe80::1%eth0]/vllm", False),
    ],
)
def test_image_pattern_follows_the_oci_grammar(image: str, legal: bool) -> None:
    assert _legal_image(image) is legal


def _ipv6_spellings() -> list[str]:
    """1:2:...:8 with each run of groups (none too) left out for a "::", and
    malformed neighbours: too many groups, a group too long, colons astray."""
    groups = [str(n) for n in range(1, 9)]
    compressed = [
        f"{':'.join(groups[:start])}::{':'.join(groups[end:])}"
        for start in range(9)
        for end in range(start, 9)
    ]
    malformed = ["1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "12345::1", "1::2::3"]
    astray = [":1", "1:", ":::", "1:::2", "0:0"]
    return [":".join(groups), *compressed, *malformed, *astray]


@pytest.mark.parametrize("address", _ipv6_spellings())
def test_image_pattern_takes_exactly_the_ipv6_addresses(address: str) -> None:
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        valid = False
    else:
        valid = True
    assert _legal_image(f"[{address}]:5000/vllm") is valid


@pytest.mark.parametrize(
    ("key", "legal"),
    [
        ("gpu", True),
        ("Simple_Key.x-1", True),
        ("example.com/gpu-type", True),
        ("kubernetes.io/hostname", True),
        ("a" * 63, True),
        ("a" * 253 + "/" + "b" * 63, True),
        ("gpu type", False),
        ("a" * 64, False),
        ("a" * 254 + "/b", False),
        ("Example.com/x", False),
        ("-gpu", False),
        ("gpu-", False),
        ("/gpu", False),
        ("example.com/", False),
        ("a/b/c", False),
        ("", False),
    ],
)
def test_qualified_name_pattern(key: str, legal: bool) -> None:
    # The 253-character limit of the prefix is the rule's indexOf, not the pattern.
    matches = bool(re.search(QUALIFIED_NAME, key)) and key.find("/") <= 253
    assert matches is legal


def _re2_search(pattern: str, text: str) -> bool:
    """CEL's `text.matches(pattern)` as the API server answers it, with RE2, for
    patterns anchored `^...$`: `re` with `$` read as RE2 reads it, the end of
    the text (Python's `$` also matches before a final newline, which hid
    `--port=9000` followed by one). `.` is alike: no newline unless `(?s)`."""
    assert pattern.count("$") == 1 and pattern.endswith("$"), pattern
    # Not a CEL escape: the literal would not reach RE2 as written.
    assert "\\" not in pattern, pattern
    return re.search(pattern[:-1] + r"\Z", text) is not None


def _refusing_message(arg: str) -> str | None:
    """The message of the engine.extraArgs rule that refuses a list holding `arg`,
    None when each takes it. Each rule is `self.all(a, !a.matches('...'))`."""
    for rule in _rules("engine.extraArgs"):
        if rule["rule"] == LAST_ARG_RULE:  # on the list's last element alone
            continue
        found = re.fullmatch(r"self\.all\(a, !a\.matches\('(.*)'\)\)", rule["rule"])
        assert found, rule["rule"]
        if _re2_search(found.group(1), arg):
            return rule["message"]
    return None


def _assert_refused(arg: str, message: str | None) -> None:
    """That the engine.extraArgs rule saying `message` refuses `arg`, or, with
    None, that each rule takes it."""
    refused = _refusing_message(arg)
    if message is None:
        assert refused is None, arg
    else:
        assert refused is not None and message in refused, arg


WORLD = "resources.gpus sets the tensor-parallel size"
LISTENER = "the probes and the gateway speak plain HTTP"


# Each spelling below was checked against vLLM 0.32's own parser: those refused
# set the flag named (argparse takes unambiguous prefixes, the parser `_` for
# `-`), those taken set none of them.
@pytest.mark.parametrize(
    ("arg", "message"),
    [
        # More GPUs than the pod has: vLLM refuses to start ("World size (4) is
        # larger than the number of available GPUs (2)").
        ("--pipeline-parallel-size=2", WORLD),
        ("--pipeline-parallel-size", WORLD),
        ("--pipeline_parallel_size=2", WORLD),
        ("--pipeline-parallel=2", WORLD),
        ("--pi", WORLD),
        ("-pp", WORLD),
        ("-pp=2", WORLD),
        ("--prefill-context-parallel-size=2", WORLD),
        ("--prefill_c=2", WORLD),
        ("-pcp", WORLD),
        ("-pc", WORLD),
        ("--data-parallel-size=2", WORLD),
        ("--data_parallel_size", WORLD),
        ("--data-parallel-si=2", WORLD),
        ("-dp", WORLD),
        ("--data-parallel-size-local=2", WORLD),
        ("-dpl=2", WORLD),
        ("--data-parallel-rank=1", WORLD),
        ("-dpn", WORLD),
        ("--data-parallel-start-rank=1", WORLD),
        ("-dpr", WORLD),
        # Other nodes, which the pod never meets.
        ("--nnodes=2", WORLD),
        ("--nn", WORLD),
        ("-n", WORLD),
        ("-n2", WORLD),
        ("--node-rank=1", WORLD),
        ("--node_rank", WORLD),
        ("-r1", WORLD),
        # Not plain HTTP on the pod's port.
        ("--uds=/tmp/vllm.sock", LISTENER),
        ("--uds", LISTENER),
        ("--ud", LISTENER),
        ("--ssl-keyfile=/tls/key.pem", LISTENER),
        ("--ssl_keyfile", LISTENER),
        ("--ssl-k=/tls/key.pem", LISTENER),
        ("--ssl-certfile=/tls/cert.pem", LISTENER),
        ("--ssl-certf", LISTENER),
        # A final newline, as a YAML block scalar (`- |`) leaves it: vLLM's
        # parser reads int("4\n") as 4, and a path up to it.
        ("--pipeline-parallel-size=4\n", WORLD),
        ("-pp=2\n", WORLD),
        ("-n2\n", WORLD),
        ("-r\n1", WORLD),
        ("--uds=/x\n", LISTENER),
        ("--ssl-keyfile=/tls/key.pem\n", LISTENER),
        ("--ssl-certfile=/tls/\ncert.pem", LISTENER),
        # A dotted key: vLLM's parser makes `--uds.x=y` into `--uds '{"x": "y"}'`,
        # a socket of that name, and `--pi.x 2` into an int it refuses.
        ("--uds.x=y", LISTENER),
        ("--ud.x", LISTENER),
        ("--ssl_keyfile.x=y", LISTENER),
        ("--pipeline-parallel-size.x=2", WORLD),
        ("--pi.x", WORLD),
        ("-pp.x=2", WORLD),
        # Taken: none of those flags.
        ("--enable-prefix-caching", None),
        ("--max-num-seqs", None),
        ("128", None),
        ("-O3", None),
        ("--enforce-eager", None),
        ("--decode-context-parallel-size=2", None),  # within the TP ranks
        ("-dcp", None),
        ("--data-parallel-backend=mp", None),
        ("--data-parallel-supervisor-port=9000", None),
        ("--enable-expert-parallel", None),
        ("-ep", None),
        ("--api-server-count=2", None),
        ("--numa-bind-nodes", None),
        ("--no-enable-log-requests", None),
        ("--ssl-ca-certs=/tls/ca.pem", None),
        # vLLM's app keeps serving /health and /v1 at the root under it.
        ("--root-path=/llm", None),
        ("--max-model-len=32k", None),
        ("--max-num-seqs=128\n", None),
        ("--enable-prefix-caching\n", None),
        # Dotted keys of other flags, as vLLM documents them for its JSON ones.
        ("--speculative-config.num_speculative_tokens=3", None),
        ("--compilation-config.mode", None),
    ],
)
def test_extra_args_may_not_change_the_world_or_the_listener(
    arg: str, message: str | None
) -> None:
    _assert_refused(arg, message)


def test_the_operators_own_flags_keep_the_first_extra_args_rule() -> None:
    assert _refusing_message("-tp=4") == _rules("engine.extraArgs")[0]["message"]
    assert _refusing_message("--port=9000") == _rules("engine.extraArgs")[0]["message"]
    for arg in ("--port=9000\n", "-tp=4\n", "--host=::\n", "--model=\n/x"):
        assert _refusing_message(arg) == _rules("engine.extraArgs")[0]["message"], arg


MANAGED = "the operator sets them from the spec"


# Checked against vLLM 0.32's parser like those above. The operator's own flags
# come after extraArgs and a flag keeps its last value, but the parser moves a
# dotted one (`--ser.x=y`, `--served-model-name '{"x": "y"}'`) after them all:
# vLLM would serve another name than the one the gateway asks for.
@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--served-model-name.x=y", MANAGED),
        ("--served_model.x=y", MANAGED),
        ("--ser.x", MANAGED),
        ("--ser=other", MANAGED),
        ("--host.x=y", MANAGED),
        ("--ho=::", MANAGED),
        ("--model.x=y", MANAGED),
        ("--port.x=1", MANAGED),
        ("--por=9000", MANAGED),
        ("--te=2", MANAGED),
        ("--tensor_parallel.x=2", MANAGED),
        ("-tp.x=2", MANAGED),
        # Taken: other flags these begin.
        ("--seed=1", None),
        ("--hf-token=x", None),
        ("--headless", None),
        ("--pooler-config={}", None),
        ("--model-impl=vllm", None),
        ("--model_loader_extra_config.x=1", None),
        ("--tokenizer=x", None),
    ],
)
def test_extra_args_may_not_set_the_operators_flags_in_any_spelling(
    arg: str, message: str | None
) -> None:
    _assert_refused(arg, message)


API_KEY = "vLLM would answer 401 to every request the gateway sends"


# Checked against vLLM 0.32's parser like those above. /health, the probe, needs
# no key: the model would look Ready and answer nothing.
@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--api-key=K", API_KEY),
        ("--api-key", API_KEY),
        ("--api_key", API_KEY),
        ("--api_key=K", API_KEY),
        ("--api-k", API_KEY),
        ("--api-ke=K", API_KEY),
        ("--api_k=K", API_KEY),
        ("--api-key.x=K", API_KEY),
        ("--api-k.x", API_KEY),
        ("--api-key=K\n", API_KEY),
        # Taken: the other flag it begins like, whole or abbreviated.
        ("--api-server-count=2", None),
        ("--api-s=2", None),
        ("-asc=2", None),
    ],
)
def test_extra_args_may_not_set_an_api_key(arg: str, message: str | None) -> None:
    _assert_refused(arg, message)


def test_env_may_not_set_vllms_api_key() -> None:
    # vLLM takes the key from VLLM_API_KEY when --api-key is not given.
    rule = next(r for r in _rules("engine.env[]") if "VLLM_API_KEY" in r["rule"])
    assert rule["rule"] == "self.name != 'VLLM_API_KEY'"
    assert API_KEY in rule["message"]


CONFIG = "put the flags in engine.extraArgs instead"


# Checked against vLLM 0.32's parser like those above: `--config FILE` reads
# flags from a YAML file (a claim's or the image's), unchecked; `--config=FILE`
# is kept and ignored. No abbreviation: each also begins --config-format.
@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--config", CONFIG),
        ("--config=/model-source/vllm.yaml", CONFIG),
        ("--config.x=y", CONFIG),
        ("--config-format=auto", None),
        ("--config_format=auto", None),
        ("--config-f=auto", None),
        ("--hf-config-path=/model-source", None),
        ("--compilation-config={}", None),
    ],
)
def test_extra_args_may_not_name_a_config_file(arg: str, message: str | None) -> None:
    _assert_refused(arg, message)


def _last_arg_refused(args: list[str]) -> bool:
    """Whether LAST_ARG_RULE refuses `args`, as the API server would (RE2)."""
    found = re.fullmatch(
        r"self\.size\(\) == 0 \|\| !self\[self\.size\(\) - 1\]\.matches\('(.*)'\)",
        LAST_ARG_RULE,
    )
    assert found, LAST_ARG_RULE
    return bool(args) and _re2_search(found.group(1), args[-1])


# Checked against vLLM 0.32's parser with the operator's flags after extraArgs:
# the dotted flags refused made it read `--model=...` as their value (vLLM's
# default model, served under this one's name); a negative number last, read as
# a dotted flag too, and `-O.mode`, lack their value whatever follows.
@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["--hf-overrides.x"], True),
        (["--hf-overrides", "{}", "--speculative-config.num_speculative_tokens"], True),
        (["--max-logprobs", "-0.5"], True),
        (["-O.mode"], True),
        (["--hf-overrides.x\n"], True),
        (["--hf-overrides.x", "-O=--hf-overrides.y"], True),
        # vLLM's parser would keep the model here, but a value that starts
        # with '-' next is what the message says to write with '='.
        (["--hf-overrides.x", "-0.5"], True),
        (["--hf-overrides.x=-0.5"], False),
        (["-O=3"], False),
        (["--hf-overrides.x", "1"], False),
        (["--hf-overrides.x=1"], False),
        (["--max-model-len", "4096"], False),
        (["--tokenizer", "org/model.v2"], False),
        (["--chat-template=/t/a.jinja"], False),
        ([], False),
    ],
)
def test_extra_args_may_not_end_with_a_dotted_flag_without_its_value(
    args: list[str], refused: bool
) -> None:
    assert _last_arg_refused(args) is refused
    assert any(r["rule"] == LAST_ARG_RULE for r in _rules("engine.extraArgs"))


LORA = "the operator sets them from spec.adapters"


# Checked against vLLM 0.32's parser like those above: each refused sets
# --lora-modules, --enable-lora, --max-lora-rank or --max-loras (or makes vLLM
# refuse a dotted key it cannot read); those taken set none of them.
@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--lora-modules", LORA),
        ("--lora-modules=sql=/adapters/sql", LORA),
        ("--lora_modules", LORA),
        ("--lora-m", LORA),
        ("--lora-m=sql=/x", LORA),
        ("--lora-modules.x=y", LORA),
        ("--enable-lora", LORA),
        ("--enable_lora", LORA),
        ("--enable-lor", LORA),
        ("--enable-lora.x=y", LORA),
        ("--max-lora-rank=8", LORA),
        ("--max_lora_rank", LORA),
        ("--max-lora-r=8", LORA),
        ("--max-lora-rank.x=8", LORA),
        ("--max-loras=2", LORA),
        ("--max_loras", LORA),
        ("--max-loras.x=2", LORA),
        ("--max-loras=2\n", LORA),
        # Taken: the other LoRA settings, and flags these begin.
        ("--lora-dtype=auto", None),
        ("--lora-target-modules", None),
        ("--max-cpu-loras=4", None),
        ("--max-lora-cls-labels=3", None),
        ("--fully-sharded-loras", None),
        ("--no-enable-lora", None),
        ("--enable-log-requests", None),
        ("--max-logprobs=5", None),
        ("--long-prefill-token-threshold=0", None),
    ],
)
def test_extra_args_may_not_set_the_lora_flags(arg: str, message: str | None) -> None:
    _assert_refused(arg, message)


def test_adapters_are_a_map_keyed_by_name() -> None:
    # A name given twice is refused by the API server, which names it.
    adapters = _at("adapters")
    assert adapters["x-kubernetes-list-type"] == "map"
    assert adapters["x-kubernetes-list-map-keys"] == ["name"]
    assert adapters["maxItems"] == 32
    assert adapters["items"]["required"] == ["name", "source"]
    # Each is a model name, as the served name is.
    name, served = _at("adapters[].name"), _at("servedName")
    assert (name["pattern"], name["maxLength"]) == (
        served["pattern"],
        served["maxLength"],
    )


@pytest.mark.parametrize(
    "source",
    [
        "org/sql-lora",
        "sql-lora",
        "pvc://adapters/support-bot/v3",
        "pvc://adapters/",
        "/opt/adapters/sql",
        "s3://bucket/sql",  # the pattern's, refused by the rule with its message
    ],
)
def test_adapter_sources_take_the_models_forms(source: str) -> None:
    assert _at("adapters[].source")["pattern"] == MODEL_SOURCE_PATTERN
    assert _re2_search(MODEL_SOURCE_PATTERN, source)
    assert [r["rule"] for r in _rules("adapters[].source")] == [
        "!self.startsWith('s3://')",
        f"!self.matches('{PVC_DOT_DOT_PATTERN}')",
    ]
    assert not _re2_search(PVC_DOT_DOT_PATTERN, source)


@pytest.mark.parametrize(
    ("source", "refused"),
    [
        ("pvc://x/../y/b", True),
        ("pvc://x/..", True),
        ("pvc://x/a/../../b", True),
        ("pvc://x/a/..", True),
        ("pvc://x/a..b/c", False),
        ("pvc://x/..a/b", False),
        ("pvc://x/a/b..", False),
        ("pvc://x/.../b", False),
        ("/opt/../adapters", False),  # a path in the image, as any absolute one
    ],
)
def test_a_pvc_adapter_path_may_not_leave_its_claim(source: str, refused: bool) -> None:
    assert _re2_search(PVC_DOT_DOT_PATTERN, source) is refused


def test_a_pvc_model_path_may_not_leave_its_claim() -> None:
    # The model's claim is mounted at /model-source as an adapter's at
    # /adapters/<claim>: the same rule, its message naming the field.
    (rule,) = _rules("model")
    assert rule["rule"] == f"!self.matches('{PVC_DOT_DOT_PATTERN}')"
    assert rule["message"].startswith("model: a pvc:// source's path may not hold")


def _spec_rule(fragment: str) -> dict[str, str]:
    rules = openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
    found: dict[str, str] = next(r for r in rules if fragment in r["rule"])
    return found


def _object_rule(field_path: str) -> dict[str, str]:
    """The rule on the whole object whose fieldPath is `field_path`."""
    rules = openapi_schema()["x-kubernetes-validations"]
    (found,) = [r for r in rules if r["fieldPath"] == field_path]
    rule: dict[str, str] = found
    return rule


def test_an_adapter_may_not_take_the_served_name_or_an_alias() -> None:
    rule = _spec_rule("self.adapters.all(")
    assert "a.name != self.servedName" in rule["rule"]
    assert "!(a.name in self.aliases)" in rule["rule"]
    assert rule["fieldPath"] == ".adapters"
    assert "rename the adapter" in rule["message"]


def test_an_adapter_may_not_take_the_model_name_that_serves_it() -> None:
    # Without servedName the served name is metadata.name, which only a rule on
    # the whole object can read.
    rule = _object_rule(".spec.adapters")
    assert rule["rule"] == (
        "!has(self.spec.adapters) || has(self.spec.servedName) || "
        "self.spec.adapters.all(a, a.name != self.metadata.name)"
    )
    assert rule["fieldPath"] == ".spec.adapters"
    assert "metadata.name when servedName is absent" in rule["message"]


def test_lora_limits_are_vllms_and_need_adapters() -> None:
    rank = _at("engine.maxLoraRank")
    assert rank["enum"] == [1, 8, 16, 32, 64, 128, 256, 320, 512]
    assert "default" not in rank
    loras = _at("engine.maxLoras")
    assert (loras["minimum"], loras["maximum"]) == (1, 32)
    rule = _spec_rule("self.engine.maxLoraRank")
    assert rule["rule"] == (
        "(has(self.adapters) && self.adapters.size() > 0) || !has(self.engine) || "
        "(!has(self.engine.maxLoraRank) && !has(self.engine.maxLoras))"
    )
    assert rule["fieldPath"] == ".engine"
    assert "spec.adapters" in rule["message"]


def test_an_adapter_spec_parses() -> None:
    spec = LLMModelSpec.model_validate(
        {
            "model": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
            "adapters": [{"name": "sql-expert", "source": "org/sql-lora"}],
            "engine": {"maxLoraRank": 64, "maxLoras": 2},
        }
    )
    assert [(a.name, a.source) for a in spec.adapters] == [
        ("sql-expert", "org/sql-lora")
    ]
    assert (spec.engine.max_lora_rank, spec.engine.max_loras) == (64, 2)


def test_autoscaling_bounds_and_defaults() -> None:
    scaling = _at("autoscaling")
    assert scaling["required"] == ["maxReplicas"]
    assert "default" not in scaling  # absent: no autoscaling at all
    props = scaling["properties"]
    assert (props["minReplicas"]["minimum"], props["minReplicas"]["maximum"]) == (
        0,
        64,
    )
    assert props["minReplicas"]["default"] == 1
    assert (props["maxReplicas"]["minimum"], props["maxReplicas"]["maximum"]) == (
        1,
        64,
    )
    assert "default" not in props["maxReplicas"]
    target = props["targetRequests"]
    assert (target["minimum"], target["maximum"], target["default"]) == (
        1,
        100_000,
        8,
    )
    delay = props["scaleDownDelaySeconds"]
    assert (delay["minimum"], delay["maximum"], delay["default"]) == (0, 86_400, 300)


def test_autoscaling_min_may_not_exceed_max() -> None:
    (rule,) = _rules("autoscaling")
    assert rule["rule"] == (
        "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas"
    )
    assert rule["fieldPath"] == ".minReplicas"
    assert "lower minReplicas or raise maxReplicas" in rule["message"]


def test_a_read_write_once_pod_cache_caps_the_autoscaler_at_one_pod() -> None:
    rule = _spec_rule("self.autoscaling.maxReplicas")
    assert rule["rule"] == (
        "!has(self.cache) || !has(self.cache.accessMode) || "
        "self.cache.accessMode != 'ReadWriteOncePod' || "
        "!has(self.autoscaling) || self.autoscaling.maxReplicas <= 1"
    )
    assert rule["fieldPath"] == ".autoscaling.maxReplicas"
    assert "only one pod" in rule["message"]
    assert "autoscaling.maxReplicas <= 1" in rule["message"]


def test_an_autoscaling_spec_parses_with_its_defaults() -> None:
    spec = LLMModelSpec.model_validate(
        {"model": "org/model", "autoscaling": {"maxReplicas": 4}}
    )
    assert spec.autoscaling is not None
    assert spec.autoscaling.min_replicas == 1
    assert spec.autoscaling.max_replicas == 4
    assert spec.autoscaling.target_requests == 8
    assert spec.autoscaling.scale_down_delay_seconds == 300
    assert LLMModelSpec.model_validate({"model": "org/model"}).autoscaling is None


def test_fallbacks_are_a_short_set_of_model_names() -> None:
    fallbacks = _at("routing.fallbacks")
    assert fallbacks["type"] == "array"
    assert fallbacks["maxItems"] == 4
    # A set: the API server refuses a name given twice, naming it.
    assert fallbacks["x-kubernetes-list-type"] == "set"
    # Absent and empty alike: nothing written into the stored object.
    assert "default" not in fallbacks
    # Each is a model name, as the served name is.
    served = _at("servedName")
    assert fallbacks["items"] == {
        "type": "string",
        "pattern": served["pattern"],
        "maxLength": served["maxLength"],
    }
    assert "fallbacks" not in _at("routing").get("required", [])


def test_a_fallback_may_not_name_the_model_itself() -> None:
    rule = _spec_rule("self.routing.fallbacks.all(")
    assert rule["rule"] == (
        "!has(self.routing) || !has(self.routing.fallbacks) || "
        "self.routing.fallbacks.all(f, "
        "(!has(self.servedName) || f != self.servedName) && "
        "(!has(self.aliases) || !(f in self.aliases)) && "
        "(!has(self.adapters) || self.adapters.all(a, a.name != f)))"
    )
    assert rule["fieldPath"] == ".routing.fallbacks"
    assert rule["message"].startswith(FALLBACKS_MESSAGE)
    assert FALLBACKS_MESSAGE == (
        "spec.routing.fallbacks: each fallback must name another model, not this "
        "model's servedName, an alias or an adapter"
    )
    assert "remove the name" in rule["message"]


def test_a_fallback_may_not_name_the_model_without_a_served_name() -> None:
    # Without servedName the served name is metadata.name, which only a rule on
    # the whole object can read; with one, metadata.name is no model name here.
    rule = _object_rule(".spec.routing.fallbacks")
    assert rule["rule"] == (
        "!has(self.spec.routing) || !has(self.spec.routing.fallbacks) || "
        "has(self.spec.servedName) || "
        "!(self.metadata.name in self.spec.routing.fallbacks)"
    )
    assert rule["message"].startswith(FALLBACKS_MESSAGE)
    assert "metadata.name when servedName is absent" in rule["message"]


def test_a_fallbacks_spec_parses_in_order() -> None:
    spec = LLMModelSpec.model_validate(
        {"model": "org/model", "routing": {"fallbacks": ["smol", "org/tiny:v1"]}}
    )
    assert spec.routing.fallbacks == ["smol", "org/tiny:v1"]
    assert LLMModelSpec.model_validate({"model": "org/model"}).routing.fallbacks == []


def test_a_split_is_a_short_list_of_targets_keyed_by_model() -> None:
    split = _at("routing.split")
    assert split["type"] == "array"
    assert split["maxItems"] == 4
    # Keyed by model: the API server refuses a target given twice, naming it.
    assert split["x-kubernetes-list-type"] == "map"
    assert split["x-kubernetes-list-map-keys"] == ["model"]
    # Absent and empty alike: nothing written into the stored object.
    assert "default" not in split
    assert "split" not in _at("routing").get("required", [])
    target = _at("routing.split[]")
    assert target["type"] == "object"
    assert sorted(target["required"]) == ["model", "weight"]
    # A model name, as the served name is.
    served = _at("servedName")
    model = _at("routing.split[].model")
    assert (model["type"], model["pattern"], model["maxLength"]) == (
        "string",
        served["pattern"],
        served["maxLength"],
    )
    weight = _at("routing.split[].weight")
    assert (weight["type"], weight["minimum"], weight["maximum"]) == ("integer", 1, 100)
    assert "default" not in weight


def test_a_split_target_may_not_name_the_model_itself() -> None:
    rule = _spec_rule("self.routing.split.all(")
    assert rule["rule"] == (
        "!has(self.routing) || !has(self.routing.split) || "
        "self.routing.split.all(s, "
        "(!has(self.servedName) || s.model != self.servedName) && "
        "(!has(self.aliases) || !(s.model in self.aliases)) && "
        "(!has(self.adapters) || self.adapters.all(a, a.name != s.model)))"
    )
    assert rule["fieldPath"] == ".routing.split"
    assert rule["message"].startswith(SPLIT_MESSAGE)
    assert SPLIT_MESSAGE == (
        "spec.routing.split: each target must name another model, not this "
        "model's servedName, an alias or an adapter"
    )
    assert "remove the target" in rule["message"]


def test_a_split_target_may_not_name_the_model_without_a_served_name() -> None:
    # As for fallbacks: only a rule on the whole object reads metadata.name.
    rule = _object_rule(".spec.routing.split")
    assert rule["rule"] == (
        "!has(self.spec.routing) || !has(self.spec.routing.split) || "
        "has(self.spec.servedName) || "
        "self.spec.routing.split.all(s, s.model != self.metadata.name)"
    )
    assert rule["message"].startswith(SPLIT_MESSAGE)
    assert "metadata.name when servedName is absent" in rule["message"]


def test_a_split_sends_at_most_all_the_requests() -> None:
    rule = _spec_rule("self.routing.split.map(")
    assert rule["rule"] == (
        "!has(self.routing) || !has(self.routing.split) || "
        "self.routing.split.map(s, s.weight).sum() <= 100"
    )
    assert rule["fieldPath"] == ".routing.split"
    assert rule["message"].startswith(SPLIT_WEIGHTS_MESSAGE)
    assert SPLIT_WEIGHTS_MESSAGE == (
        "spec.routing.split: the weights add up to more than 100 (each is the "
        "percent of this model's requests sent to that model)"
    )
    assert "lower the weights" in rule["message"]


def test_a_split_spec_parses_in_order() -> None:
    spec = LLMModelSpec.model_validate(
        {
            "model": "org/model",
            "routing": {
                "split": [
                    {"model": "v2", "weight": 10},
                    {"model": "org/tiny:v1", "weight": 90},
                ]
            },
        }
    )
    assert [(t.model, t.weight) for t in spec.routing.split] == [
        ("v2", 10),
        ("org/tiny:v1", 90),
    ]
    assert LLMModelSpec.model_validate({"model": "org/model"}).routing.split == []


@pytest.mark.parametrize(
    "target",
    [
        {"model": "v2"},
        {"weight": 10},
        {"model": "v2", "weight": 0},
        {"model": "v2", "weight": 101},
        {"model": "has space", "weight": 10},
    ],
)
def test_a_split_target_needs_a_model_name_and_a_weight_of_1_to_100(
    target: dict[str, Any],
) -> None:
    with pytest.raises(ValidationError):
        LLMModelSpec.model_validate(
            {"model": "org/model", "routing": {"split": [target]}}
        )


def test_max_requests_per_replica_is_an_optional_bound_of_at_least_1() -> None:
    bound = _at("routing.maxRequestsPerReplica")
    # `minimum`: the API server refuses 0 or less naming the field and the bound
    # ("should be greater than or equal to 1").
    assert (bound["type"], bound["minimum"], bound["maximum"]) == (
        "integer",
        1,
        100_000,
    )
    assert "default" not in bound  # absent: no bound
    assert "maxRequestsPerReplica" not in _at("routing").get("required", [])


def test_a_max_requests_per_replica_spec_parses() -> None:
    spec = LLMModelSpec.model_validate(
        {"model": "org/model", "routing": {"maxRequestsPerReplica": 256}}
    )
    assert spec.routing.max_requests_per_replica == 256
    plain = LLMModelSpec.model_validate({"model": "org/model"})
    assert plain.routing.max_requests_per_replica is None


@pytest.mark.parametrize("bound", [0, -1, 100_001])
def test_max_requests_per_replica_is_1_to_100000(bound: int) -> None:
    with pytest.raises(ValidationError):
        LLMModelSpec.model_validate(
            {"model": "org/model", "routing": {"maxRequestsPerReplica": bound}}
        )


def test_reserved_per_replica_is_an_optional_count_of_at_least_1() -> None:
    reserved = _at("routing.reservedPerReplica")
    assert (reserved["type"], reserved["minimum"], reserved["maximum"]) == (
        "integer",
        1,
        100_000,
    )
    assert "default" not in reserved  # absent: no place kept
    assert "reservedPerReplica" not in _at("routing").get("required", [])


def test_a_reserved_per_replica_spec_parses() -> None:
    spec = LLMModelSpec.model_validate(
        {
            "model": "org/model",
            "routing": {"maxRequestsPerReplica": 16, "reservedPerReplica": 4},
        }
    )
    assert spec.routing.reserved_per_replica == 4
    plain = LLMModelSpec.model_validate({"model": "org/model"})
    assert plain.routing.reserved_per_replica is None


@pytest.mark.parametrize("reserved", [0, -1, 100_001])
def test_reserved_per_replica_is_1_to_100000(reserved: int) -> None:
    with pytest.raises(ValidationError):
        LLMModelSpec.model_validate(
            {
                "model": "org/model",
                "routing": {
                    "maxRequestsPerReplica": 100_000,
                    "reservedPerReplica": reserved,
                },
            }
        )


def _holds(atom: str, routing: dict[str, int]) -> bool:
    """One term of a routing rule's `||`, as CEL reads it on `routing`:
    `has(self.f)`, its negation, or `self.f < self.g`."""
    if found := re.fullmatch(r"(!?)has\(self\.(\w+)\)", atom):
        return (found.group(2) in routing) != bool(found.group(1))
    found = re.fullmatch(r"self\.(\w+) < self\.(\w+)", atom)
    assert found, atom
    return routing[found.group(1)] < routing[found.group(2)]


def _routing_refusals(routing: dict[str, int]) -> list[str]:
    """The messages of the rules on spec.routing that refuse `routing` (each
    rule a `||` of terms `_holds` reads; CEL's `||` stops at the first true)."""
    return [
        rule["message"]
        for rule in _rules("routing")
        if not any(_holds(atom, routing) for atom in rule["rule"].split(" || "))
    ]


def test_reserved_per_replica_rules_name_the_field() -> None:
    assert [(r["rule"], r["fieldPath"]) for r in _rules("routing")] == [
        (
            "!has(self.reservedPerReplica) || has(self.maxRequestsPerReplica)",
            ".reservedPerReplica",
        ),
        (
            "!has(self.reservedPerReplica) || !has(self.maxRequestsPerReplica) "
            "|| self.reservedPerReplica < self.maxRequestsPerReplica",
            ".reservedPerReplica",
        ),
    ]


NEEDS_BOUND = "routing.reservedPerReplica needs routing.maxRequestsPerReplica"
BELOW_BOUND = (
    "routing.reservedPerReplica must be less than routing.maxRequestsPerReplica"
)


@pytest.mark.parametrize(
    ("routing", "refusal"),
    [
        ({}, None),
        ({"maxRequestsPerReplica": 16}, None),
        ({"maxRequestsPerReplica": 16, "reservedPerReplica": 4}, None),
        ({"maxRequestsPerReplica": 2, "reservedPerReplica": 1}, None),
        ({"reservedPerReplica": 4}, NEEDS_BOUND),
        ({"maxRequestsPerReplica": 4, "reservedPerReplica": 4}, BELOW_BOUND),
        ({"maxRequestsPerReplica": 4, "reservedPerReplica": 5}, BELOW_BOUND),
    ],
)
def test_reserved_per_replica_needs_a_greater_bound(
    routing: dict[str, int], refusal: str | None
) -> None:
    refusals = _routing_refusals(routing)
    if refusal is None:
        assert refusals == []
    else:
        (message,) = refusals
        assert message.startswith(refusal)
