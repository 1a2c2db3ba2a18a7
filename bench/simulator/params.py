"""The simulator's parameters (see MODEL.md for where each default comes from)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimParams:
    """Timing and capacity of one simulated vLLM replica.

    The defaults model Llama-3.1-8B in bfloat16 on one 80 GB H100 (MODEL.md).
    """

    block_size: int = 16
    """Tokens per KV-cache block (vLLM's GPU default; its CPU backend uses 128)."""
    kv_capacity_tokens: int = 440_000
    """KV-cache size in tokens: (0.9 x 80 GB - 16 GB weights) / 128 KiB per token."""
    prefill_tokens_per_s: float = 20_000.0
    """Prompt tokens computed per second (assumption, see MODEL.md)."""
    decode_base_s: float = 0.0065
    """Time of one decode step with one running request."""
    decode_per_seq_s: float = 0.00028
    """Extra time of a decode step per running request."""
    max_num_seqs: int = 256
    """Most requests running at once (vLLM's default)."""
    max_batched_tokens: int = 8192
    """Tokens one step may process (chunked prefill budget)."""
    chars_per_token: int = 4
    """The simulated tokenizer: characters per token."""
    default_max_tokens: int = 64
    """Reply length when a request sets no `max_tokens`."""
    stream_every: int = 1
    """Tokens per streamed chunk after the first (vLLM sends one per token; more
    spares the CPU of a benchmark machine)."""
    max_model_len: int = 32_768
    """Longest prompt plus reply accepted."""
    instant: bool = False
    """Answer at once without the timing model (a fast backend for overhead runs)."""

    @property
    def num_blocks(self) -> int:
        """KV-cache capacity in blocks."""
        return max(1, self.kv_capacity_tokens // self.block_size)

    def step_time(self, decoding: int, prefill_tokens: int) -> float:
        """Seconds one engine step takes with `decoding` requests each making a
        token and `prefill_tokens` prompt tokens computed."""
        decode = self.decode_base_s + self.decode_per_seq_s * max(0, decoding - 1)
        return decode + prefill_tokens / self.prefill_tokens_per_s
