"""The Deployment builder: engine arguments, GPUs, volumes, probes, placement."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from citadel.operator.builders.common import BuildError
from citadel.operator.builders.deployment import build_deployment, engine_args
from citadel.operator.model import LLMModel
from citadel.operator.settings import OperatorSettings

from .samples import make_model, model_body

pytestmark = pytest.mark.unit
# The flags the operator owns, for the two-GPU Mixtral of these tests.
MANAGED = [
    "--model=mistralai/Mixtral-8x7B-Instruct-v0.1",
    "--served-model-name",
    "mixtral",
    "--host=0.0.0.0",
    "--port=8000",
    "--tensor-parallel-size=2",
]


def _pod(settings: OperatorSettings, **spec: Any) -> dict[str, Any]:
    return build_deployment(make_model(**spec), settings)["spec"]["template"]["spec"]


def _container(settings: OperatorSettings, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = _pod(settings, **spec)["containers"][0]
    return container


@pytest.mark.parametrize("gpus", [0, 1, 2, 8])
def test_gpus_become_the_limit_and_tensor_parallel_size(
    settings: OperatorSettings, gpus: int
) -> None:
    pod = _pod(settings, resources={"gpus": gpus})
    container = pod["containers"][0]
    limits = container["resources"].get("limits", {})
    tp = [a for a in container["args"] if a.startswith("--tensor-parallel-size")]
    gpu_toleration = {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    if gpus:
        assert limits["nvidia.com/gpu"] == str(gpus)
        assert tp == [f"--tensor-parallel-size={gpus}"]
        assert gpu_toleration in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in limits
        assert tp == []
        assert "tolerations" not in pod


def test_engine_arguments_follow_the_spec(settings: OperatorSettings) -> None:
    model = make_model(
        servedName="mixtral",
        aliases=["chat-default"],
        resources={"gpus": 2},
        engine={
            "maxModelLen": 32768,
            "gpuMemoryUtilization": 0.85,
            "dtype": "bfloat16",
            "quantization": "awq",
            "extraArgs": ["--enable-prefix-caching", "--max-num-seqs", "128"],
        },
    )
    assert engine_args(model) == [
        "--gpu-memory-utilization=0.85",
        "--max-model-len=32768",
        "--dtype=bfloat16",
        "--quantization=awq",
        "--shutdown-timeout=55",
        "--enable-prefix-caching",
        "--max-num-seqs",
        "128",
        # Last, so that no spelling in extraArgs overrides them (vLLM keeps a
        # flag's last value); the aliases are the gateway's alone.
        *MANAGED,
    ]


def test_an_alias_change_restarts_no_replica(settings: OperatorSettings) -> None:
    before = build_deployment(make_model(), settings)["spec"]["template"]
    after = build_deployment(make_model(aliases=["chat-default"]), settings)
    assert after["spec"]["template"] == before


def test_the_server_finishes_requests_in_flight_before_the_grace_ends() -> None:
    model = make_model(engine={"drainSeconds": 10})
    pod = build_deployment(model, OperatorSettings())["spec"]["template"]["spec"]
    assert "--shutdown-timeout=55" in engine_args(model)
    assert pod["terminationGracePeriodSeconds"] == 10 + 60
    own = make_model(engine={"extraArgs": ["--shutdown-timeout=5"]})
    assert [a for a in engine_args(own) if "shutdown" in a] == ["--shutdown-timeout=5"]


@pytest.mark.parametrize(
    ("extra", "grace"),
    [
        (["--shutdown-timeout=5"], 10 + 60),
        (["--shutdown-timeout=300"], 10 + 305),
        (["--shutdown-timeout", "120"], 10 + 125),
        (["--shutdown-timeout=999999999"], 10 + 24 * 3600 + 5),
        (["--shutdown-timeout=inf"], 10 + 60),
        # vLLM's parser reads underscores as dashes, and takes abbreviations.
        (["--shutdown_timeout=600"], 10 + 605),
        (["--shutdown_timeout", "600"], 10 + 605),
        (["--shutdown-time=300"], 10 + 305),
        (["--shu=300"], 10 + 305),
        (["--shu", "300"], 10 + 305),
        (["--shutdown-timeout=300", "--shutdown-timeout=20"], 10 + 60),
        (["--shutdown-timeout=soon"], 10 + 60),
    ],
)
def test_the_grace_period_outlasts_a_longer_shutdown_timeout(
    settings: OperatorSettings, extra: list[str], grace: int
) -> None:
    """The kubelet must not kill a server that extraArgs told to wait longer."""
    model = make_model(engine={"drainSeconds": 10, "extraArgs": extra})
    pod = build_deployment(model, settings)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    # The user's timeout, in whatever spelling, replaces the operator's.
    assert "--shutdown-timeout=55" not in engine_args(model)


def test_without_extra_args_the_arguments_keep_their_order() -> None:
    """An upgrade of the operator must not roll models it builds the same way."""
    args = engine_args(make_model(resources={"gpus": 2}))
    assert args == [
        *MANAGED,
        "--gpu-memory-utilization=0.9",
        "--dtype=auto",
        "--shutdown-timeout=55",
    ]


# Deployments as the operator built them before adapters existed, with the specs
# they were built from. A deliberate change to the pod updates this file, and
# rolls every model when the operator is upgraded.
GOLDEN = Path(__file__).parent / "golden" / "deployments.json"


@pytest.mark.parametrize("adapters", [None, []])
def test_a_model_without_adapters_keeps_its_deployment(
    settings: OperatorSettings, adapters: list[Any] | None
) -> None:
    """Upgrading the operator must roll no model that has no adapters."""
    golden = json.loads(GOLDEN.read_text())
    for name, case in golden.items():
        spec = dict(case["spec"])
        if adapters is not None:
            spec["adapters"] = adapters
        built = build_deployment(LLMModel.from_body(model_body(name, **spec)), settings)
        assert json.dumps(built) == json.dumps(case["deployment"]), name


def test_served_name_defaults_to_the_model_name(settings: OperatorSettings) -> None:
    args = engine_args(make_model("smol"))
    at = args.index("--served-model-name")
    assert args[at : at + 3] == ["--served-model-name", "smol", "--host=0.0.0.0"]


@pytest.mark.parametrize("extra", [[], ["--enable-prefix-caching"]])
def test_vllm_listens_on_the_operators_host(extra: list[str]) -> None:
    """On an IPv6 cluster the probes and the gateway reach the pod's IPv6
    address, where a server on 0.0.0.0 refuses the connection."""
    settings = OperatorSettings(vllm_host="::")
    pod = build_deployment(make_model(engine={"extraArgs": extra}), settings)
    args = pod["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--host")] == ["--host=::"]
    if extra:  # after them, so that no spelling there overrides it
        assert args.index("--host=::") > args.index(extra[0])


def test_s3_models_stream_with_the_run_ai_loader(settings: OperatorSettings) -> None:
    args = engine_args(make_model(model="s3://weights/llama/8b"))
    assert "--model=s3://weights/llama/8b" in args
    assert "--load-format=runai_streamer" in args


def test_pvc_source_is_mounted_read_only(settings: OperatorSettings) -> None:
    pod = _pod(settings, model="pvc://weights/llama-3.1-8b")
    container = pod["containers"][0]
    assert "--model=/model-source/llama-3.1-8b" in container["args"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model-source")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}


@pytest.mark.parametrize("cache", [None, {"size": "200Gi"}])
def test_cache_is_the_claim_or_an_empty_dir(
    settings: OperatorSettings, cache: dict[str, str] | None
) -> None:
    spec = {"cache": cache} if cache else {}
    pod = _pod(settings, **spec)
    volume = next(v for v in pod["volumes"] if v["name"] == "cache")
    if cache:
        assert volume["persistentVolumeClaim"] == {"claimName": "mixtral-cache"}
    else:
        assert volume["emptyDir"] == {}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["HF_HOME"] == "/cache/huggingface"


def test_shared_memory_is_memory_backed(settings: OperatorSettings) -> None:
    pod = _pod(settings, engine={"shmSize": "32Gi"})
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/dev/shm", "/cache", "/tmp"} <= mounts


def test_hf_token_comes_from_the_secret_and_user_env_wins(
    settings: OperatorSettings,
) -> None:
    container = _container(
        settings,
        engine={
            "hfTokenSecretRef": {"name": "hf"},
            "env": [
                {"name": "HF_HOME", "value": "/elsewhere"},
                {"name": "X", "value": "1"},
            ],
        },
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "hf", "key": "token"}
    }
    assert env["HF_HOME"]["value"] == "/elsewhere"
    assert [e["name"] for e in container["env"]].count("HF_HOME") == 1


def test_probes_allow_long_model_loads(settings: OperatorSettings) -> None:
    container = _container(settings, engine={"startupTimeoutSeconds": 3600})
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["failureThreshold"] >= 3


def test_security_context_is_restricted(settings: OperatorSettings) -> None:
    pod = _pod(settings)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = pod["containers"][0]["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False


def test_drain_and_grace_period(settings: OperatorSettings) -> None:
    pod = _pod(settings, engine={"drainSeconds": 20})
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 20}}}
    assert pod["terminationGracePeriodSeconds"] == 80
    assert (
        "lifecycle" not in _pod(settings, engine={"drainSeconds": 0})["containers"][0]
    )


def test_update_strategy_never_surges_by_default(settings: OperatorSettings) -> None:
    spec = build_deployment(make_model(), settings)["spec"]
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    surging = build_deployment(make_model(rollout={"maxSurge": 1}), settings)["spec"]
    assert surging["strategy"]["rollingUpdate"]["maxSurge"] == 1


def test_image_defaults_to_the_pinned_one(settings: OperatorSettings) -> None:
    assert _container(settings)["image"] == "vllm/vllm-openai:v0.33.0"
    custom = _container(settings, engine={"image": "registry.local/vllm:1"})
    assert custom["image"] == "registry.local/vllm:1"


def test_labels_selector_and_owner(settings: OperatorSettings) -> None:
    deployment = build_deployment(make_model(pod={"labels": {"team": "a"}}), settings)
    meta = deployment["metadata"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "citadel-operator"
    assert meta["labels"]["app.kubernetes.io/instance"] == "mixtral"
    assert meta["ownerReferences"][0]["uid"] == "uid-mixtral"
    selector = deployment["spec"]["selector"]["matchLabels"]
    template = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template.items()
    assert template["team"] == "a"


NODE_PIN = {"key": "metadata.name", "operator": "In", "values": ["hx-llm-server-01"]}


@pytest.mark.parametrize(
    ("placement", "selector", "terms"),
    [
        ({}, None, None),
        ({"nodeName": "hx-llm-server-01"}, None, [{"matchFields": [NODE_PIN]}]),
        (
            {"gpuProduct": "NVIDIA-A100-SXM4-80GB"},
            {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            None,
        ),
        ({"nodeSelector": {"zone": "a"}}, {"zone": "a"}, None),
        (
            {
                "nodeName": "hx-llm-server-01",
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": "a", "operator": "Exists"}
                                    ]
                                }
                            ]
                        }
                    }
                },
            },
            None,
            [
                {
                    "matchExpressions": [{"key": "a", "operator": "Exists"}],
                    "matchFields": [NODE_PIN],
                }
            ],
        ),
    ],
)
def test_placement_variants(
    settings: OperatorSettings,
    placement: dict[str, Any],
    selector: dict[str, str] | None,
    terms: list[dict[str, Any]] | None,
) -> None:
    pod = _pod(settings, placement=placement)
    assert pod.get("nodeSelector") == selector
    affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
    assert required.get("nodeSelectorTerms") == terms
    assert "nodeName" not in pod  # always through the scheduler


@pytest.mark.parametrize(
    ("affinity", "named"),
    [
        # A common YAML slip: the terms written as a map instead of a list.
        (
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": {
                            "matchExpressions": [{"key": "a", "operator": "Exists"}]
                        }
                    }
                }
            },
            "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms "
            "must be a list of objects, not a map",
        ),
        (
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchFields": {"key": "x"}}]
                    }
                }
            },
            "nodeSelectorTerms[0].matchFields must be a list of objects, not a map",
        ),
        (
            {"nodeAffinity": ["required"]},
            "placement.affinity.nodeAffinity must be an object",
        ),
    ],
)
def test_a_malformed_affinity_beside_node_name_is_a_clear_error(
    settings: OperatorSettings, affinity: dict[str, Any], named: str
) -> None:
    # The CRD refuses these shapes; objects stored before it did still get here.
    model = make_model(placement={"nodeName": "hx-llm-server-01", "affinity": affinity})
    with pytest.raises(BuildError, match=re.escape(named)):
        build_deployment(model, settings)


def test_user_tolerations_are_added(settings: OperatorSettings) -> None:
    pod = _pod(
        settings,
        placement={
            "tolerations": [
                {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}
            ]
        },
    )
    assert {
        "key": "dedicated",
        "operator": "Equal",
        "value": "llm",
        "effect": "NoSchedule",
    } in pod["tolerations"]
    assert len(pod["tolerations"]) == 2


@pytest.mark.parametrize(("gpus", "visible"), [(0, "void"), (2, None)])
def test_a_model_without_gpus_sees_none_of_the_node(
    settings: OperatorSettings, gpus: int, visible: str | None
) -> None:
    """CUDA images set NVIDIA_VISIBLE_DEVICES=all: a pod that asked the device
    plugin for no GPU would otherwise get every GPU of its node."""
    container = _container(settings, resources={"gpus": gpus})
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.get("NVIDIA_VISIBLE_DEVICES") == visible


ADAPTERS = [
    {"name": "sql-expert", "source": "org/sql-lora"},
    {"name": "support-bot", "source": "pvc://adapters/support-bot/v3"},
    {"name": "legal", "source": "pvc://adapters/legal"},
    {"name": "baked", "source": "/opt/adapters/baked"},
    {"name": "whole-claim", "source": "pvc://other-claim/"},
]


@pytest.mark.parametrize("extra", [[], ["--enable-prefix-caching"]])
def test_adapters_become_vllms_lora_flags(extra: list[str]) -> None:
    model = make_model(
        "smollm2",
        adapters=ADAPTERS,
        resources={"gpus": 2},
        engine={"maxLoraRank": 64, "maxLoras": 2, "extraArgs": extra},
    )
    args = engine_args(model)
    lora = [
        "--enable-lora",
        "--max-lora-rank=64",
        "--max-loras=2",
        "--lora-modules",
        '{"name":"sql-expert","path":"org/sql-lora","base_model_name":"smollm2"}',
        '{"name":"support-bot","path":"/adapters/adapters/support-bot/v3",'
        '"base_model_name":"smollm2"}',
        '{"name":"legal","path":"/adapters/adapters/legal",'
        '"base_model_name":"smollm2"}',
        '{"name":"baked","path":"/opt/adapters/baked","base_model_name":"smollm2"}',
        '{"name":"whole-claim","path":"/adapters/other-claim",'
        '"base_model_name":"smollm2"}',
    ]
    # Right after the operator's other flags: after extraArgs, so that no
    # spelling there overrides them, and --lora-modules ends at the next flag.
    at = args.index("--tensor-parallel-size=2") + 1
    assert args[at : at + len(lora)] == lora
    if extra:
        assert args[at + len(lora) :] == []
    else:
        assert args[at + len(lora)].startswith("--gpu-memory-utilization")


def test_an_adapter_names_the_served_name_as_its_base() -> None:
    model = make_model(
        "smollm2",
        servedName="smol",
        adapters=[{"name": "sql", "source": "org/sql-lora"}],
    )
    args = engine_args(model)
    assert args[args.index("--lora-modules") + 1 :][0] == (
        '{"name":"sql","path":"org/sql-lora","base_model_name":"smol"}'
    )
    # vLLM's defaults where the spec leaves them out.
    assert not [a for a in args if a.startswith(("--max-lora-rank", "--max-loras"))]


def test_each_adapter_claim_is_mounted_once_read_only(
    settings: OperatorSettings,
) -> None:
    long_claim = "a" * 100  # longer than a volume's name may be
    pod = _pod(
        settings,
        adapters=[*ADAPTERS, {"name": "long", "source": f"pvc://{long_claim}/x"}],
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    claims = {
        name: (v["persistentVolumeClaim"], mounts[name]["mountPath"])
        for name, v in volumes.items()
        if name.startswith("adapters-")
    }
    assert claims == {
        "adapters-0": (
            {"claimName": "adapters", "readOnly": True},
            "/adapters/adapters",
        ),
        "adapters-1": (
            {"claimName": "other-claim", "readOnly": True},
            "/adapters/other-claim",
        ),
        "adapters-2": (
            {"claimName": long_claim, "readOnly": True},
            f"/adapters/{long_claim}",
        ),
    }
    assert all(mounts[name]["readOnly"] is True for name in claims)
    for name in volumes:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert len(pod["volumes"]) == len(volumes)  # unique names
    paths = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert len(paths) == len(set(paths))


def test_an_adapter_in_a_claim_already_mounted_uses_that_mount(
    settings: OperatorSettings,
) -> None:
    """The model's own claim and its cache claim are not mounted twice."""
    model = make_model(
        "smollm2",
        model="pvc://weights/smollm2",
        cache={"size": "50Gi"},
        adapters=[
            {"name": "sql", "source": "pvc://weights/lora/sql"},
            {"name": "chat", "source": "pvc://smollm2-cache/lora/chat"},
        ],
    )
    args = engine_args(model)
    after = args[args.index("--lora-modules") + 1 :]
    modules = [json.loads(a) for a in after if a.startswith("{")]
    assert [m["path"] for m in modules] == [
        "/model-source/lora/sql",
        "/cache/lora/chat",
    ]
    pod = build_deployment(model, settings)["spec"]["template"]["spec"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert sorted(claims) == ["smollm2-cache", "weights"]


def test_changing_the_adapters_rolls_the_replicas(settings: OperatorSettings) -> None:
    """vLLM loads adapters at start: a new list needs new pods."""
    before = build_deployment(make_model(adapters=ADAPTERS[:1]), settings)
    after = build_deployment(make_model(adapters=ADAPTERS[:2]), settings)
    assert after["spec"]["template"] != before["spec"]["template"]


@pytest.mark.parametrize(
    "flag",
    [
        "--lora-modules",
        "--lora_m=old=/old",
        "--enable-lora",
        "--enable-lor",
        "--max-lora-r=8",
        "--max-loras=2",
        "--max_loras.x=1",
    ],
)
def test_lora_flags_kept_in_extra_args_refuse_adapters(flag: str) -> None:
    """A model applied before the CRD refused LoRA flags in extraArgs keeps
    them (the API server lets an unchanged field stay); given spec.adapters
    too, vLLM would keep only the last --lora-modules and drop the adapters
    named in extraArgs without a word: a failure saying what to move."""
    extra = [flag, "old=/old"] if "=" not in flag else [flag]
    model = make_model("smollm2", adapters=ADAPTERS, engine={"extraArgs": extra})
    with pytest.raises(BuildError, match=re.escape("spec.adapters now sets")):
        engine_args(model)
    both = make_model(
        "smollm2",
        adapters=ADAPTERS,
        engine={"extraArgs": [*extra, "--max-model-len=4096", "--enable-lora"]},
    )
    # Every one named at once, so that one change is enough.
    named = f"sets {extra[0]!r}, '--enable-lora', which"
    with pytest.raises(BuildError, match=re.escape(named)):
        engine_args(both)
    # Without adapters they stay as they were: the model is not rolled.
    kept = make_model("smollm2", engine={"extraArgs": extra})
    args = engine_args(kept)
    at = args.index(extra[0])
    assert args[at : at + len(extra)] == extra


@pytest.mark.parametrize(
    "flag",
    [
        "--max-cpu-loras=4",
        "--lora-dtype=auto",
        "--no-enable-lora-bias",
        # A flag of vLLM's that only begins like --max-lora-rank.
        "--max-lora-cls-labels=2",
        # `_` is `-` only after the two dashes, for vLLM as for the CRD's rule:
        # these are no LoRA flags (vLLM refuses them as unknown).
        "-_lora-m=1",
        "__enable-lora",
    ],
)
def test_other_lora_settings_in_extra_args_go_with_adapters(flag: str) -> None:
    model = make_model("smollm2", adapters=ADAPTERS, engine={"extraArgs": [flag]})
    assert flag in engine_args(model)
