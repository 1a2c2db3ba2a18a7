"""The LLMModel resource as typed models: the one source of truth.

The CRD's OpenAPI schema (`citadel.operator.crd`) is generated from these models,
their docstrings become the field descriptions, and the operator parses every
LLMModel it sees with them, so the schema, the defaults and the code cannot drift
apart. Rules a JSON schema cannot say are CEL rules (`x-kubernetes-validations`),
attached here too.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from citadel.gateway.routes import (
    SERVED_NAME_PATTERN,
    SPLIT_WEIGHT_TOTAL,
    RoutingStrategy,
)
from citadel.operator import names

# Kubernetes' own patterns, so bad values are refused by the API server at once.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# A Hugging Face repo id, pvc://<claim>/<path>, s3://<bucket>/<key> or an absolute
# path inside the container.
MODEL_SOURCE_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+"
    r"|/.+"
    r"|[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?)$"
)
# A qualified name (label, annotation, taint and node-selector keys): an optional DNS
# subdomain prefix and "/", then at most 63 characters. `[.]`, not `\.`: the
# patterns go into CEL string literals, where a backslash would need escaping.
_DNS_LABEL_PART = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
QUALIFIED_NAME = (
    rf"^({_DNS_LABEL_PART}([.]{_DNS_LABEL_PART})*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# An image reference as the OCI distribution grammar has it: an optional registry
# host (with a dot, a port or `localhost`, or an IPv6 address in brackets), a
# lowercase repository path, then a tag (mixed case, at most 128 characters) and/or
# a digest.
_HOST_PART = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_PATH_PART = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
# An IPv6 address: eight groups, or fewer around one "::" (a group before it and up
# to 6 after, two and up to 5, ...). Without the IPv4-embedded forms and zones,
# which the distribution grammar refuses too (it takes any hex digits and colons).
_HEX_GROUP = r"[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join(
    [
        rf"({_HEX_GROUP}:){{7}}{_HEX_GROUP}",
        rf"({_HEX_GROUP}:){{1,7}}:",
        *(rf"({_HEX_GROUP}:){{{n}}}(:{_HEX_GROUP}){{1,{7 - n}}}" for n in range(1, 7)),
        rf":((:{_HEX_GROUP}){{1,7}}|:)",
    ]
)
# `[[]` and `[]]` are the brackets themselves, for the same reason as `[.]`.
IMAGE_PATTERN = (
    rf"^((localhost|{_HOST_PART}([.]{_HOST_PART})+)(:[0-9]+)?/|{_HOST_PART}:[0-9]+/"
    rf"|[[]({_IPV6})[]](:[0-9]+)?/)?"
    rf"{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?$"
)
# The flags the operator sets, each with the shortest abbreviation vLLM 0.32's
# parser takes for it alone. Its own come after extraArgs and a flag keeps its last
# value, but the parser moves a flag with a dotted key (`--ser.x=y`) after every
# other argument.
MANAGED_ARGS = (
    ("model", "model"),
    ("port", "por"),
    ("host", "ho"),
    ("served-model-name", "ser"),
    ("tensor-parallel-size", "te"),
)
MANAGED_SHORT_ARGS = ("tp",)
# vLLM's flags that make a replica's world other than resources.gpus GPUs of one
# node (more GPUs, other ranks, other nodes): the pod has exactly that many and
# vLLM refuses to start. Each with the shortest abbreviation that vLLM 0.32's
# parser takes for it alone, or for it and others listed here (argparse takes any
# unambiguous prefix; a longer flag of a later release makes it ambiguous, which
# vLLM refuses too).
WORLD_ARGS = (
    ("pipeline-parallel-size", "pi"),
    ("prefill-context-parallel-size", "prefill-c"),
    ("data-parallel-size-local", "data-parallel-si"),  # and --data-parallel-size
    ("data-parallel-rank", "data-parallel-ra"),
    ("data-parallel-start-rank", "data-parallel-st"),
    ("nnodes", "nn"),
    ("node-rank", "nod"),
)
# Their one-dash forms; -pc is -pcp abbreviated. -n and -r take their value
# attached too (-n2), as argparse reads a one-letter option.
WORLD_SHORT_ARGS = ("pp", "pcp", "pc", "dp", "dpl", "dpn", "dpr")
WORLD_LETTER_ARGS = ("n", "r")
# vLLM's flags that make it listen other than plain HTTP on the pod's port: a unix
# socket, or HTTPS. The probes and the gateway speak HTTP to port `http`.
# (--root-path moves no route: /health and /v1 still answer at the root.)
LISTENER_ARGS = (
    ("uds", "ud"),
    ("ssl-keyfile", "ssl-k"),
    ("ssl-certfile", "ssl-certf"),
)

# vLLM's flag that makes it answer 401 to a /v1 request without that bearer token;
# the gateway sends it none, and /health, the probe, needs none.
API_KEY_ARGS = (("api-key", "api-k"),)
API_KEY_HELP = (
    "vLLM would answer 401 to every request the gateway sends it, which carries no "
    "such key, while its health probe stays green; the gateway's keys (citadel "
    "keys create) guard the model, and the chart's networkPolicy can let only the "
    "gateway reach its pods"
)

# vLLM's flag that reads more flags from a YAML file, past these rules: the file
# can be in a pvc:// model's claim, the cache or the image. Not abbreviated: every
# prefix also begins --config-format.
CONFIG_ARGS = (("config", "config"),)


# vLLM's LoRA flags, each with the shortest abbreviation vLLM 0.32's parser takes
# for it alone (--max-loras has none: every prefix also begins --max-lora-rank).
# The operator sets them from spec.adapters: the gateway routes a request by its
# model name, and an adapter named here alone would be served by vLLM but never
# reached.
LORA_ARGS = (
    ("lora-modules", "lora-m"),
    ("enable-lora", "enable-lor"),
    ("max-lora-rank", "max-lora-r"),
    ("max-loras", "max-loras"),
)
# A pvc:// source whose path inside the claim has a `..` segment.
PVC_DOT_DOT_PATTERN = "^pvc://[^/]*/(.*/)?[.][.](/.*)?$"
# The ranks vLLM 0.32 takes for --max-lora-rank (vllm/config/lora.py).
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


# vLLM's parser reads an argument that starts with `-` and holds a `.` (and no
# `=`) as a dotted flag (`--hf-overrides.x`, even a value such as `-0.5`) and
# takes the next argument as its value, whatever it is: last in extraArgs, that
# is the operator's first flag (--model=...), and vLLM serves its default model
# under this one's name. `-O=X` is read as `--optimization-level X` before that,
# so `-O=--hf-overrides.y` last ends the same way.
LAST_ARG_RULE = (
    "self.size() == 0 || !self[self.size() - 1].matches('(?s)^-(O=-)?[^=]*[.][^=]*$')"
)


def _dashes(text: str) -> str:
    """`text` with each dash as vLLM's parser reads it: `-` or `_`."""
    return text.replace("-", "[-_]")


def _abbreviations(flag: str, shortest: str) -> str:
    """A pattern of `flag` and its prefixes down to `shortest` (without `--`)."""
    rest = ""
    for char in reversed(flag.removeprefix(shortest)):
        rest = f"({_dashes(char)}{rest})?"
    return _dashes(shortest) + rest


def _refuse_each(pattern: str) -> str:
    """A CEL rule refusing each element of a list that `pattern` matches whole.

    `(?s)`: in RE2 `.` stops at a newline, and `$` is the end of the text, so
    `--port=9000` followed by a newline (what a YAML block scalar `- |` yields)
    would match no rule and be admitted, where vLLM's parser reads
    int("9000\\n") as 9000.
    """
    return "self.all(a, !a.matches('(?s)^(" + pattern + ")$'))"


def flags_pattern(
    long: tuple[tuple[str, str], ...],
    short: tuple[str, ...] = (),
    letters: tuple[str, ...] = (),
) -> str:
    """A pattern of an argument that sets one of these flags, in any spelling
    vLLM's parser takes: the long ones abbreviated, with `_` for `-`, with
    `=value`, before their value, or with a dotted key, which the parser reads
    as JSON (`--uds.x=y` is `--uds '{"x": "y"}'`). Whole-argument, `.`
    matching newlines too (see `_refuse_each`)."""
    spellings = ["--(" + "|".join(_abbreviations(*f) for f in long) + ")([=.].*)?"]
    if short:
        spellings.append("-(" + "|".join(short) + ")([=.].*)?")
    if letters:
        spellings.append("-[" + "".join(letters) + "].*")
    return "|".join(spellings)


def _flags_rule(
    long: tuple[tuple[str, str], ...],
    short: tuple[str, ...] = (),
    letters: tuple[str, ...] = (),
) -> str:
    """A CEL rule refusing each element of a list that sets one of these flags
    (`flags_pattern`)."""
    return _refuse_each(flags_pattern(long, short, letters))


LORA_FLAGS = flags_pattern(LORA_ARGS)
"""An argument that sets one of vLLM's LoRA flags (the CRD refuses it in
engine.extraArgs; the builder, in a model stored before it did)."""


def _rule(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


def _leaves_claim_rule(field: str) -> dict[str, str]:
    """The rule refusing a pvc:// source whose path leaves its claim."""
    return _rule(
        f"!self.matches('{PVC_DOT_DOT_PATTERN}')",
        f"{field}: a pvc:// source's path may not hold a `..` segment: write the "
        "path inside the claim from its root, pvc://<claim>/<path>",
    )


def _cel(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _qualified_name(value: str) -> str:
    """CEL that is true when `value` is a qualified name (the prefix's limit of 253
    characters is beyond the pattern)."""
    return f"{value}.matches('{QUALIFIED_NAME}') && {value}.indexOf('/') <= 253"


QUALIFIED_NAME_HELP = (
    "an optional DNS subdomain prefix (at most 253 characters) and '/', then at "
    "most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
    "digit, such as example.com/gpu-type"
)


def _qualified_keys(field: str, *, any_case_prefix: bool = False) -> Any:
    """Field settings whose CEL rule refuses map keys that are not qualified names,
    as Kubernetes refuses them in the pod (annotation keys are checked lowercased,
    as Kubernetes does)."""
    key = "k.lowerAscii()" if any_case_prefix else "k"
    return Field(
        json_schema_extra=_cel(
            _rule(
                f"self.all(k, {_qualified_name(key)})",
                f"{field} keys must be qualified names: {QUALIFIED_NAME_HELP}",
            )
        )
    )


def _quantity_rule(
    field: str, *, positive: bool = False, int_or_string: bool = False
) -> dict[str, str]:
    """A CEL rule refusing a negative quantity (or, with `positive`, also zero);
    the pattern has already checked the shape."""
    return _rule(
        # The integer form of an int-or-string is left to `minimum`. Not
        # `quantity(self).sign()`: Kubernetes declares `sign` as a function, not a
        # method, so that does not compile.
        ("type(self) == int || " if int_or_string else "")
        + "!isQuantity(self) || "
        + (
            "quantity(self).isGreaterThan(quantity('0'))"
            if positive
            else "!quantity(self).isLessThan(quantity('0'))"
        ),
        f"{field} must be {'greater than 0' if positive else 'at least 0'}",
    )


def _not_negative(field: str) -> Any:
    """Field settings refusing a negative quantity."""
    return Field(json_schema_extra=_cel(_quantity_rule(field)))


def _int_or_quantity(field: str) -> WithJsonSchema:
    """The schema of a non-negative int-or-string quantity (`minimum` for the
    integer form, the pattern and a rule for the string one)."""
    return WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
            "x-kubernetes-int-or-string": True,
            **_cel(_quantity_rule(field, int_or_string=True)),
        }
    )


StrQuantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]


def _objects(description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    """A list of objects whose fields are not checked, beyond `properties`."""
    item: dict[str, Any] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    if properties:
        item["properties"] = properties
    return {"type": "array", "description": description, "items": item}


def _object(description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    """An object whose fields are not checked, beyond `properties`."""
    return {
        "type": "object",
        "description": description,
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": properties,
    }


def _pod_affinity(kind: str) -> dict[str, Any]:
    return _object(
        f"core/v1 {kind}.",
        requiredDuringSchedulingIgnoredDuringExecution=_objects(
            "A list of PodAffinityTerm objects."
        ),
        preferredDuringSchedulingIgnoredDuringExecution=_objects(
            "A list of WeightedPodAffinityTerm objects."
        ),
    )


# Only the shape of a core/v1 Affinity (which fields are lists, which objects): a
# list written as a map is refused at once, rather than by the API server when the
# operator applies the Deployment. The rest is left to that check.
Affinity = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {
                "nodeAffinity": _object(
                    "core/v1 NodeAffinity.",
                    requiredDuringSchedulingIgnoredDuringExecution=_object(
                        "A core/v1 NodeSelector; placement.nodeName is added to "
                        "each of its terms.",
                        nodeSelectorTerms=_objects(
                            "A list of NodeSelectorTerm objects (ORed).",
                            matchExpressions=_objects(
                                "A list of NodeSelectorRequirement objects."
                            ),
                            matchFields=_objects(
                                "A list of NodeSelectorRequirement objects."
                            ),
                        ),
                    ),
                    preferredDuringSchedulingIgnoredDuringExecution=_objects(
                        "A list of PreferredSchedulingTerm objects."
                    ),
                ),
                "podAffinity": _pod_affinity("PodAffinity"),
                "podAntiAffinity": _pod_affinity("PodAntiAffinity"),
            },
        }
    ),
]
EnvVar = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "pattern": ENV_NAME,
                    "maxLength": 256,
                    "description": "The variable's name.",
                },
                "value": {
                    "type": "string",
                    "description": "The variable's value (a string: quote numbers).",
                },
                "valueFrom": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "description": "Where the value comes from (core/v1 "
                    "EnvVarSource), instead of value.",
                },
            },
            "x-kubernetes-preserve-unknown-fields": True,
            **_cel(
                _rule(
                    "!has(self.valueFrom) || !has(self.value) || self.value == ''",
                    "engine.env: an entry sets either value or valueFrom, not both",
                ),
                # vLLM reads it when --api-key is not given.
                _rule(
                    "self.name != 'VLLM_API_KEY'",
                    f"engine.env must not set VLLM_API_KEY: {API_KEY_HELP}",
                ),
            ),
        }
    ),
]
ServedName = Annotated[str, Field(pattern=SERVED_NAME_PATTERN, max_length=128)]
LabelMap = Annotated[
    dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
    Field(max_length=32),
]
Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class ApiModel(BaseModel):
    """Base of the resource's models: camelCase in the API, snake_case in Python,
    docstrings as the schema's descriptions."""

    # Unknown fields are pruned by the API server; reading leniently lets an older
    # operator read objects written for a newer CRD.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="ignore",
        use_attribute_docstrings=True,
    )


class Dtype(enum.StrEnum):
    """The weights' and activations' data type (vLLM `--dtype`)."""

    AUTO = "auto"
    HALF = "half"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT = "float"
    FLOAT32 = "float32"


class PullPolicy(enum.StrEnum):
    """When the kubelet pulls the image."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class DeletePolicy(enum.StrEnum):
    """What happens to the cache when the LLMModel is deleted."""

    RETAIN = "Retain"
    DELETE = "Delete"


class AccessMode(enum.StrEnum):
    """The cache volume's access mode."""

    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"
    READ_WRITE_MANY = "ReadWriteMany"


class Resources(ApiModel):
    """What each replica gets."""

    gpus: int = Field(1, ge=0, le=64)
    """NVIDIA GPUs per replica: the `nvidia.com/gpu` limit and vLLM's tensor-parallel
    size, so engine.extraArgs may set no other parallelism (pipeline, data,
    prefill-context, more nodes): the pod has exactly these GPUs. 0 runs on the
    CPU."""
    cpu: Annotated[str | int, _int_or_quantity("resources.cpu")] | None = None
    """CPU request per replica, such as `8`."""
    memory: Annotated[str | int, _int_or_quantity("resources.memory")] | None = None
    """Memory request and limit per replica, such as `90Gi`."""


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    # What Kubernetes refuses in the pod, refused here when the model is applied.
    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                "(has(self.key) && self.key != '') || "
                "(has(self.operator) && self.operator == 'Exists')",
                "placement.tolerations: a toleration without a key must have "
                "operator Exists (it then tolerates every taint)",
                fieldPath=".operator",
            ),
            _rule(
                "!has(self.key) || self.key == '' || " + _qualified_name("self.key"),
                "placement.tolerations: key must be a qualified name: "
                f"{QUALIFIED_NAME_HELP}",
                fieldPath=".key",
            ),
            _rule(
                "!has(self.operator) || self.operator != 'Exists' || "
                "!has(self.value) || self.value == ''",
                "placement.tolerations: a toleration with operator Exists matches "
                "every value of its key: leave value out",
                fieldPath=".value",
            ),
            _rule(
                "!has(self.tolerationSeconds) || "
                "(has(self.effect) && self.effect == 'NoExecute')",
                "placement.tolerations: tolerationSeconds needs effect NoExecute",
                fieldPath=".tolerationSeconds",
            ),
        )
    )

    key: Annotated[str, Field(max_length=317)] | None = None
    """The taint key; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Exists` matches any value of the key."""
    value: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] | None = None
    """The taint value (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to tolerate; all effects when absent."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays after the taint appears."""


class Placement(ApiModel):
    """Where the replicas run. The GPU toleration is added whenever gpus > 0."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                "!has(self.nodeName) || (!has(self.nodeSelector) && "
                "!has(self.gpuProduct))",
                "placement.nodeName pins the model to one node and cannot be combined "
                "with placement.nodeSelector or placement.gpuProduct",
            )
        )
    )

    node_name: (
        Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] | None
    ) = None
    """Runs every replica on this node (through the scheduler, so an impossible
    request is reported instead of failing on the node)."""
    node_selector: (
        Annotated[LabelMap, _qualified_keys("placement.nodeSelector")] | None
    ) = None
    """Node labels the node must carry."""
    gpu_product: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] | None = None
    """Shortcut for the node label `nvidia.com/gpu.product`, e.g.
    `NVIDIA-A100-SXM4-80GB`."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = []
    """Extra tolerations for the pods."""
    affinity: Affinity | None = None
    """A core/v1 Affinity for the pods, merged with the placement above. Only its
    shape is checked here (which fields are lists and which objects); the rest when
    the operator applies the Deployment."""

    @property
    def one_node(self) -> bool:
        """Every replica can only run on one node, named: by nodeName, by a
        nodeSelector on the node's hostname label, or by a required node affinity
        whose terms all name that one node."""
        if self.node_name is not None:
            return True
        if names.HOSTNAME_LABEL in (self.node_selector or {}):
            return True
        nodes = _nodes_named(self.affinity)
        return nodes is not None and len(nodes) == 1


def _nodes_named(affinity: Mapping[str, Any] | None) -> set[str] | None:
    """The nodes a required node affinity lets pods onto, when each of its (ORed)
    terms names them: the hostname label `In` some values, or the field
    `metadata.name` `In` some; None when a term names none (it may allow any
    node), or for a shape the Deployment's builder refuses anyway."""
    if affinity is None:
        return None
    try:
        node = affinity["nodeAffinity"]
        terms = node["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
    except (KeyError, TypeError):
        return None
    if not isinstance(terms, list) or not terms:
        return None
    nodes: set[str] = set()
    for term in terms:
        if not isinstance(term, Mapping):
            return None
        named: set[str] | None = None
        for field, key in (
            ("matchExpressions", names.HOSTNAME_LABEL),
            ("matchFields", "metadata.name"),
        ):
            requirements = term.get(field) or []
            if not isinstance(requirements, list):
                return None
            for req in requirements:
                if not isinstance(req, Mapping):
                    return None
                if req.get("key") != key or req.get("operator") != "In":
                    continue
                values = {str(v) for v in req.get("values") or []}
                # Requirements of one term are ANDed.
                named = values if named is None else named & values
        if named is None:
            return None
        nodes |= named
    return nodes


class SecretKeyRef(ApiModel):
    """A key of a Secret in the model's namespace."""

    name: Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """The Secret's name."""
    key: Annotated[str, Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "token"
    """The key inside the Secret."""


class Engine(ApiModel):
    """The vLLM server."""

    image: (
        Annotated[
            str,
            Field(
                max_length=512,
                # A rule rather than `pattern`: its message is readable.
                json_schema_extra=_cel(
                    _rule(
                        f"self.matches('{IMAGE_PATTERN}')",
                        "engine.image must be an image reference such as "
                        "registry.example.com/ml/vllm-openai:v0.8.5: an optional "
                        "registry host, a lowercase repository path, then an optional "
                        "tag (letters, digits, '_', '.' and '-', at most 128) and/or "
                        "@sha256:<digest>",
                    )
                ),
            ),
        ]
        | None
    ) = None
    """The vLLM OpenAI server image; the operator's pinned default when absent."""
    image_pull_policy: PullPolicy | None = None
    max_model_len: Annotated[int, Field(ge=128, le=10_485_760)] | None = None
    """Context length (`--max-model-len`); the model's own when absent."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU's memory vLLM may use (`--gpu-memory-utilization`)."""
    dtype: Dtype = Dtype.AUTO
    quantization: (
        Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_-]+$")] | None
    ) = None
    """vLLM `--quantization` method, such as `awq`, `gptq`, `fp8`."""
    extra_args: Annotated[
        list[Annotated[str, Field(max_length=1024)]],
        Field(
            max_length=64,
            json_schema_extra=_cel(
                _rule(
                    _flags_rule(MANAGED_ARGS, MANAGED_SHORT_ARGS),
                    "engine.extraArgs must not set --"
                    + ", --".join(flag for flag, _ in MANAGED_ARGS)
                    + " (nor -tp, nor an abbreviation): the operator sets them "
                    "from the spec",
                ),
                _rule(
                    _flags_rule(WORLD_ARGS, WORLD_SHORT_ARGS, WORLD_LETTER_ARGS),
                    "engine.extraArgs must not set --pipeline-parallel-size, "
                    "--prefill-context-parallel-size, --data-parallel-size(-local), "
                    "--data-parallel-rank, --data-parallel-start-rank, --nnodes or "
                    "--node-rank (nor -pp, -pcp, -dp, -dpl, -dpn, -dpr, -n, -r, nor "
                    "an abbreviation): resources.gpus sets the tensor-parallel size "
                    "and the pod gets exactly that many GPUs, on one node, so vLLM "
                    "would refuse to start for want of the others; set "
                    "resources.gpus, and replicas for more servers",
                ),
                _rule(
                    _flags_rule(LISTENER_ARGS),
                    "engine.extraArgs must not set --uds, --ssl-keyfile or "
                    "--ssl-certfile (nor an abbreviation): the probes and the "
                    "gateway speak plain HTTP to the pod's port, which vLLM would "
                    "no longer serve (a unix socket, or HTTPS)",
                ),
                _rule(
                    _flags_rule(API_KEY_ARGS),
                    "engine.extraArgs must not set --api-key (nor an abbreviation): "
                    + API_KEY_HELP,
                ),
                _rule(
                    _flags_rule(CONFIG_ARGS),
                    "engine.extraArgs must not set --config: vLLM would read more "
                    "flags from that file, which these rules cannot check (--host, "
                    "--port, --api-key, ...); put the flags in engine.extraArgs "
                    "instead",
                ),
                _rule(
                    _flags_rule(LORA_ARGS),
                    "engine.extraArgs must not set --lora-modules, --enable-lora, "
                    "--max-lora-rank or --max-loras (nor an abbreviation): the "
                    "operator sets them from spec.adapters, spec.engine.maxLoraRank "
                    "and spec.engine.maxLoras; the gateway routes an adapter by "
                    "its name, so it would never reach one named here alone",
                ),
                _rule(
                    LAST_ARG_RULE,
                    "engine.extraArgs must not end with a dotted flag without its "
                    "value (such as --hf-overrides.x): vLLM would take the "
                    "operator's flag after it (--model=...) as its value and "
                    "serve another model; write --hf-overrides.x=VALUE, or give "
                    "the value as the next element (with '=' when it starts "
                    "with '-', such as -0.5)",
                ),
            ),
        ),
    ] = []
    """More vLLM arguments, such as `--enable-prefix-caching`. Not the flags the
    operator sets, nor other parallelism than resources.gpus, nor another listener
    than plain HTTP on the pod's port (`--uds`, `--ssl-keyfile`, `--ssl-certfile`),
    nor `--api-key`: the gateway sends vLLM no key, nor `--config`: the flags
    belong here, where they are checked, nor the LoRA flags (`--lora-modules`,
    `--enable-lora`, `--max-lora-rank`, `--max-loras`): spec.adapters sets them."""
    env: Annotated[
        list[EnvVar],
        Field(
            max_length=64,
            # Keyed by name, so a name given twice is refused, as the Deployment
            # would refuse it.
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ] = []
    """Extra environment variables (core/v1 EnvVar), one per name; not
    `VLLM_API_KEY`: the gateway sends vLLM no key."""
    max_lora_rank: LoraRank | None = None
    """The highest rank of the LoRA adapters (`--max-lora-rank`), one of those
    vLLM takes; vLLM's default, 16, when absent. Only with spec.adapters."""
    max_loras: Annotated[int, Field(ge=1, le=32)] | None = None
    """How many different adapters one batch may use (`--max-loras`); vLLM's
    default, 1, when absent. Only with spec.adapters."""
    hf_token_secret_ref: SecretKeyRef | None = None
    """A Secret holding a Hugging Face token, exported as `HF_TOKEN`."""
    startup_timeout_seconds: int = Field(1800, ge=60, le=14400)
    """How long a replica may take to download and load the model before it is
    restarted."""
    shm_size: Annotated[StrQuantity, _not_negative("engine.shmSize")] = "10Gi"
    """Size of the memory-backed `/dev/shm` (tensor-parallel workers share it)."""
    drain_seconds: int = Field(10, ge=0, le=600)
    """How long a stopping replica keeps serving so the gateway can drain it."""


class Cache(ApiModel):
    """The model cache, a PersistentVolumeClaim mounted as the Hugging Face home."""

    size: Annotated[
        StrQuantity,
        Field(
            json_schema_extra=_cel(
                _rule(
                    "quantity(self).compareTo(quantity(oldSelf)) >= 0",
                    "cache.size can only grow",
                ),
                _quantity_rule("cache.size", positive=True),
            )
        ),
    ]
    """Storage to request, such as `200Gi`; may grow where the class allows it."""
    storage_class_name: (
        Annotated[
            str,
            Field(
                max_length=253,
                pattern=DNS1123_SUBDOMAIN,
                json_schema_extra=_cel(
                    _rule("self == oldSelf", "cache.storageClassName is immutable")
                ),
            ),
        ]
        | None
    ) = None
    """The StorageClass; the cluster's default when absent. Immutable."""
    access_mode: Annotated[
        AccessMode,
        Field(
            json_schema_extra=_cel(
                _rule("self == oldSelf", "cache.accessMode is immutable")
            )
        ),
    ] = AccessMode.READ_WRITE_ONCE
    """ReadWriteOnce (the default) attaches the claim to one node: a pod on
    another node waits in ContainerCreating (Multi-Attach error), so keep more
    pods than one on one node (placement) or use ReadWriteMany, which lets
    replicas on several nodes share one cache. ReadWriteOncePod lets only one pod
    use it, so it needs replicas <= 1 and rollout.maxSurge 0."""
    delete_policy: DeletePolicy = DeletePolicy.RETAIN
    """`Retain` keeps the claim (and the downloaded weights) when the model is
    deleted; `Delete` removes it with the model."""


MAX_FALLBACKS = 4
"""The most fallbacks a model lists: each one tried costs a failing request
another round of routing (and retries) at the gateway."""
FALLBACKS_MESSAGE = (
    "spec.routing.fallbacks: each fallback must name another model, not this "
    "model's servedName, an alias or an adapter"
)
"""What the rules refusing a fallback that names the model itself say (they
add what to fix)."""
MAX_SPLIT = 4
"""The most models a model's split lists."""
SPLIT_MESSAGE = (
    "spec.routing.split: each target must name another model, not this "
    "model's servedName, an alias or an adapter"
)
"""What the rules refusing a split target that names the model itself say (they
add what to fix)."""
SPLIT_WEIGHTS_MESSAGE = (
    f"spec.routing.split: the weights add up to more than {SPLIT_WEIGHT_TOTAL} "
    "(each is the percent of this model's requests sent to that model)"
)
"""What the rule refusing a split of more than all the requests says (it adds
what to fix)."""


class SplitTarget(ApiModel):
    """Another model that takes a share of this model's requests."""

    model: ServedName
    """Its name: the servedName, an alias or an adapter name of another model."""
    weight: int = Field(ge=1, le=SPLIT_WEIGHT_TOTAL)
    """The percent of this model's requests sent to it."""


class Routing(ApiModel):
    """How the gateway spreads requests over the replicas, which other models
    take a share of them, and which answer when none of them can."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                "!has(self.reservedPerReplica) || has(self.maxRequestsPerReplica)",
                "routing.reservedPerReplica needs routing.maxRequestsPerReplica: "
                "it keeps places of that bound for standard requests; set "
                "maxRequestsPerReplica, or leave reservedPerReplica out",
                fieldPath=".reservedPerReplica",
            ),
            _rule(
                "!has(self.reservedPerReplica) || !has(self.maxRequestsPerReplica) "
                "|| self.reservedPerReplica < self.maxRequestsPerReplica",
                "routing.reservedPerReplica must be less than "
                "routing.maxRequestsPerReplica: sheddable requests need a place "
                "at each replica; lower reservedPerReplica or raise "
                "maxRequestsPerReplica",
                fieldPath=".reservedPerReplica",
            ),
        )
    )

    strategy: RoutingStrategy = RoutingStrategy.PREFIX_AWARE
    fallbacks: Annotated[
        list[ServedName],
        Field(
            max_length=MAX_FALLBACKS,
            # A set: the API server refuses a name given twice, and names it.
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ] = []
    """Other models' names (a servedName, alias or adapter name), in order,
    that answer this model's requests when it cannot: no replica ready, none
    reachable, every one refusing the request unworked (503) or busy (429),
    or, with autoscaling.minReplicas 0, none started yet (the gateway then
    sends the request on at once, wakes the model, and holds the request for
    it only if no fallback answers).
    Never once a replica may have worked on the request, nor when the gateway
    itself refuses it (unknown model, the key's permissions or limits). A
    fallback is skipped when it names no model (it may be created later), the
    key may not use it, its limits refuse the key, or it is scaled to zero
    with no replica ready; a fallback's own fallbacks are not followed. None
    may be one of this model's own names."""
    split: Annotated[
        list[SplitTarget],
        Field(
            max_length=MAX_SPLIT,
            # Keyed by model: the API server refuses a target given twice, and
            # names it.
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["model"],
            },
        ),
    ] = []
    """Other models (a servedName, alias or adapter name each) that take a share
    of the requests for this model's servedName and aliases, in order: each its
    weight in percent, this model the rest; the weights add up to at most 100.
    A request with a session stays on one model while the weights stay. The
    gateway checks the key may use this model first; the request then becomes
    the target's entirely (its limits, its fallbacks), and the answer says
    which (x-citadel-split). A target is skipped, and this model answers, when
    it names no model (it may be created later), the key may not use it, or no
    replica of it is ready. None may be one of this model's own names."""
    max_requests_per_replica: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """The most requests a gateway replica has at one model replica at once;
    more wait at the gateway for a replica with room, standard priority before
    sheddable, and are refused (503 `model_overloaded`) after the gateway's
    queue timeout (CITADEL_GATEWAY_QUEUE_TIMEOUT_S, 60 s; the chart's
    gateway.queueTimeoutSeconds). Each gateway replica keeps its own count, so
    a model replica may get up to this many from every gateway replica. vLLM's
    `--max-num-seqs` (what a replica runs at once) suits it: the gateway holds
    the rest, so a standard request goes before queued sheddable ones, and to
    whichever replica frees first. Waiting requests count as demand for
    spec.autoscaling. Absent: no bound (vLLM queues what it cannot run)."""
    reserved_per_replica: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """Of maxRequestsPerReplica, the places at each model replica that only
    standard-priority requests take: a sheddable request takes a replica only
    while a gateway replica has fewer than maxRequestsPerReplica less these
    there, a standard one up to the bound. A standard (interactive) request
    then starts at once while fewer than this many standard ones run there,
    instead of waiting for a sheddable (batch) request to end; sheddable
    requests alone use at most maxRequestsPerReplica less these places of each
    replica. Less than maxRequestsPerReplica, and only with it. Absent: none
    kept (a sheddable request may take every place)."""


class Limits(ApiModel):
    """Default per-key limits for this model at the gateway; absent is unlimited."""

    rpm: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    """Requests per minute per API key."""
    tpm: Annotated[int, Field(ge=1, le=10_000_000_000)] | None = None
    """Tokens per minute per API key."""


class Rollout(ApiModel):
    """How a changed spec replaces running replicas.

    The default (maxSurge 0, maxUnavailable 1) never asks for more GPUs than the
    model already holds, so a model using every GPU of its node can still be updated;
    set maxSurge to 1 for zero-downtime updates where spare GPUs exist.
    """

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                # has(): the rule also runs on the `{}` default, before the
                # defaults of the fields inside it are filled in.
                "(has(self.maxSurge) && self.maxSurge > 0) || "
                "!has(self.maxUnavailable) || self.maxUnavailable > 0",
                "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
            )
        )
    )

    max_surge: int = Field(0, ge=0, le=64)
    """Extra replicas (and GPUs) an update may start before stopping old ones."""
    max_unavailable: int = Field(1, ge=0, le=64)
    """Replicas an update may stop before their replacements are ready."""


class PodOptions(ApiModel):
    """Extra settings for the pods."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                "!has(self.labels) || self.labels.all(k, "
                "!k.startsWith('app.kubernetes.io/') && !k.startsWith('citadel.ai/'))",
                "pod.labels must not use the app.kubernetes.io/ or citadel.ai/ "
                "prefixes: the operator owns them",
            )
        )
    )

    annotations: (
        Annotated[
            dict[str, Annotated[str, Field(max_length=4096)]],
            Field(max_length=32),
            _qualified_keys("pod.annotations", any_case_prefix=True),
        ]
        | None
    ) = None
    """Pod annotations, such as those a service mesh or a runtime reads."""
    labels: Annotated[LabelMap, _qualified_keys("pod.labels")] | None = None
    """Extra pod labels."""
    service_account_name: (
        Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] | None
    ) = None
    """The pods' ServiceAccount (the server needs no API access)."""
    priority_class_name: (
        Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)] | None
    ) = None
    """A PriorityClass, so a model can preempt less important pods."""
    image_pull_secrets: Annotated[list[SecretKeyRef], Field(max_length=8)] = []
    """Secrets for pulling the image (only `name` is used)."""


class Adapter(ApiModel):
    """A LoRA adapter vLLM applies to the model for the requests that name it."""

    name: ServedName
    """The name clients send as `model` to use the adapter: a model name of its
    own, routed as the served name and the aliases are (an API key must allow
    it), and sent to vLLM as it is."""
    source: Annotated[
        str,
        Field(
            max_length=512,
            # The model's pattern, s3:// included, so that an S3 source gets the
            # rule's message alone rather than the pattern's beside it.
            pattern=MODEL_SOURCE_PATTERN,
            json_schema_extra=_cel(
                _rule(
                    "!self.startsWith('s3://')",
                    "adapters: source cannot be s3://: vLLM loads an adapter "
                    "from a directory or a Hugging Face repo only; copy it to a "
                    "PersistentVolumeClaim and write pvc://<claim>/<path>, or "
                    "give a Hugging Face repo id (org/name) or an absolute path "
                    "inside the container",
                ),
                # The path is read under the claim's mount: `..` would leave it
                # (another claim's mount, the image) and fail only at start.
                _leaves_claim_rule("adapters"),
            ),
        ),
    ]
    """Where the adapter's files are: a Hugging Face repo id (`org/name`,
    downloaded into the model's cache, with engine.hfTokenSecretRef's token),
    `pvc://<claim>/<path>` (the claim is mounted read-only) or an absolute path
    inside the container. Not `s3://`: vLLM cannot load an adapter from it."""


class Autoscaling(ApiModel):
    """Sizes the model by the gateway's demand, as a HorizontalPodAutoscaler
    would: the operator writes spec.replicas (through the scale subresource)
    from the requests in flight and waiting at the gateways."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                # has(): the rule also runs before the defaults are filled in.
                "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                "autoscaling.minReplicas must be at most autoscaling.maxReplicas: "
                "lower minReplicas or raise maxReplicas",
                fieldPath=".minReplicas",
            )
        )
    )

    min_replicas: int = Field(1, ge=0, le=64)
    """The fewest replicas; 0 stops the model when no request comes for
    scaleDownDelaySeconds, and the gateway holds the first request that comes
    while a replica starts."""
    max_replicas: int = Field(ge=1, le=64)
    """The most replicas."""
    target_requests: int = Field(8, ge=1, le=100_000)
    """Requests in flight (and waiting) per replica the autoscaler aims at.
    vLLM batches concurrent requests: 8 suits a CPU or a small GPU; raise it for
    large GPUs, which batch far more sequences at once."""
    scale_down_delay_seconds: int = Field(300, ge=0, le=86_400)
    """How long demand must stay low before replicas are removed; adding them
    is immediate."""


def _object_default() -> dict[str, Any]:
    # `default: {}` lets the API server fill in the nested defaults, so
    # `kubectl get -o yaml` shows what the operator will use.
    return {"default": {}}


class LLMModelSpec(ApiModel):
    """The desired state of one served model."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            _rule(
                "!has(self.aliases) || !has(self.servedName) || "
                "!(self.servedName in self.aliases)",
                "aliases must not repeat servedName",
                fieldPath=".aliases",
            ),
            _rule(
                "!has(self.resources) || self.resources.gpus > 0 || "
                "!has(self.placement) || !has(self.placement.gpuProduct)",
                "placement.gpuProduct needs resources.gpus > 0",
                fieldPath=".placement.gpuProduct",
            ),
            _rule(
                # has(): the API server checks the rule against objects before
                # their defaults are filled in too (see Rollout).
                "!has(self.cache) || !has(self.cache.accessMode) || "
                "self.cache.accessMode != 'ReadWriteOncePod' || "
                "((!has(self.replicas) || self.replicas <= 1) && "
                "(!has(self.rollout) || !has(self.rollout.maxSurge) || "
                "self.rollout.maxSurge == 0))",
                "cache.accessMode ReadWriteOncePod lets only one pod use the cache: "
                "it needs replicas <= 1 and rollout.maxSurge 0 (the other pods would "
                "stay unschedulable); use ReadWriteOnce or ReadWriteMany for more "
                "pods (accessMode is immutable: a new cache claim)",
                fieldPath=".cache.accessMode",
            ),
            _rule(
                "!has(self.cache) || !has(self.cache.accessMode) || "
                "self.cache.accessMode != 'ReadWriteOncePod' || "
                "!has(self.autoscaling) || self.autoscaling.maxReplicas <= 1",
                "cache.accessMode ReadWriteOncePod lets only one pod use the cache: "
                "it needs autoscaling.maxReplicas <= 1 (the other pods would stay "
                "unschedulable); use ReadWriteOnce or ReadWriteMany for more pods "
                "(accessMode is immutable: a new cache claim)",
                fieldPath=".autoscaling.maxReplicas",
            ),
            _rule(
                "!has(self.adapters) || self.adapters.all(a, "
                "(!has(self.servedName) || a.name != self.servedName) && "
                "(!has(self.aliases) || !(a.name in self.aliases)))",
                "adapters: an adapter's name must differ from servedName and from "
                "every alias: clients choose the model or one of its adapters by "
                "that name; rename the adapter",
                fieldPath=".adapters",
            ),
            _rule(
                # has(): `routing` defaults to {}, filled in after the rules
                # ran (see Rollout).
                "!has(self.routing) || !has(self.routing.fallbacks) || "
                "self.routing.fallbacks.all(f, "
                "(!has(self.servedName) || f != self.servedName) && "
                "(!has(self.aliases) || !(f in self.aliases)) && "
                "(!has(self.adapters) || self.adapters.all(a, a.name != f)))",
                f"{FALLBACKS_MESSAGE}: the gateway would send the request back "
                "to the replicas that just failed it; remove the name, or name "
                "another model's",
                fieldPath=".routing.fallbacks",
            ),
            _rule(
                "!has(self.routing) || !has(self.routing.split) || "
                "self.routing.split.all(s, "
                "(!has(self.servedName) || s.model != self.servedName) && "
                "(!has(self.aliases) || !(s.model in self.aliases)) && "
                "(!has(self.adapters) || self.adapters.all(a, a.name != s.model)))",
                f"{SPLIT_MESSAGE}: the share would come back to this model; "
                "remove the target, or name another model's",
                fieldPath=".routing.split",
            ),
            _rule(
                # sum(): Kubernetes' lists library, in every CEL environment
                # the API server gives CRD rules (1.30's included).
                "!has(self.routing) || !has(self.routing.split) || "
                f"self.routing.split.map(s, s.weight).sum() <= {SPLIT_WEIGHT_TOTAL}",
                f"{SPLIT_WEIGHTS_MESSAGE}: lower the weights so that they add up "
                f"to at most {SPLIT_WEIGHT_TOTAL}",
                fieldPath=".routing.split",
            ),
            _rule(
                "(has(self.adapters) && self.adapters.size() > 0) || "
                "!has(self.engine) || "
                "(!has(self.engine.maxLoraRank) && !has(self.engine.maxLoras))",
                "engine.maxLoraRank and engine.maxLoras apply to LoRA adapters "
                "only: list the adapters in spec.adapters, or leave both out",
                fieldPath=".engine",
            ),
        )
    )

    model: Annotated[
        str,
        Field(
            max_length=512,
            pattern=MODEL_SOURCE_PATTERN,
            # Read under the claim's mount, as an adapter's path is.
            json_schema_extra=_cel(_leaves_claim_rule("model")),
        ),
    ]
    """What to serve: a Hugging Face repo id (`org/name`), `pvc://<claim>/<path>`,
    `s3://<bucket>/<key>` (credentials through engine.env) or an absolute path
    inside the container."""
    served_name: ServedName | None = None
    """The name clients send as `model`; the LLMModel's name when absent."""
    aliases: Annotated[
        list[ServedName],
        Field(max_length=16, json_schema_extra={"x-kubernetes-list-type": "set"}),
    ] = []
    """More names that route to this model."""
    adapters: Annotated[
        list[Adapter],
        Field(
            max_length=32,
            # Keyed by name: a name given twice is refused, and the API
            # server's message names it (a CEL rule's message could not).
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ] = []
    """LoRA adapters served on top of the model, each under a name of its own
    (at most 32, names unique, none the served name or an alias). vLLM loads
    them when it starts: a change here restarts the replicas (rollout), and a
    source it cannot load stops it from starting."""
    replicas: int = Field(1, ge=0, le=64)
    """Number of vLLM servers; 0 stops the model but keeps its cache. With
    spec.autoscaling the operator writes it (leave it out of what GitOps
    compares, as for an HPA)."""
    autoscaling: Autoscaling | None = None
    """Absent: spec.replicas is what a person (or an HPA) sets. Present: the
    operator sets spec.replicas by the gateway's demand, through the scale
    subresource (docs/concepts.md, Autoscaling); do not also point an HPA at
    this LLMModel, the two would fight over spec.replicas."""
    resources: Resources = Field(
        default_factory=Resources, json_schema_extra=_object_default()
    )
    placement: Placement = Field(
        default_factory=Placement, json_schema_extra=_object_default()
    )
    engine: Engine = Field(default_factory=Engine, json_schema_extra=_object_default())
    cache: Cache | None = None
    """Absent: the weights are downloaded into an emptyDir on every start."""
    routing: Routing = Field(
        default_factory=Routing, json_schema_extra=_object_default()
    )
    limits: Limits = Field(default_factory=Limits)
    rollout: Rollout = Field(
        default_factory=Rollout, json_schema_extra=_object_default()
    )
    pod: PodOptions = Field(default_factory=PodOptions)

    @property
    def names(self) -> tuple[str, ...]:
        """The served name then the aliases (the served name must be resolved)."""
        assert self.served_name is not None
        return (self.served_name, *self.aliases)


def object_rules() -> dict[str, Any]:
    """The CEL rules on the whole object, where `self.metadata.name` is known:
    the served name is the model's name when servedName is absent."""
    return _cel(
        _rule(
            "!has(self.spec.adapters) || has(self.spec.servedName) || "
            "self.spec.adapters.all(a, a.name != self.metadata.name)",
            "adapters: an adapter's name must differ from the model's served "
            "name, which is metadata.name when servedName is absent: clients "
            "choose the model or one of its adapters by that name; rename the "
            "adapter",
            fieldPath=".spec.adapters",
        ),
        _rule(
            "!has(self.spec.routing) || !has(self.spec.routing.fallbacks) || "
            "has(self.spec.servedName) || "
            "!(self.metadata.name in self.spec.routing.fallbacks)",
            f"{FALLBACKS_MESSAGE}; the servedName is metadata.name when "
            "servedName is absent: remove the name, or name another model's",
            fieldPath=".spec.routing.fallbacks",
        ),
        _rule(
            "!has(self.spec.routing) || !has(self.spec.routing.split) || "
            "has(self.spec.servedName) || "
            "self.spec.routing.split.all(s, s.model != self.metadata.name)",
            f"{SPLIT_MESSAGE}; the servedName is metadata.name when servedName "
            "is absent: remove the target, or name another model's",
            fieldPath=".spec.routing.split",
        ),
    )


def parse_spec(name: str, raw: Mapping[str, Any]) -> LLMModelSpec:
    """Parses a spec as the API server stored it, resolving the served name.

    Raises:
        pydantic.ValidationError: the spec does not match the models (only possible
            for objects written before a stricter CRD was installed).
    """
    spec = LLMModelSpec.model_validate(raw)
    if spec.served_name is None:
        spec = spec.model_copy(update={"served_name": name})
    return spec
