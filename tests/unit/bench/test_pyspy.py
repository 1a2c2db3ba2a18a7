import pytest
from citadel_bench.pyspy import OTHER, PROXY_CATEGORIES, categorize, top_functions

pytestmark = pytest.mark.unit

_LOOP = "Runner.run (asyncio/runners.py:118)"
_SERVE = "_serve (citadel/gateway/api/openai.py:80)"


def _stack(*frames: str, samples: int) -> str:
    return ";".join(frames) + f" {samples}"


def test_each_stack_goes_to_its_innermost_known_frame() -> None:
    collapsed = "\n".join(
        [
            # uuid has no kind: the request-id check that called it has.
            _stack(
                _LOOP,
                _SERVE,
                "request_id (citadel/gateway/services/requests.py:280)",
                "uuid4 (uuid.py:723)",
                samples=4,
            ),
            # uvicorn's send, called by the stream relay, is the HTTP server's.
            _stack(
                "_send_stream (citadel/gateway/api/openai.py:312)",
                "RequestResponseCycle.send (uvicorn/protocols/http/h.py:542)",
                samples=3,
            ),
            # Logging inside the gateway's formatter is the log's, not the doors'.
            _stack(
                _LOOP,
                _SERVE,
                "Logger.info (logging/__init__.py:1489)",
                "JsonFormatter.format (citadel/gateway/logs.py:34)",
                samples=2,
            ),
            _stack(_LOOP, samples=5),
            # The relay's placement, inside uvicorn's frames, is its own.
            _stack(
                _LOOP,
                "ProxyHeadersMiddleware.__call__ (uvicorn/middleware/p.py:63)",
                "StickyLeastLoaded.choose (citadel_bench/relay.py:56)",
                samples=2,
            ),
            _stack("Thread.run (threading.py:982)", samples=1),
            "not a stack line",
        ]
    )
    counts = categorize(collapsed, PROXY_CATEGORIES)
    assert counts["request body: parse, check, write"] == 4
    assert counts["HTTP server (uvicorn, httptools)"] == 3
    assert counts["log lines"] == 2
    assert counts["event loop (uvloop: sockets, callbacks)"] == 5
    assert counts["the bare relay's own code (placement)"] == 2
    assert counts[OTHER] == 1
    # Every kind is listed, those without samples at 0.
    assert set(counts) == {c.name for c in PROXY_CATEGORIES} | {OTHER}
    assert counts["metrics"] == 0
    assert sum(counts.values()) == 17


def test_top_functions_rank_by_self_time() -> None:
    collapsed = "\n".join([_stack(_LOOP, _SERVE, samples=3), _stack(_LOOP, samples=1)])
    assert top_functions(collapsed) == [
        f" 75.0% self,  75.0% incl  {_SERVE}",
        f" 25.0% self, 100.0% incl  {_LOOP}",
    ]
    assert top_functions("") == []
