"""Which local program plays which container image in the pod runtime.

This mapping lives in the test harness alone: the operator and the chart know
nothing of it. A pod opts in to the runtime with the annotation
`citadel.ai/runtime: local`; its first container's image picks the program:

- `*/vllm-openai:*`: the CPU build of vLLM (`make vllm`) serving SmolLM2-135M
  Instruct for any model id naming SmolLM2, else a tiny random-weights model; the
  pod's engine arguments are kept where they apply on a CPU (served names, port,
  extra flags) and dropped where they do not (tensor parallelism, GPU memory).
- `*/citadel-operator:*` and `*/citadel-gateway:*`: this checkout's console scripts.
- `*/redis:*`: Debian's redis-server.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import HARNESS_DIR

REPO = HARNESS_DIR.parents[2]
VENV_BIN = REPO / ".venv" / "bin"
RUNTIME_ANNOTATION = "citadel.ai/runtime"
# vLLM arguments that mean nothing on a CPU, with whether they take a value.
DROPPED_VLLM_ARGS = {
    "--tensor-parallel-size": True,
    "--gpu-memory-utilization": True,
    "--dtype": True,
    "--model": True,
    "--host": True,
    "--max-model-len": True,
    "--quantization": True,
    "--load-format": True,
}
CPU_MAX_MODEL_LEN = 2048


class ImageNotMapped(ValueError):
    """The runtime has no local program for this image."""


@dataclass(frozen=True)
class LocalCommand:
    """A program standing in for a container, and its extra environment."""

    argv: list[str]
    env: dict[str, str]


def _repository(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def _vllm_support() -> object:
    """tests/support/vllm/vllm_server.py, which knows the CPU vLLM's install."""
    support = str(REPO / "tests" / "support" / "vllm")
    if support not in sys.path:
        sys.path.insert(0, support)
    import vllm_server  # type: ignore[import-not-found]

    return vllm_server


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def vllm_command(args: Sequence[str], env: Mapping[str, str]) -> LocalCommand:
    """The CPU vLLM for a pod whose container runs vLLM's OpenAI server."""
    support: object = _vllm_support()
    reason = support.missing_reason()  # type: ignore[attr-defined]
    if reason:
        raise ImageNotMapped(f"the CPU vLLM is not installed: {reason}")
    model = _flag_value(args, "--model") or ""
    local = "smollm2-135m-instruct" if "smollm2" in model.lower() else "tiny-random"
    model_dir: Path = support.model_path(local)  # type: ignore[attr-defined]
    names: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if flag == "--served-model-name":
            i += 1
            while i < len(args) and not args[i].startswith("--"):
                names.append(args[i])
                i += 1
            continue
        if flag in DROPPED_VLLM_ARGS or flag == "--port":
            takes_value = flag == "--port" or DROPPED_VLLM_ARGS[flag]
            i += 1 if "=" in arg or not takes_value else 2
            continue
        kept.append(arg)
        i += 1
    wanted_len = int(_flag_value(args, "--max-model-len") or CPU_MAX_MODEL_LEN)
    argv = support.server_command(  # type: ignore[attr-defined]
        model_dir,
        port=int(_flag_value(args, "--port") or 8000),
        host="0.0.0.0",
        served_names=names,
        max_model_len=min(wanted_len, CPU_MAX_MODEL_LEN),
        dtype="float32",
        enforce_eager=True,
        extra_args=kept,
    )
    full_env = support.server_env(1, env)  # type: ignore[attr-defined]
    return LocalCommand(argv=list(argv), env=dict(full_env))


def resolve(
    image: str, args: Sequence[str], env: Mapping[str, str], kubeconfig: Path
) -> LocalCommand:
    """The local program for a container.

    Args:
        image: the container's image.
        args: the container's arguments (the image's entrypoint is implied).
        env: the container's environment, resolved.
        kubeconfig: a kubeconfig with the pod's ServiceAccount token.

    Raises:
        ImageNotMapped: no program plays this image.
    """
    repo = _repository(image)
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONSAFEPATH": "1",
        "HOME": "/tmp",
    }
    if repo.endswith("/vllm-openai"):
        return vllm_command(args, {**base, **env})
    if repo.endswith("/citadel-operator"):
        argv = [str(VENV_BIN / "citadel-operator"), *args]
        return LocalCommand(argv, {**base, **env, "KUBECONFIG": str(kubeconfig)})
    if repo.endswith("/citadel-gateway"):
        argv = [str(VENV_BIN / "citadel-gateway"), *args]
        extra = {"CITADEL_GATEWAY_KUBECONFIG": str(kubeconfig)}
        return LocalCommand(argv, {**base, **env, **extra})
    if repo.endswith("/redis"):
        argv = [
            "redis-server",
            "--port",
            "6379",
            "--protected-mode",
            "no",
            "--save",
            "",
        ]
        return LocalCommand(argv + list(args), {**base, **env})
    raise ImageNotMapped(f"the local pod runtime has no program for image {image}")
