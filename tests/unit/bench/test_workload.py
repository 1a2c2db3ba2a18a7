import pytest
from citadel_bench.loadgen import parse_sse_text
from citadel_bench.workload import ChatWorkload, conversation, system_prompts, text

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
