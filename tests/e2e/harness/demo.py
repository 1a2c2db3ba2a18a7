"""`make demo`: the main job on a fresh machine.

Builds what is missing (the cluster's binaries, the CPU vLLM), brings up the local
cluster with its pod runtime, installs Citadel's chart, applies an LLMModel serving
SmolLM2 on hx-llm-server-01, shows its phase and conditions as they change, creates
an API key, and asks the model a question through the gateway with the official
`openai` client. `make demo-down` removes it all again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from .cluster import Cluster, ClusterError, say
from .config import HARNESS_DIR
from .kube import KubeCluster
from .wait import wait_for

REPO = HARNESS_DIR.parents[2]
DEMO_DIR = HARNESS_DIR.parent / "demo"
RELEASE = "citadel"
SYSTEM_NS = "citadel-system"
MODEL_NS = "llm-demo"
MODEL = "smollm2"
QUESTION = "What is the capital of France? Answer in one sentence."


def install_chart(
    k: KubeCluster,
    release: str = RELEASE,
    namespace: str = SYSTEM_NS,
    extra: tuple[str, ...] = (),
) -> None:
    """`helm upgrade --install` with the demo values, after the documented
    server-side apply of the CRDs (Helm installs `crds/` once, never upgrades them).

    Args:
        k: the cluster.
        release: the Helm release name.
        namespace: the release's namespace (the gateway's and the routes').
        extra: more helm arguments, such as `--set` lines.
    """
    k.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    listed = k.helm("list", "-n", namespace, "--pending", "-q", check=False).split()
    if release in listed:
        # A run stopped half-way leaves the release locked as pending.
        say(f"removing the release {release} left pending by an interrupted run")
        k.helm("uninstall", release, "-n", namespace, "--wait", timeout=300)
    started = time.monotonic()
    k.helm(
        "upgrade",
        "--install",
        release,
        str(REPO / "charts" / "citadel"),
        "--namespace",
        namespace,
        "--create-namespace",
        "-f",
        str(DEMO_DIR / "values.yaml"),
        "--wait",
        "--timeout=5m",
        *extra,
        timeout=330,
    )
    took = time.monotonic() - started
    say(f"chart installed; operator and gateway Ready in {took:.0f}s")


def model_state(k: KubeCluster, namespace: str = MODEL_NS) -> dict[str, Any]:
    out = k.kubectl(
        "get", "llmmodel", MODEL, "-n", namespace, "-o", "json", check=False
    )
    try:
        state: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        return {}
    return state


def watch_until_ready(
    k: KubeCluster, timeout: float, namespace: str = MODEL_NS, replicas: int = 1
) -> None:
    """Prints the model's phase and conditions each time they change, until it is
    Ready with `replicas` ready replicas."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = model_state(k, namespace).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        line = f"phase={status.get('phase', '-')} " + " ".join(
            f"{t}={c['status']}({c.get('reason', '')})"
            for t, c in sorted(conditions.items())
        )
        if line != seen:
            say(f"{MODEL}: {line}")
            ready = conditions.get("Ready", {})
            if ready.get("status") != "True" and ready.get("message"):
                say(f"    {ready['message']}")
            seen = line
        ready_replicas = status.get("replicas", {}).get("ready", 0)
        if status.get("phase") == "Ready" and ready_replicas >= replicas:
            return
        time.sleep(1)
    raise ClusterError(f"{MODEL} not Ready after {timeout:.0f}s")


def gateway_url(
    k: KubeCluster, release: str = RELEASE, namespace: str = SYSTEM_NS
) -> str:
    """The gateway's address: a ready endpoint of its Service (the local cluster
    has no kube-proxy, so the pod's own address stands in for the ingress)."""

    service = k.kubectl(
        "get",
        "services",
        "-n",
        namespace,
        "-o",
        "jsonpath={.items[0].metadata.name}",
        "-l",
        f"app.kubernetes.io/instance={release},app.kubernetes.io/component=gateway",
    ).strip()

    def ready_address() -> str | None:
        out = k.kubectl(
            "get",
            "endpointslices",
            "-n",
            namespace,
            "-l",
            f"kubernetes.io/service-name={service}",
            "-o",
            "json",
        )
        for item in json.loads(out)["items"]:
            port = next((p["port"] for p in item.get("ports") or []), None)
            for ep in item.get("endpoints") or []:
                if ep.get("conditions", {}).get("ready") and port:
                    return f"http://{ep['addresses'][0]}:{port}"
        return None

    return wait_for("a ready gateway endpoint", ready_address, timeout=120)


def create_key(
    k: KubeCluster, namespace: str = SYSTEM_NS, name: str = "", *options: str
) -> str:
    """A new API key for every model, made with the `citadel keys` CLI (with
    `options` besides, as `--priority sheddable`)."""
    result = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "citadel"),
            "keys",
            f"--kubeconfig={k.kubeconfig}",
            f"--namespace={namespace}",
            "create",
            name or f"demo-{int(time.time())}",
            "--models",
            "*",
            *options,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    key = next((w for w in result.stdout.split() if w.startswith("ctd-")), None)
    if key is None:
        raise ClusterError(f"no key in `citadel keys create` output: {result.stdout}")
    return key


def ask(base_url: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, timeout=120, max_retries=5)

    def answer() -> str | None:
        # The route reaches the gateway a moment after the model turns Ready.
        try:
            reply = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=40,
                temperature=0,
            )
        except Exception as err:
            say(f"    not yet: {err}")
            return None
        return reply.choices[0].message.content or ""

    return wait_for("an answer through the gateway", answer, timeout=120)


def up() -> None:
    began = time.monotonic()
    say("installing the CPU vLLM and the SmolLM2 model (cached after the first run)")
    subprocess.run(["bash", str(REPO / "tests/support/vllm/install.sh")], check=True)
    cluster = Cluster()
    cluster.up(merge_kubeconfig=True)
    k = cluster.admin()
    # The operator watches this namespace only: its Roles need it to exist.
    k.kubectl("create", "namespace", MODEL_NS, check=False)
    install_chart(k)
    k.kubectl("apply", "-n", MODEL_NS, "-f", str(DEMO_DIR / "smollm2.yaml"))
    say(f"applied LLMModel {MODEL_NS}/{MODEL}; waiting for it to be Ready")
    watch_until_ready(k, timeout=600)
    key = create_key(k)
    url = gateway_url(k)
    say(f"asking {MODEL} through the gateway at {url}: {QUESTION!r}")
    answer = ask(url, key)
    print(f"\n{MODEL} says: {answer.strip()}\n")
    print(NEXT_STEPS.format(url=url, key=key, model=MODEL))
    say(f"demo ready in {time.monotonic() - began:.0f}s")


NEXT_STEPS = """Call it yourself (the key is shown once; keep it):

  export OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY={key}
  curl -s $OPENAI_BASE_URL/chat/completions \\
    -H "Authorization: Bearer $OPENAI_API_KEY" -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'

  .venv/bin/python -P -c 'from openai import OpenAI; print(OpenAI()
    .chat.completions.create(model="{model}",
    messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)'

  .venv/bin/python -P -c 'from openai import OpenAI; print(OpenAI()
    .responses.create(model="{model}", input="Hi!").output_text)'

  kubectl get llmmodels -A          # the context citadel-local is now current
  kubectl describe llmmodel -n llm-demo {model}

Stop it all: make demo-down
"""


def down() -> None:
    cluster = Cluster()
    if cluster.healthy("kube-apiserver"):
        k = cluster.admin()
        k.kubectl(
            "delete",
            "namespace",
            MODEL_NS,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
            check=False,
            timeout=140,
        )
        k.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", check=False)
    cluster.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        up() if args.action == "up" else down()
    except (ClusterError, subprocess.CalledProcessError) as err:
        say(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
