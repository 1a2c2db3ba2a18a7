"""`citadel keys` against a static key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from citadel.gateway.cli import main
from citadel.gateway.services.auth import hash_key
from citadel.gateway.sources.files import read_key_file

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
