"""The engine: continuous batching in simulated steps, in real (asyncio) time.

Each step admits waiting requests in arrival order while the running batch has
room and their KV blocks fit, gives the prefilling requests up to
`max_batched_tokens` of their uncached prompt tokens, lets every decoding request
make one token, sleeps for the step's modelled duration, then hands out the tokens.

Steps keep their own clock: an idle engine's step starts when a request arrives,
and each later step when the one before it ends, however late the event loop gets
round to it (it is shared with the other replicas of the process).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from simulator.kvcache import Allocation, KVCache, block_hashes, count_tokens
from simulator.params import SimParams

WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing")


def output_text(tokens: int, start: int = 0, chars_per_token: int = 4) -> str:
    """The text of generated tokens `start`..`tokens`: each token is one piece of
    exactly `chars_per_token` characters, so text and token counts agree."""
    size = max(1, chars_per_token)
    pieces = []
    for i in range(start, tokens):
        word = WORDS[i % len(WORDS)]
        pieces.append((word * size)[: size - 1] + " " if size > 1 else word[0])
    return "".join(pieces)


@dataclass
class Sequence:
    """One request inside the engine."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    hashes: list[int]
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    allocation: Allocation | None = None
    to_prefill: int = 0
    generated: int = 0
    cached_tokens: int = 0
    arrived: float = 0.0
    """When it was submitted (time.monotonic)."""


# vLLM 0.32.0's buckets for vllm:time_to_first_token_seconds
# (vllm/v1/metrics/buckets.py, TIME_TO_FIRST_TOKEN_BUCKETS).
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


@dataclass
class Counters:
    """vLLM's counters (in tokens for the prefix cache), and its time-to-first-
    token histogram: from a request's arrival at the engine to its first token,
    so, unlike a client's TTFT, without any proxy or network in front."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    ttft_sum_s: float = 0.0
    ttft_buckets: list[int] = field(
        default_factory=lambda: [0] * (len(TTFT_BUCKETS_S) + 1)
    )
    """Observations per bucket (not cumulative), the last one above them all."""
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        """Counts one request's time to first token."""
        self.ttft_sum_s += seconds
        self.ttft_count += 1
        # The first bound at or above it (Prometheus buckets are `le`); past
        # them all, the last slot.
        self.ttft_buckets[bisect.bisect_left(TTFT_BUCKETS_S, seconds)] += 1


class Engine:
    """One replica's scheduler and KV cache."""

    def __init__(self, params: SimParams) -> None:
        self.params = params
        self.cache = KVCache(params.num_blocks, params.block_size)
        self.counters = Counters()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the step loop (call inside the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stops the step loop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def prepare(self, prompt: str, max_tokens: int) -> Sequence:
        """A sequence for `prompt` (not yet submitted)."""
        p = self.params
        return Sequence(
            prompt=prompt,
            prompt_tokens=count_tokens(prompt, p.chars_per_token),
            max_tokens=max(1, max_tokens),
            hashes=block_hashes(prompt, p.block_size, p.chars_per_token),
        )

    def fits(self, seq: Sequence) -> bool:
        """Whether the request could ever run here."""
        total = seq.prompt_tokens + seq.max_tokens
        return total <= self.params.max_model_len and self.cache.fits_ever(total)

    def submit(self, seq: Sequence) -> None:
        """Queues a request; its tokens arrive on `seq.tokens`, then None."""
        seq.arrived = time.monotonic()
        self.waiting.append(seq)
        self._wake.set()

    def _admit(self, start: float | None) -> None:
        p = self.params
        while self.waiting and len(self.running) < p.max_num_seqs:
            seq = self.waiting[0]
            if start is not None and seq.arrived > start:
                return
            allocation = self.cache.allocate(
                seq.hashes, seq.prompt_tokens, seq.prompt_tokens + seq.max_tokens
            )
            if allocation is None:
                return
            self.waiting.popleft()
            seq.allocation = allocation
            seq.cached_tokens = allocation.hit_tokens
            seq.to_prefill = seq.prompt_tokens - allocation.hit_tokens
            self.counters.prefix_queries += seq.prompt_tokens
            self.counters.prefix_hits += allocation.hit_tokens
            self.counters.prompt_tokens += seq.prompt_tokens
            self.running.append(seq)

    def plan_step(self, start: float | None = None) -> tuple[float, list[Sequence]]:
        """Admits what fits and returns the step's duration and the sequences that
        make a token at its end (prefill budget is consumed here).

        Args:
            start: when the step begins (time.monotonic); requests that arrived
                after it wait for a later step. None admits every waiting request.
        """
        self._admit(start)
        budget = self.params.max_batched_tokens
        decoding = [s for s in self.running if s.to_prefill == 0]
        budget -= len(decoding)
        emitting = list(decoding)
        prefill = 0
        for seq in self.running:
            if seq.to_prefill == 0 or budget <= 0:
                continue
            chunk = min(seq.to_prefill, budget)
            seq.to_prefill -= chunk
            budget -= chunk
            prefill += chunk
            if seq.to_prefill == 0:
                emitting.append(seq)
        return self.params.step_time(len(decoding), prefill), emitting

    def finish_step(self, emitting: list[Sequence]) -> None:
        """Hands one token to each sequence in `emitting`; frees finished ones."""
        done: list[Sequence] = []
        now = time.monotonic()
        for seq in emitting:
            seq.generated += 1
            self.counters.generation_tokens += 1
            if seq.generated == 1 and seq.arrived:
                self.counters.observe_ttft(now - seq.arrived)
            seq.tokens.put_nowait(seq.generated)
            if seq.generated >= seq.max_tokens:
                done.append(seq)
        p = self.params
        for seq in done:
            self.running.remove(seq)
            if seq.allocation is not None:
                # The reply's full blocks are hashed over prompt + reply text,
                # which is how the next turn of a chat starts.
                text = seq.prompt + output_text(seq.generated, 0, p.chars_per_token)
                full = block_hashes(text, p.block_size, p.chars_per_token)
                self.cache.free(seq.allocation, full)
            self.counters.requests_finished += 1
            seq.tokens.put_nowait(None)

    def cancel(self, seq: Sequence) -> None:
        """Drops a request whose client went away."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            if seq.allocation is not None:
                self.cache.free(seq.allocation)

    async def _loop(self) -> None:
        start = 0.0  # when the current (or last) step began
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            if not self.running and self.waiting:
                # An idle engine starts a step as soon as a request arrives, as
                # vLLM's engine core wakes on its input queue. This loop may get
                # here later, while the process parses a burst of requests for
                # all its replicas; the step still starts at the arrival, and
                # requests parsed in the meantime wait for the next step, as they
                # would on a replica of their own.
                start = max(start, self.waiting[0].arrived)
            duration, emitting = self.plan_step(start)
            if not emitting and not self.running:
                # Nothing fits although the cache is empty: cannot happen after
                # `fits`; wait for a change instead of spinning.
                self._wake.clear()
                await self._wake.wait()
                continue
            end = start + duration
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            self.finish_step(emitting)
            # Back to back on the engine's own clock: a late wake-up shortens
            # the next sleep instead of adding to every step.
            start = end
