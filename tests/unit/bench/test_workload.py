from dataclasses import replace

import pytest
from citadel_bench.config import FULL, QUICK
from citadel_bench.loadgen import parse_sse_text
from citadel_bench.routing import KV_CAPACITY_TOKENS, REPLICAS
from citadel_bench.workload import (
    MULTI_ROUND_QA,
    SHORT_CHAT,
    ChatWorkload,
    conversation,
    system_prompts,
    text,
)

pytestmark = pytest.mark.unit


def test_text_has_exact_length() -> None:
    import random

    assert len(text(random.Random(1), 123)) == 123


def test_conversations_grow_and_share_system_prompts() -> None:
    w = ChatWorkload(users=3, system_prompts=2, system_chars=100, user_chars=50)
    prompts = system_prompts(w)
    assert len(prompts) == 2 and all(len(p) > 100 for p in prompts)
    conv = conversation(w, user=0, index=0)
    first = conv.next_request(w, "m")
    conv.add_answer("fine")
    second = conv.next_request(w, "m")
    assert first["messages"][0]["content"] in prompts
    # The second turn repeats the first one's messages, then adds two.
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert [m["role"] for m in second["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert second["stream"] is True and second["max_tokens"] == w.max_tokens


def test_conversations_are_repeatable_and_distinct() -> None:
    w = ChatWorkload()
    a = conversation(w, 1, 0).next_request(w, "m")
    b = conversation(w, 1, 0).next_request(w, "m")
    c = conversation(w, 2, 0).next_request(w, "m")
    assert a == b
    assert a["messages"][-1] != c["messages"][-1]
    assert conversation(w, 1, 0).session != conversation(w, 1, 1).session
    assert w.requests == w.users * w.conversations_per_user * w.turns


def test_parse_sse_text_reads_chat_and_completion_chunks() -> None:
    body = (
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"a "}}]}\n\n'
        b'data: {"choices":[{"text":"b"}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert parse_sse_text(body) == "a b"


def test_context_heads_only_the_first_user_message() -> None:
    w = ChatWorkload(system_prompts=1, system_chars=100, context_chars=500)
    conv = conversation(w, user=0, index=0)
    first = conv.next_request(w, "m")
    conv.add_answer("fine")
    second = conv.next_request(w, "m")
    context = first["messages"][1]["content"]
    # The context, a blank line, then the question of `user_chars`.
    assert len(context) == 500 + 2 + w.user_chars
    assert second["messages"][:2] == first["messages"][:2]
    assert len(second["messages"][3]["content"]) == w.user_chars
    # Each user has a context of its own after the shared system prompt.
    other = conversation(w, user=1, index=0).next_request(w, "m")
    assert other["messages"][0] == first["messages"][0]
    assert other["messages"][1]["content"][:500] != context[:500]


def test_short_chat_has_no_context() -> None:
    conv = conversation(SHORT_CHAT, user=0, index=0)
    first = conv.next_request(SHORT_CHAT, "m")
    assert len(first["messages"][1]["content"]) == SHORT_CHAT.user_chars


def test_footprint_counts_tokens_as_the_simulator() -> None:
    w = ChatWorkload(system_prompts=2, system_chars=400, context_chars=800)
    w = replace(w, user_chars=40, turns=3, max_tokens=10)
    assert w.system_tokens == 200
    # (800 + 3 x 40) / 4 characters a token, plus 3 answers of 10 tokens.
    assert w.conversation_tokens == 230 + 30
    assert w.footprint(4) == 200 + 4 * 260


def test_multi_round_qa_puts_the_replicas_under_memory_pressure() -> None:
    w = MULTI_ROUND_QA
    quarter = w.users // REPLICAS
    # A quarter of the users fit on one replica (with one to spare for uneven
    # placement); all of them, as round robin spreads them, do not, by far.
    assert w.footprint(quarter + 2) <= KV_CAPACITY_TOKENS
    assert w.footprint(w.users) > 2 * KV_CAPACITY_TOKENS
    # One system prompt; the user's own context dominates the prompt.
    assert w.system_prompts == 1
    assert w.context_chars >= 4 * w.system_chars
    assert w.slug == "multi-round-qa" and SHORT_CHAT.slug == "short-chat"


def test_both_configs_run_both_workloads() -> None:
    for config in (FULL, QUICK):
        names = [w.name for w in config.routing]
        assert names == [SHORT_CHAT.name, MULTI_ROUND_QA.name]
    # The full run keeps the short chat's shape as it was.
    assert replace(FULL.routing[0], about="") == ChatWorkload()
