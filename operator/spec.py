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

from citadel.gateway.routes import SERVED_NAME_PATTERN, RoutingStrategy
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
IMAGE_PATTERN = r"^[a-z0-9]([-a-z0-9._/:@]*[A-Za-z0-9_])?$"
MANAGED_ARGS = ("model", "port", "host", "served-model-name", "tensor-parallel-size")

Quantity = Annotated[
    str | int,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
StrQuantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]
AnyObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
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
                }
            },
            "x-kubernetes-preserve-unknown-fields": True,
        }
    ),
]
ServedName = Annotated[str, Field(pattern=SERVED_NAME_PATTERN, max_length=128)]
LabelMap = Annotated[
    dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
    Field(max_length=32),
]
Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


def _rule(rule: str, message: str, **extra: str) -> dict[str, str]:
    return {"rule": rule, "message": message, **extra}


def _cel(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


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
    size. 0 runs on the CPU."""
    cpu: Quantity | None = None
    """CPU request per replica, such as `8`."""
    memory: Quantity | None = None
    """Memory request and limit per replica, such as `90Gi`."""


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: Annotated[str, Field(max_length=316)] | None = None
    """The taint key; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Exists` matches any value of the key."""
    value: Annotated[str, Field(max_length=63)] | None = None
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
    node_selector: LabelMap | None = None
    """Node labels the node must carry."""
    gpu_product: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] | None = None
    """Shortcut for the node label `nvidia.com/gpu.product`, e.g.
    `NVIDIA-A100-SXM4-80GB`."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = []
    """Extra tolerations for the pods."""
    affinity: AnyObject | None = None
    """A core/v1 Affinity for the pods, merged with the placement above."""

    @property
    def one_node(self) -> bool:
        """Every replica can only run on one node, named: by nodeName, or by a
        nodeSelector on the node's hostname label."""
        return self.node_name is not None or (
            names.HOSTNAME_LABEL in (self.node_selector or {})
        )


class SecretKeyRef(ApiModel):
    """A key of a Secret in the model's namespace."""

    name: Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """The Secret's name."""
    key: Annotated[str, Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "token"
    """The key inside the Secret."""


class Engine(ApiModel):
    """The vLLM server."""

    image: Annotated[str, Field(max_length=512, pattern=IMAGE_PATTERN)] | None = None
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
                    "self.all(a, !a.matches('^(--("
                    + "|".join(a.replace("-", "[-_]") for a in MANAGED_ARGS)
                    + ")|-tp)(=.*)?$'))",
                    "engine.extraArgs must not set --"
                    + ", --".join(MANAGED_ARGS)
                    + " (or -tp): the operator sets them from the spec",
                )
            ),
        ),
    ] = []
    """More vLLM arguments, such as `--enable-prefix-caching`."""
    env: Annotated[list[EnvVar], Field(max_length=64)] = []
    """Extra environment variables (core/v1 EnvVar)."""
    hf_token_secret_ref: SecretKeyRef | None = None
    """A Secret holding a Hugging Face token, exported as `HF_TOKEN`."""
    startup_timeout_seconds: int = Field(1800, ge=60, le=14400)
    """How long a replica may take to download and load the model before it is
    restarted."""
    shm_size: StrQuantity = "10Gi"
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
                )
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
    """ReadWriteMany lets replicas on several nodes share one cache."""
    delete_policy: DeletePolicy = DeletePolicy.RETAIN
    """`Retain` keeps the claim (and the downloaded weights) when the model is
    deleted; `Delete` removes it with the model."""


class Routing(ApiModel):
    """How the gateway spreads requests over the replicas."""

    strategy: RoutingStrategy = RoutingStrategy.PREFIX_AWARE


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
            dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=32)
        ]
        | None
    ) = None
    """Pod annotations, such as those a service mesh or a runtime reads."""
    labels: LabelMap | None = None
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
        )
    )

    model: Annotated[str, Field(max_length=512, pattern=MODEL_SOURCE_PATTERN)]
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
    replicas: int = Field(1, ge=0, le=64)
    """Number of vLLM servers; 0 stops the model but keeps its cache."""
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
