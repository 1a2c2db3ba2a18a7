"""The simulator's prefix-cache counters against the real CPU vLLM (`make vllm`).

The same sequence of prompts goes to vLLM (token ids, so lengths are exact) and to
the simulator (one character per token, block size 128 like the CPU vLLM); after
each request the change of `vllm:prefix_cache_queries_total` and
`vllm:prefix_cache_hits_total` is compared.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from citadel_bench.procs import (
    REPO,
    Proc,
    simulator_argv,
    start,
    stop,
    wait_listening,
)

VLLM_SUPPORT = REPO / "tests" / "support" / "vllm"
BLOCK = 128
QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"


def _ids(seed: int, length: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 31) % 20000 for i in range(length)]


# (what, prompt token ids): the same prefixes, repeated, extended and changed.
A = _ids(1, 300)
B = _ids(2, 256)
SCENARIOS: list[tuple[str, list[int]]] = [
    ("300 tokens, first time", A),
    ("the same 300 again", A),
    ("those 300 plus 100 more", A + _ids(3, 100)),
    ("256 tokens (2 full blocks), first time", B),
    ("the same 256 again", B),
    ("the 300 with the first token changed", [7, *A[1:]]),
]


@dataclass
class CheckRow:
    what: str
    prompt_tokens: int
    vllm: tuple[float, float]
    sim: tuple[float, float]

    @property
    def match(self) -> bool:
        return self.vllm == self.sim


def _metrics(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    sums = {QUERIES: 0.0, HITS: 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums[QUERIES], sums[HITS]


def _complete(url: str, model: str, prompt: list[int] | str) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


def _deltas(
    url: str, model: str, sequence: list[list[int]] | list[str]
) -> list[tuple[float, float]]:
    out = []
    before = _metrics(url)
    for prompt in sequence:
        _complete(url, model, prompt)
        after = _metrics(url)
        out.append((after[0] - before[0], after[1] - before[1]))
        before = after
    return out


def as_text(ids: list[int]) -> str:
    """One character per token id, for the simulator at one character a token."""
    return "".join(chr(0x4E00 + i % 20000) for i in ids)


def start_simulator(log_dir: Path) -> tuple[Proc, str]:
    """A simulator set up like the CPU vLLM (block size 128, one character a
    token) and its base URL; stop it with `procs.stop`."""
    sim = start(
        "check-sim",
        simulator_argv(
            1,
            "--block-size",
            str(BLOCK),
            "--chars-per-token",
            "1",
            "--decode-base-s",
            "0.001",
        ),
        log_dir,
    )
    try:
        return sim, f"http://127.0.0.1:{wait_listening(sim)[0]}"
    except Exception:
        stop(sim)
        raise


def compare(vllm_url: str, vllm_model: str, sim_url: str) -> list[CheckRow]:
    """Sends the scenarios to both servers, each prompt once, in order.

    Args:
        vllm_url: the vLLM server's base URL (block size 128, prefix caching on).
        vllm_model: the name that server serves.
        sim_url: the simulator's base URL (from `start_simulator`).
    """
    sim_deltas = _deltas(sim_url, "sim", [as_text(p) for p in prompts()])
    real = _deltas(vllm_url, vllm_model, list(prompts()))
    return [
        CheckRow(what, len(ids), real[i], sim_deltas[i])
        for i, (what, ids) in enumerate(SCENARIOS)
    ]


def run_check(log_dir: Path) -> tuple[list[CheckRow], str | None]:
    """The comparison table, or the reason it could not run."""
    sys.path.insert(0, str(VLLM_SUPPORT))
    try:
        import vllm_server  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(VLLM_SUPPORT))
    reason = vllm_server.missing_reason()
    if reason:
        return [], reason
    sim, sim_url = start_simulator(log_dir)
    try:
        with vllm_server.run_vllm(
            vllm_server.model_path(vllm_server.TINY_RANDOM),
            port=vllm_server.free_port(),
            host="127.0.0.1",
            served_names=["tiny"],
            log_path=log_dir / "vllm-check.log",
        ) as server:
            return compare(server.base_url, "tiny", sim_url), None
    finally:
        stop(sim)


def prompts() -> list[list[int]]:
    """The scenarios' prompts, in order."""
    return [ids for _, ids in SCENARIOS]
