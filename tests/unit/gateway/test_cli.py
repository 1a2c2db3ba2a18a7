"""`citadel keys` against a static key file, and revoke against Secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from citadel.gateway import cli
from citadel.gateway.cli import main
from citadel.gateway.kube.client import KubeApiError
from citadel.gateway.services.auth import KeyRecord, hash_key
from citadel.gateway.sources.files import read_key_file
from citadel.gateway.sources.kubernetes import key_secret

pytestmark = pytest.mark.unit


def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    args = ["keys", "--file", str(path)]
    assert main([*args, "create", "alice", "--models", "smol*", "--rpm", "60"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("ctd-")
    [record] = read_key_file(path).keys
    assert record.hash == hash_key(key) and key not in path.read_text()
    assert record.models == ("smol*",) and record.rpm == 60
    assert path.stat().st_mode & 0o077 == 0
    assert main([*args, "create", "alice"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*args, "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and key not in listing
    assert main([*args, "revoke", "alice"]) == 0
    assert read_key_file(path).keys == []
    assert main([*args, "revoke", "alice"]) == 1


def test_missing_kubeconfig_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert main(["keys", "--kubeconfig", str(missing), "list"]) == 1
    assert "cannot read kubeconfig" in capsys.readouterr().err


def test_bad_input_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["keys", "--file", str(tmp_path / "keys.json"), "create"]
    assert main([*args, "Alice"]) == 1
    assert main([*args, "bob", "--rpm", "0"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in errors] == ["citadel", "citadel"]
    assert "name:" in errors[0] and "rpm:" in errors[1]


class _FakeKube:
    """The Secrets API, as far as `citadel keys revoke` uses it."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = {item["metadata"]["name"]: item for item in items}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list(
        self, path: str, params: dict[str, str]
    ) -> tuple[list[dict[str, Any]], str]:
        assert params == {"labelSelector": "citadel.ai/api-key=true"}
        return list(self.items.values()), "1"

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert method == "DELETE"
        name = path.rsplit("/", 1)[-1]
        if self.items.pop(name, None) is None:
            raise KubeApiError(404, "not found")
        return {}


def test_revoke_deletes_every_secret_holding_a_key_of_the_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gateway takes each Secret for a key of its own: a second Secret of
    the name (a rotation made by hand) left behind would keep working."""
    alice = key_secret(KeyRecord(name="alice", hash=hash_key("a1")), "ns")
    rotated = key_secret(KeyRecord(name="alice", hash=hash_key("a2")), "ns")
    rotated["metadata"]["name"] = "alice-rotated"
    bob = key_secret(KeyRecord(name="bob", hash=hash_key("b")), "ns")
    kube = _FakeKube([alice, rotated, bob])
    monkeypatch.setattr(cli, "load_kubeconfig", lambda *_: None)
    monkeypatch.setattr(cli, "KubeClient", lambda _: kube)
    assert main(["keys", "-n", "ns", "revoke", "alice"]) == 0
    assert list(kube.items) == ["citadel-key-bob"]
    assert "alice-rotated, citadel-key-alice" in capsys.readouterr().out
    assert main(["keys", "-n", "ns", "revoke", "alice"]) == 1
    assert "no key named 'alice'" in capsys.readouterr().err
