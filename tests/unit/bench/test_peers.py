"""How the benchmark runs each proxy: Citadel with its key, vllm-router at the log
level asked for, LiteLLM as its docs advise."""

import logging
import logging.config
from pathlib import Path

import pytest
from citadel_bench import peers

from citadel.gateway.services.auth import Authenticator, InMemoryKeyStore
from citadel.gateway.sources.files import read_key_file

pytestmark = pytest.mark.unit


def test_citadel_requires_keys_and_the_load_generators_key_passes(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')  # a file left from before is replaced
    key = peers.create_key(keys)
    env = peers.citadel_env(8000, tmp_path / "routes.json", keys)
    # Auth at its default (required), the key file read, nothing else changed.
    assert env["CITADEL_GATEWAY_KEYS_FILE"] == str(keys)
    assert "CITADEL_GATEWAY_AUTH" not in env
    assert "CITADEL_GATEWAY_METRICS_SCRAPE_PERIOD_S" not in env
    records = read_key_file(keys).keys
    assert [r.name for r in records] == [peers.KEY_NAME]
    record = records[0]
    assert record.models == ("*",)
    limits = (record.rpm, record.tpm, record.daily_tokens, record.monthly_tokens)
    assert limits == (None, None, None, None)
    # The header the load generator sends is what the gateway checks.
    principal = Authenticator(InMemoryKeyStore(records)).authenticate(f"Bearer {key}")
    assert principal.name == peers.KEY_NAME


def test_vllm_router_logs_at_warning_through_rust_log() -> None:
    argv, env = peers.vllm_router_command(["http://a", "http://b"], 1, 2, "random")
    # `--log-level warning` is lost on its way to the Rust core (INFO instead).
    assert env["RUST_LOG"] == "warn"
    assert "--log-level" not in argv
    assert argv[argv.index("--worker-urls") + 1 :][:2] == ["http://a", "http://b"]
    assert argv[-2:] == ["--policy", "random"]


def test_litellm_runs_a_worker_per_core_without_callbacks_or_retries(
    tmp_path: Path,
) -> None:
    config = peers.litellm_config(["http://a", "http://b"])
    assert config["litellm_settings"] == {"callbacks": [], "num_retries": 0}
    deployments = config["model_list"]
    assert isinstance(deployments, list) and len(deployments) == 2
    for deployment in deployments:
        info = deployment["model_info"]
        assert info["input_cost_per_token"] == info["output_cost_per_token"] == 0
    argv = peers.litellm_argv(tmp_path / "c.json", tmp_path / "log.json", 4000)
    assert argv[argv.index("--num_workers") + 1] == str(peers.litellm_workers())
    assert peers.litellm_workers() >= 1
    assert argv[argv.index("--log_config") + 1] == str(tmp_path / "log.json")
    # uvicorn's 5 s would kill a worker still importing LiteLLM.
    healthcheck = int(argv[argv.index("--timeout_worker_healthcheck") + 1])
    assert healthcheck >= 30


def test_litellms_log_config_turns_uvicorns_access_log_off() -> None:
    names = ("uvicorn", "uvicorn.access")
    saved = [
        (lg, lg.handlers[:], lg.propagate, lg.level)
        for lg in map(logging.getLogger, names)
    ]
    try:
        logging.config.dictConfig(peers.LITELLM_LOG_CONFIG)
        # What uvicorn's h11 protocol checks before it logs each request.
        assert not logging.getLogger("uvicorn.access").hasHandlers()
        assert logging.getLogger("uvicorn").hasHandlers()
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)
