"""The vLLM Deployment: engine arguments, GPUs, volumes, probes and placement."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from citadel.operator import names
from citadel.operator.builders.common import (
    BuildError,
    Manifest,
    labels,
    metadata,
    selector_labels,
)
from citadel.operator.model import LLMModel
from citadel.operator.settings import DEFAULT_VLLM_HOST, OperatorSettings
from citadel.operator.spec import LORA_FLAGS

CACHE_MOUNT = "/cache"
SOURCE_MOUNT = "/model-source"
# Where each other claim of the adapters' pvc:// sources is mounted, by its name.
ADAPTERS_MOUNT = "/adapters"
UID = 1000
# Time a stopping server gets after the drain to finish what it is generating.
SHUTDOWN_SECONDS = 60
# Of which the server waits for requests in flight all but this, so it exits
# before the kubelet's SIGKILL.
SHUTDOWN_MARGIN_SECONDS = 5
# The longest --shutdown-timeout from extraArgs that the grace period follows.
MAX_SHUTDOWN_SECONDS = 24 * 3600
# The Deployment is marked failed only well after the startup probe gave up.
PROGRESS_MARGIN_SECONDS = 300


def model_argument(model: LLMModel) -> str:
    """vLLM's `--model`: a repo id, an S3 URL, or a path inside the container."""
    return _in_container(model.spec.model, _own_claims(model))


def _pvc(source: str) -> tuple[str, str] | None:
    """(claim, path inside it) of a `pvc://` source, else None."""
    if not source.startswith("pvc://"):
        return None
    claim, _, path = source.removeprefix("pvc://").partition("/")
    return claim, path


def _in_container(source: str, mounts: dict[str, str]) -> str:
    """Where vLLM reads `source`: a pvc:// source under its claim's mount (by
    claim in `mounts`), anything else as it is."""
    pvc = _pvc(source)
    if pvc is None:
        return source
    claim, path = pvc
    return f"{mounts[claim]}/{path}".rstrip("/")


def _own_claims(model: LLMModel) -> dict[str, str]:
    """The claims the pod mounts for the model itself (its pvc:// source, its
    cache), by claim: an adapter in one is read where it is, rather than from
    a second volume of the same claim."""
    mounted: dict[str, str] = {}
    own = _pvc(model.spec.model)
    if own is not None:
        mounted[own[0]] = SOURCE_MOUNT
    if model.spec.cache is not None:
        mounted.setdefault(names.cache_claim_name(model.name), CACHE_MOUNT)
    return mounted


def _adapter_claims(model: LLMModel, own: dict[str, str]) -> dict[str, str]:
    """The claims of the adapters' pvc:// sources that the pod mounts for them
    alone (none of `own`), by claim: each at /adapters/<claim>."""
    claims: dict[str, str] = {}
    for adapter in model.spec.adapters:
        pvc = _pvc(adapter.source)
        if pvc is not None and pvc[0] not in own:
            claims[pvc[0]] = f"{ADAPTERS_MOUNT}/{pvc[0]}"
    return claims


def lora_args(model: LLMModel) -> list[str]:
    """vLLM's LoRA flags for the model's adapters; none without adapters.

    Each adapter is one JSON object (compact, keys in a fixed order, so the
    Deployment changes only when an adapter does) naming the served name as
    its base, which /v1/models lists as the adapter's parent.

    Raises:
        BuildError: engine.extraArgs set a LoRA flag too. The CRD refuses that,
            but a model applied before it did keeps its extraArgs (the API
            server lets an unchanged field stay); vLLM would keep only the last
            `--lora-modules`, and the adapters named in extraArgs would be gone
            without a word.
    """
    spec, engine = model.spec, model.spec.engine
    if not spec.adapters:
        return []
    if found := [arg for arg in engine.extra_args if _lora_flag(arg)]:
        raise BuildError(
            f"engine.extraArgs sets {', '.join(map(repr, found))}, which "
            "spec.adapters now sets: move the adapters named there into "
            "spec.adapters and the rank and count into engine.maxLoraRank and "
            "engine.maxLoras, and remove the LoRA flags from engine.extraArgs"
        )
    args = ["--enable-lora"]
    if engine.max_lora_rank is not None:
        args.append(f"--max-lora-rank={engine.max_lora_rank}")
    if engine.max_loras is not None:
        args.append(f"--max-loras={engine.max_loras}")
    args.append("--lora-modules")
    own = _own_claims(model)
    mounts = {**_adapter_claims(model, own), **own}
    for adapter in spec.adapters:
        module = {
            "name": adapter.name,
            "path": _in_container(adapter.source, mounts),
            "base_model_name": model.served_name,
        }
        args.append(json.dumps(module, separators=(",", ":")))
    return args


def _lora_flag(arg: str) -> bool:
    """Whether `arg` sets one of vLLM's LoRA flags, in a spelling the CRD's rule
    refuses (its own pattern, so that the two never differ)."""
    return re.fullmatch(LORA_FLAGS, arg, re.DOTALL) is not None


def engine_args(model: LLMModel, host: str = DEFAULT_VLLM_HOST) -> list[str]:
    """The arguments of vLLM's OpenAI server, from the spec.

    Args:
        model: the model served.
        host: the address vLLM listens on (OperatorSettings.vllm_host).
    """
    spec, engine = model.spec, model.spec.engine
    args: list[str] = []
    if spec.resources.gpus > 0:
        args.append(f"--gpu-memory-utilization={engine.gpu_memory_utilization:g}")
    if engine.max_model_len is not None:
        args.append(f"--max-model-len={engine.max_model_len}")
    args.append(f"--dtype={engine.dtype}")
    if engine.quantization:
        args.append(f"--quantization={engine.quantization}")
    if spec.model.startswith("s3://") and not _values(
        engine.extra_args, "--load-format"
    ):
        # vLLM streams S3 objects through the Run:ai model streamer.
        args.append("--load-format=runai_streamer")
    if not _values(engine.extra_args, "--shutdown-timeout"):
        # vLLM aborts what it is generating on SIGTERM unless told to wait; the
        # pod's grace period leaves it SHUTDOWN_SECONDS after the drain.
        args.append(f"--shutdown-timeout={SHUTDOWN_SECONDS - SHUTDOWN_MARGIN_SECONDS}")
    # What the operator must own comes after extraArgs: vLLM keeps a flag's last
    # value, and another vLLM release's parser may take spellings the CRD's rule
    # does not list (argparse accepts any unambiguous prefix). Not a dotted one
    # (`--ser.x=y`), which the parser moves last: the CRD refuses those.
    # Only the served name: the gateway sends every request for the base model
    # under it (an adapter's under the adapter's name), so the aliases are the
    # gateway's alone, and changing them restarts no replica.
    managed = [
        f"--model={model_argument(model)}",
        "--served-model-name",
        model.served_name,
        f"--host={host}",
        f"--port={names.HTTP_PORT}",
    ]
    if spec.resources.gpus > 0:
        managed.append(f"--tensor-parallel-size={spec.resources.gpus}")
    # The last of the operator's own: --lora-modules takes every argument up to
    # the next flag.
    managed += lora_args(model)
    if not engine.extra_args:
        # Nothing to override them: the order of the releases before, so that an
        # upgrade of the operator rolls no model that has no extraArgs.
        return [*managed, *args]
    return [*args, *engine.extra_args, *managed]


def _values(args: list[str], flag: str) -> list[str]:
    """The values `args` give `flag`, read as vLLM's parser reads them:
    underscores for dashes, and any prefix (argparse takes an unambiguous
    abbreviation, such as `--shu`; vLLM refuses an ambiguous one at start)."""
    found = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg.partition("=")
        key = key.replace("_", "-")
        if len(key) < 3 or not flag.startswith(key):
            continue
        if eq:
            found.append(value)
        elif i + 1 < len(args):
            found.append(args[i + 1])
        else:
            found.append("")
    return found


def shutdown_seconds(model: LLMModel) -> int:
    """What the server gets after the drain: SHUTDOWN_SECONDS, or more when
    extraArgs give vLLM a longer --shutdown-timeout (else the kubelet would
    kill it before that timeout ends)."""
    asked = 0
    for value in _values(model.spec.engine.extra_args, "--shutdown-timeout"):
        try:  # vLLM keeps the last one, an int
            asked = min(max(0, int(value)), MAX_SHUTDOWN_SECONDS)
        except ValueError:
            asked = 0  # vLLM refuses it at start; nothing to wait for
    return max(SHUTDOWN_SECONDS, asked + SHUTDOWN_MARGIN_SECONDS)


def _env(model: LLMModel) -> list[Manifest]:
    engine = model.spec.engine
    ours: list[Manifest] = [
        # The root filesystem is read-only; tools that write to $HOME get /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_MOUNT}/vllm"},
    ]
    if model.spec.resources.gpus == 0:
        # CUDA images set NVIDIA_VISIBLE_DEVICES=all, and a pod that asks the
        # device plugin for no GPU would get every GPU of its node from the
        # container runtime, beside the models that asked for them.
        ours.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    if engine.hf_token_secret_ref is not None:
        ref = engine.hf_token_secret_ref
        ours.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    # Server-side apply refuses duplicate names; the user's entry wins.
    theirs = [dict(item) for item in engine.env]
    overridden = {item["name"] for item in theirs}
    return [e for e in ours if e["name"] not in overridden] + theirs


def _resources(model: LLMModel) -> Manifest:
    res = model.spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.gpus > 0:
        requests[names.GPU_RESOURCE] = limits[names.GPU_RESOURCE] = str(res.gpus)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probes(model: LLMModel) -> Manifest:
    def probe(period: int, failures: int, timeout: int) -> Manifest:
        return {
            "httpGet": {"path": "/health", "port": names.HTTP_PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    startup_timeout = model.spec.engine.startup_timeout_seconds
    return {
        # Loading tens of gigabytes takes minutes: the startup probe holds the
        # other two back until the server answers once.
        "startupProbe": probe(10, math.ceil(startup_timeout / 10), 5),
        "readinessProbe": probe(5, 3, 3),
        "livenessProbe": probe(15, 4, 5),
    }


def _volumes(model: LLMModel) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, volumeMounts) for shm, the cache, /tmp and a PVC model source."""
    engine, cache = model.spec.engine, model.spec.cache
    cache_volume: Manifest = (
        {"persistentVolumeClaim": {"claimName": names.cache_claim_name(model.name)}}
        if cache is not None
        else {"emptyDir": {}}
    )
    volumes: list[Manifest] = [
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": engine.shm_size},
        },
        {"name": "cache", **cache_volume},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    own = _pvc(model.spec.model)
    if own is not None:
        claim = own[0]
        volumes.append(
            {
                "name": "model-source",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        mounts.append(
            {"name": "model-source", "mountPath": SOURCE_MOUNT, "readOnly": True}
        )
    adapter_claims = _adapter_claims(model, _own_claims(model))
    # Numbered, not named after the claim: a claim's name may be longer than a
    # volume's (63 characters).
    for i, (claim, path) in enumerate(adapter_claims.items()):
        name = f"adapters-{i}"
        volumes.append(
            {
                "name": name,
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def _container(model: LLMModel, settings: OperatorSettings) -> Manifest:
    engine = model.spec.engine
    _, mounts = _volumes(model)
    container: Manifest = {
        "name": names.CONTAINER_NAME,
        "image": engine.image or settings.default_vllm_image,
        # The images' entrypoints differ between releases; the module does not.
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": engine_args(model, settings.vllm_host),
        "ports": [
            {
                "name": names.HTTP_PORT_NAME,
                "containerPort": names.HTTP_PORT,
                "protocol": "TCP",
            }
        ],
        "env": _env(model),
        "resources": _resources(model),
        "volumeMounts": mounts,
        **_probes(model),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if engine.image_pull_policy is not None:
        container["imagePullPolicy"] = str(engine.image_pull_policy)
    if engine.drain_seconds > 0:
        # Keep serving while the endpoint disappears from the gateway's view.
        container["lifecycle"] = {
            "preStop": {"sleep": {"seconds": engine.drain_seconds}}
        }
    return container


def gpu_toleration() -> Manifest:
    """Tolerates the taint GPU nodes carry (nvidia.com/gpu:NoSchedule)."""
    return {"key": names.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def node_selector(model: LLMModel) -> dict[str, str]:
    """The pods' nodeSelector: the spec's plus the GPU product shortcut."""
    placement = model.spec.placement
    selector = dict(placement.node_selector or {})
    if placement.gpu_product:
        selector[names.GPU_PRODUCT_LABEL] = placement.gpu_product
    return selector


def _object(value: Any, path: str) -> Manifest:
    """`value` (None: an empty object) if it is an object, else BuildError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _misshapen(path, "an object", value)
    return dict(value)


def _objects(value: Any, path: str) -> list[Manifest]:
    """`value` (None: an empty list) if it is a list of objects, else BuildError."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _misshapen(path, "a list of objects", value)
    return [dict(v) for v in value]


def _misshapen(path: str, wanted: str, value: Any) -> BuildError:
    if isinstance(value, dict):
        found = "a map"
    elif isinstance(value, list):
        found = "a list" if wanted == "an object" else "a list of other things"
    else:
        found = f"{type(value).__name__} {value!r}"
    return BuildError(
        f"placement.affinity.{path} must be {wanted}, not {found} "
        "(see the core/v1 Affinity API)"
    )


def affinity(model: LLMModel) -> Manifest | None:
    """The spec's affinity, with nodeName added to every required node term.

    nodeName goes through the scheduler (a `metadata.name` field selector) rather
    than into pod.spec.nodeName, so a node that cannot take the pod is reported as
    Unschedulable instead of the pod failing on the node.

    Raises:
        BuildError: the affinity's node terms are not shaped as core/v1 has them
            (the CRD checks this, but not for objects stored before it did).
    """
    placement = model.spec.placement
    result: Manifest = dict(placement.affinity or {})
    if placement.node_name is None:
        return result or None
    pin = {"key": "metadata.name", "operator": "In", "values": [placement.node_name]}
    path = "nodeAffinity"
    node_affinity = _object(result.get("nodeAffinity"), path)
    path += ".requiredDuringSchedulingIgnoredDuringExecution"
    required = _object(
        node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution"), path
    )
    path += ".nodeSelectorTerms"
    terms = _objects(required.get("nodeSelectorTerms"), path) or [{}]
    for i, term in enumerate(terms):
        fields = _objects(term.get("matchFields"), f"{path}[{i}].matchFields")
        term["matchFields"] = [*fields, pin]
    required["nodeSelectorTerms"] = terms
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    result["nodeAffinity"] = node_affinity
    return result


def tolerations(model: LLMModel) -> list[Manifest]:
    """The GPU toleration (when GPUs are asked for) plus the spec's."""
    theirs = [
        t.model_dump(by_alias=True, exclude_none=True)
        for t in model.spec.placement.tolerations
    ]
    return ([gpu_toleration()] if model.spec.resources.gpus > 0 else []) + theirs


def _pod_spec(model: LLMModel, settings: OperatorSettings) -> Manifest:
    pod = model.spec.pod
    volumes, _ = _volumes(model)
    spec: Manifest = {
        "containers": [_container(model, settings)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": model.spec.engine.drain_seconds
        + shutdown_seconds(model),
        # Service links would put variables such as VLLM_PORT (from a Service named
        # vllm) into the environment, which vLLM reads as its own settings.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            # A cache of hundreds of gigabytes is not re-chowned on every start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    optional: dict[str, Any] = {
        "nodeSelector": node_selector(model),
        "affinity": affinity(model),
        "tolerations": tolerations(model),
        "serviceAccountName": pod.service_account_name,
        "priorityClassName": pod.priority_class_name,
        "imagePullSecrets": [{"name": s.name} for s in pod.image_pull_secrets],
    }
    spec.update({k: v for k, v in optional.items() if v})
    return spec


def build_deployment(model: LLMModel, settings: OperatorSettings) -> Manifest:
    """The Deployment running the model's vLLM servers."""
    rollout = model.spec.rollout
    pod_annotations = {
        "kubectl.kubernetes.io/default-container": names.CONTAINER_NAME,
        **(model.spec.pod.annotations or {}),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(model, model.name),
        "spec": {
            "replicas": model.spec.replicas,
            "selector": {"matchLabels": selector_labels(model)},
            # maxSurge 0 by default: a model holding every GPU of its node could
            # never start a surge pod (docs/concepts.md, "Updates").
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": rollout.max_surge,
                    "maxUnavailable": rollout.max_unavailable,
                },
            },
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": model.spec.engine.startup_timeout_seconds
            + PROGRESS_MARGIN_SECONDS,
            "template": {
                "metadata": {
                    "labels": {**(model.spec.pod.labels or {}), **labels(model)},
                    "annotations": pod_annotations,
                },
                "spec": _pod_spec(model, settings),
            },
        },
    }
