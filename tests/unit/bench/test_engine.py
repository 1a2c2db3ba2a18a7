import asyncio
import time

import pytest
from simulator.engine import Engine
from simulator.params import SimParams
from simulator.server import metrics_text, render_prompt

pytestmark = pytest.mark.unit


def params(**changes: object) -> SimParams:
    base = {
        "block_size": 4,
        "chars_per_token": 1,
        "kv_capacity_tokens": 400,
        "prefill_tokens_per_s": 1000.0,
        "decode_base_s": 0.01,
        "decode_per_seq_s": 0.001,
        "max_batched_tokens": 64,
    }
    return SimParams(**{**base, **changes})  # type: ignore[arg-type]


def test_step_time_grows_with_batch_and_prefill() -> None:
    p = params()
    assert p.step_time(1, 0) == pytest.approx(0.01)
    assert p.step_time(11, 0) == pytest.approx(0.02)
    assert p.step_time(1, 100) == pytest.approx(0.11)


def test_prefill_is_chunked_and_cached_tokens_are_skipped() -> None:
    engine = Engine(params())
    seq = engine.prepare("x" * 100, max_tokens=2)
    engine.submit(seq)
    # 100 uncached tokens, 64 per step: two prefill steps, the second of which
    # yields the first token.
    duration, emitting = engine.plan_step()
    assert duration == pytest.approx(0.01 + 0.064) and emitting == []
    duration, emitting = engine.plan_step()
    assert emitting == [seq]
    engine.finish_step(emitting)
    _, emitting = engine.plan_step()
    engine.finish_step(emitting)
    assert not engine.running and engine.counters.requests_finished == 1
    # The same prompt again: 96 of its 100 tokens come from the cache.
    again = engine.prepare("x" * 100, max_tokens=1)
    engine.submit(again)
    duration, emitting = engine.plan_step()
    assert again.cached_tokens == 96 and emitting == [again]
    assert duration == pytest.approx(0.01 + 0.004)
    assert engine.counters.prefix_queries == 200
    assert engine.counters.prefix_hits == 96


def test_requests_wait_when_the_cache_is_full() -> None:
    engine = Engine(params(kv_capacity_tokens=40))
    first = engine.prepare("a" * 30, max_tokens=5)
    second = engine.prepare("b" * 30, max_tokens=5)
    engine.submit(first)
    engine.submit(second)
    engine.plan_step()
    assert engine.running == [first] and list(engine.waiting) == [second]
    assert "vllm:num_requests_waiting" in metrics_text(engine, "m")


def test_batch_cap() -> None:
    engine = Engine(params(max_num_seqs=2))
    for i in range(3):
        engine.submit(engine.prepare(str(i) * 8, max_tokens=3))
    engine.plan_step()
    assert len(engine.running) == 2 and len(engine.waiting) == 1


async def test_loop_streams_tokens_in_modelled_time() -> None:
    engine = Engine(params(decode_base_s=0.002, decode_per_seq_s=0.0))
    engine.start()
    try:
        seq = engine.prepare("hello", max_tokens=5)
        loop = asyncio.get_running_loop()
        began = loop.time()
        engine.submit(seq)
        tokens = []
        while (token := await asyncio.wait_for(seq.tokens.get(), 5)) is not None:
            tokens.append(token)
        assert tokens == [1, 2, 3, 4, 5]
        assert loop.time() - began >= 5 * 0.002
    finally:
        await engine.stop()


async def test_time_to_first_token_is_counted_as_vllm_does() -> None:
    engine = Engine(params(decode_base_s=0.002, decode_per_seq_s=0.0))
    engine.start()
    try:
        seq = engine.prepare("hello", max_tokens=3)
        engine.submit(seq)
        while await asyncio.wait_for(seq.tokens.get(), 5) is not None:
            pass
    finally:
        await engine.stop()
    counters = engine.counters
    assert counters.ttft_count == 1 and counters.ttft_sum_s >= 0.002
    text = metrics_text(engine, "smol")
    name = "vllm:time_to_first_token_seconds"
    assert f'{name}_count{{engine="0",model_name="smol"}} 1.0' in text
    # Buckets are cumulative: none below 1 ms, the one at +Inf has it.
    assert f'{name}_bucket{{engine="0",le="0.001",model_name="smol"}} 0.0' in text
    assert f'{name}_bucket{{engine="0",le="+Inf",model_name="smol"}} 1.0' in text


def test_a_step_admits_only_what_arrived_before_it() -> None:
    engine = Engine(params())
    first = engine.prepare("a" * 8, max_tokens=1)
    second = engine.prepare("b" * 8, max_tokens=1)
    engine.submit(first)
    time.sleep(0.001)
    engine.submit(second)
    _, emitting = engine.plan_step(first.arrived)
    assert emitting == [first] and list(engine.waiting) == [second]
    _, emitting = engine.plan_step()
    assert emitting == [first, second]


async def test_an_idle_engine_steps_when_a_request_arrives() -> None:
    # The event loop is busy (here: blocked) between two submits to an idle
    # engine, as when it parses other replicas' requests: the first request's
    # step began when it arrived, so the second waits for the next step.
    engine = Engine(params(decode_base_s=0.02, decode_per_seq_s=0.0))
    engine.start()
    try:
        first = engine.prepare("a" * 8, max_tokens=2)
        second = engine.prepare("b" * 8, max_tokens=1)
        engine.submit(first)
        time.sleep(0.005)
        engine.submit(second)
        assert await asyncio.wait_for(first.tokens.get(), 5) == 1
        assert second.generated == 0
        assert await asyncio.wait_for(second.tokens.get(), 5) == 1
        assert first.generated == 2
    finally:
        await engine.stop()


def test_metrics_use_vllm_names() -> None:
    text = metrics_text(Engine(params()), "smol")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert f'{name}{{engine="0",model_name="smol"}}' in text


def test_render_prompt() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
        ]
    }
    assert render_prompt(chat) == "<|system|>\ns\n<|user|>\nu\n<|assistant|>\n"
    assert render_prompt({"prompt": "p"}) == "p"
    assert render_prompt({"prompt": ["q", "r"]}) == "q"


def test_a_reply_is_cached_for_the_next_turn() -> None:
    engine = Engine(params())
    first = engine.prepare("p" * 20, max_tokens=12)
    engine.submit(first)
    while engine.running or engine.waiting:
        _, emitting = engine.plan_step()
        engine.finish_step(emitting)
    # The next turn sends prompt + reply + a new message: everything up to the
    # end of the reply's last full block is a hit.
    from simulator.engine import output_text

    reply = output_text(12, 0, 1)
    assert len(reply) == 12
    turn = engine.prepare("p" * 20 + reply + "more", max_tokens=1)
    engine.submit(turn)
    engine.plan_step()
    assert turn.cached_tokens == 32
