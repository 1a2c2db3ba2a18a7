"""`citadel keys` against a static key file, and revoke against Secrets."""

from __future__ import annotations

import base64
import json
import os
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from citadel.gateway import cli
from citadel.gateway.cli import main
from citadel.gateway.kube.client import KubeApiError
from citadel.gateway.services.auth import (
    InMemoryKeyStore,
    KeyRecord,
    Priority,
    hash_key,
)
from citadel.gateway.sources.files import read_key_file
from citadel.gateway.sources.kubernetes import KEY_LABEL, key_from_secret, key_secret

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
    """The Secrets API, as far as `citadel keys` uses it."""

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
        labelled = [
            item
            for item in self.items.values()
            if item["metadata"].get("labels", {}).get(KEY_LABEL) == "true"
        ]
        return labelled, "1"

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if method == "POST":
            assert body is not None
            name = body["metadata"]["name"]
            if name in self.items:
                raise KubeApiError(409, "already exists")
            self.items[name] = body
            return body
        assert method == "DELETE"
        name = path.rsplit("/", 1)[-1]
        if self.items.pop(name, None) is None:
            raise KubeApiError(404, "not found")
        return {}

    def records(self) -> dict[str, KeyRecord]:
        """The readable key records, by Secret."""
        found = {name: key_from_secret(item) for name, item in self.items.items()}
        return {name: r for name, r in found.items() if r is not None}


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> _FakeKube:
    """The fake API in place of the cluster: alice with one key in the Secret
    `create` makes, bob, and the admin key's plain text (not a key Secret)."""
    alice = key_secret(
        KeyRecord(
            name="alice",
            hash=hash_key("a1"),
            models=("smol*",),
            rpm=60,
            created=datetime(2024, 1, 1, tzinfo=UTC),
        ),
        "ns",
    )
    bob = key_secret(KeyRecord(name="bob", hash=hash_key("b")), "ns")
    plain = {"metadata": {"name": "citadel-admin-key"}, "data": {"key": "eA=="}}
    fake = _FakeKube([alice, bob, plain])
    monkeypatch.setattr(cli, "load_kubeconfig", lambda *_: None)
    monkeypatch.setattr(cli, "KubeClient", lambda _: fake)
    return fake


def _shown_key(out: str) -> str:
    """The key printed after `... shown once, store it now:`."""
    lines = out.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.endswith("store it now:")]
    return lines[at + 1]


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


def test_rotate_replaces_every_key_of_the_name_at_once(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    """The new key copies the newest record's models and limits, in a Secret of
    its own; the old Secrets (a hand-made second one too) go after it is made."""
    earlier = key_secret(
        KeyRecord(
            name="alice",
            hash=hash_key("a0"),
            rpm=1,
            created=datetime(2020, 1, 1, tzinfo=UTC),
        ),
        "ns",
        "alice-by-hand",
    )
    kube.items["alice-by-hand"] = earlier
    before = kube.records()["citadel-key-alice"]
    assert main(["keys", "-n", "ns", "rotate", "alice"]) == 0
    out = capsys.readouterr().out
    key = _shown_key(out)
    [(secret, record)] = [
        (s, r) for s, r in kube.records().items() if r.name == "alice"
    ]
    assert secret.startswith("citadel-key-alice.") and secret in out
    assert record.hash == hash_key(key) and key.startswith("ctd-")
    assert record.model_dump(exclude={"hash", "created"}) == before.model_dump(
        exclude={"hash", "created"}
    )
    assert record.created is not None and before.created is not None
    assert record.created > before.created
    assert "revoked (Secrets: alice-by-hand, citadel-key-alice)" in out
    assert set(kube.items) == {secret, "citadel-key-bob", "citadel-admin-key"}
    # A name can be rotated again, from a Secret that rotation made.
    assert main(["keys", "-n", "ns", "rotate", "alice"]) == 0
    again = _shown_key(capsys.readouterr().out)
    [record] = [r for r in kube.records().values() if r.name == "alice"]
    assert record.hash == hash_key(again) and record.rpm == 60


def test_rotate_keeping_the_old_key_prints_how_to_revoke_it(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two keys of one name work side by side until the printed command deletes
    the old one's Secret, and only it."""
    args = ["keys", "-n", "ns", "--context", "prod"]
    assert main([*args, "rotate", "alice", "--keep-old-for", "3600"]) == 0
    out = capsys.readouterr().out
    key = _shown_key(out)
    alices = {s: r for s, r in kube.records().items() if r.name == "alice"}
    assert len(alices) == 2 and "citadel-key-alice" in alices
    [command] = [line for line in out.splitlines() if "revoke --secret" in line]
    assert command == (
        "citadel keys -n ns --context prod revoke --secret citadel-key-alice"
    )
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert "revoked the key 'alice' of Secret citadel-key-alice" in out
    assert "other keys of that name still work" in out
    [record] = [r for r in kube.records().values() if r.name == "alice"]
    assert record.hash == hash_key(key)
    assert "citadel-key-bob" in kube.items


def test_revoke_secret_deletes_only_a_key_secret(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    for secret in ("citadel-admin-key", "citadel-key-nobody"):
        assert main(["keys", "-n", "ns", "revoke", "--secret", secret]) == 1
        assert f"no key Secret named {secret!r}" in capsys.readouterr().err
    assert len(kube.items) == 3
    # A name or a Secret, not both: which one was meant?
    with pytest.raises(SystemExit):
        main(["keys", "-n", "ns", "revoke", "alice", "--secret", "citadel-key-bob"])
    with pytest.raises(SystemExit):
        main(["keys", "-n", "ns", "revoke"])
    assert main(["keys", "-n", "ns", "revoke", "--secret", "citadel-key-bob"]) == 0
    assert "revoked the key 'bob' of Secret citadel-key-bob" in capsys.readouterr().out
    assert set(kube.items) == {"citadel-key-alice", "citadel-admin-key"}


def test_list_tells_two_keys_of_one_name_apart(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    second = key_secret(KeyRecord(name="alice", hash=hash_key("a2")), "ns")
    second["metadata"]["name"] = "a-2"  # a second key of the name, made by hand
    kube.items["a-2"] = second
    assert main(["keys", "-n", "ns", "list"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "SECRET"
    assert sorted(row.split()[-1] for row in rows if row.startswith("alice ")) == [
        "a-2",
        "citadel-key-alice",
    ]


def test_a_rotated_secret_is_no_other_name_s(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rotation's Secret was `citadel-key-<name>-<hex>`, the Secret `create`
    makes for the name `<name>-<hex>`: revoking that name, which has no key,
    deleted the rotated key, and creating it said it existed."""
    assert main(["keys", "-n", "ns", "rotate", "bob"]) == 0
    [rotated] = [s for s, r in kube.records().items() if r.name == "bob"]
    other = rotated.removeprefix("citadel-key-").replace(".", "-")
    kube.items[f"citadel-key-{other}"] = kube.items.pop(rotated)
    capsys.readouterr()
    assert main(["keys", "-n", "ns", "revoke", other]) == 1
    assert f"no key named {other!r}" in capsys.readouterr().err
    assert [r.name for r in kube.records().values()].count("bob") == 1
    assert main(["keys", "-n", "ns", "create", other]) == 1
    assert "exists" in capsys.readouterr().err  # the Secret's name is taken


def test_the_chart_s_admin_key_is_not_rotated_or_revoked_here(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chart renders the admin key's record: an upgrade or Argo CD sync
    would make it again, and the old key would work beside the new one."""
    admin = key_secret(KeyRecord(name="admin", hash=hash_key("x"), role="admin"), "ns")
    admin["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    kube.items["citadel-key-admin"] = admin
    for action in (["rotate", "admin"], ["revoke", "admin"]):
        assert main(["keys", "-n", "ns", *action]) == 1
        assert "rendered by the Helm chart" in capsys.readouterr().err
    command = ["keys", "-n", "ns", "revoke", "--secret", "citadel-key-admin"]
    assert main(command) == 1
    assert "gateway.adminKey" in capsys.readouterr().err
    assert len(kube.items) == 4


def test_rotate_an_unknown_name_makes_nothing(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "-n", "ns", "rotate", "carol"]) == 1
    assert "no key named 'carol'" in capsys.readouterr().err
    assert len(kube.items) == 3


def test_create_refuses_a_name_whose_key_sits_in_another_secret(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a rotation the name's key is not in `citadel-key-<name>`: creating
    the name again would make a second key of it, not a conflict the API sees."""
    kube.items["citadel-key-alice-1a2b3c"] = kube.items.pop("citadel-key-alice")
    assert main(["keys", "-n", "ns", "create", "alice"]) == 1
    assert "a key named 'alice' exists" in capsys.readouterr().err
    assert len(kube.items) == 3


def test_rotate_in_a_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    args = ["keys", "--file", str(path)]
    assert main([*args, "create", "alice", "--models", "smol*", "--tpm", "9"]) == 0
    assert main([*args, "create", "bob"]) == 0
    capsys.readouterr()
    assert main([*args, "rotate", "alice"]) == 0
    key = _shown_key(capsys.readouterr().out)
    alice, bob = sorted(read_key_file(path).keys, key=lambda r: r.name)
    assert alice.hash == hash_key(key) and alice.models == ("smol*",)
    assert alice.tpm == 9 and bob.name == "bob"
    # Entries have no name of their own to revoke one of them by later.
    assert main([*args, "rotate", "alice", "--keep-old-for", "60"]) == 1
    assert main([*args, "revoke", "--secret", "citadel-key-alice"]) == 1
    assert capsys.readouterr().err.count("citadel: ") == 2
    assert read_key_file(path).keys == [bob, alice]


def test_records_that_do_not_say_when_they_were_made_list_and_rotate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record without `created` (the chart's admin key, one written by hand)
    has no creation time, shown `-`, and is older than any that says; one
    written without a zone is in UTC. Reading one used to make it now."""
    path = tmp_path / "keys.json"
    undated = {"name": "alice", "hash": hash_key("a1"), "rpm": 1}
    naive = {"name": "alice", "hash": hash_key("a2"), "rpm": 2}
    naive["created"] = "2020-01-01T00:00:00"
    bob = {"name": "bob", "hash": hash_key("b"), "created": "2021-01-01T01:00+02:00"}
    path.write_text(json.dumps({"keys": [undated, naive, bob]}))
    args = ["keys", "--file", str(path)]
    assert main([*args, "list"]) == 0
    rows = [row.split() for row in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[4], row[-2]) for row in rows] == [
        ("alice", "1", "-"),
        ("alice", "2", "2020-01-01T00:00:00Z"),
        ("bob", "-", "2020-12-31T23:00:00Z"),
    ]
    assert main([*args, "rotate", "alice"]) == 0
    key = _shown_key(capsys.readouterr().out)
    [alice] = [r for r in read_key_file(path).keys if r.name == "alice"]
    assert alice.hash == hash_key(key) and alice.rpm == 2  # the dated one's
    assert alice.created is not None and alice.created.year > 2020
    assert main([*args, "create", "carol"]) == 0
    [carol] = [r for r in read_key_file(path).keys if r.name == "carol"]
    assert carol.created is not None


def test_rewriting_a_key_file_keeps_its_mode_owner_and_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway running as another user reads the file through its group or
    others: rewritten 0600 by the CLI's user, it could no longer read it and
    kept the keys a revoke took away."""
    path = tmp_path / "keys.json"
    args = ["keys", "--file", str(path)]
    owners: list[tuple[int, int]] = []

    def fchown(fd: int, uid: int, gid: int) -> None:
        owners.append((uid, gid))
        if uid != -1:  # not root: only a group of the user's may be given
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", fchown)
    assert main([*args, "create", "alice"]) == 0
    assert path.stat().st_mode & 0o777 == 0o600  # new: private to the user
    assert owners == []
    path.chmod(0o640)
    before = path.stat()
    assert main([*args, "create", "bob"]) == 0
    assert path.stat().st_mode & 0o777 == 0o640
    assert owners == [(before.st_uid, before.st_gid), (-1, before.st_gid)]
    assert [r.name for r in read_key_file(path).keys] == ["alice", "bob"]
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: owners.append((uid, gid)))
    owners.clear()
    path.chmod(0o604)
    assert main([*args, "revoke", "alice"]) == 0
    assert path.stat().st_mode & 0o777 == 0o604
    assert owners == [(before.st_uid, before.st_gid)]  # root: owner and group


def test_a_key_file_is_written_through_a_temporary_file_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs at once wrote one `keys.json.tmp`: one could put the other's
    half-written file in place. A failed write leaves no temporary file."""
    path = tmp_path / "keys.json"
    other = tmp_path / "keys.json.tmp"  # another run's, mid-write
    other.write_bytes(b"another run's")
    args = ["keys", "--file", str(path)]
    assert main([*args, "create", "alice"]) == 0
    assert other.read_bytes() == b"another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", other.name]
    written = path.read_bytes()

    def fchmod(fd: int, mode: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fchmod", fchmod)
    assert main([*args, "create", "bob"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json", other.name]
    assert path.read_bytes() == written


def test_a_key_file_behind_a_link_is_rewritten_where_it_lies(
    tmp_path: Path,
) -> None:
    """An operator's link to the file the gateway reads: replaced by the new
    file, the link became a file of its own, and the gateway, reading the
    target, kept the key revoked through it."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "home").mkdir()
    target = tmp_path / "etc" / "keys.json"
    link = tmp_path / "home" / "keys.json"
    link.symlink_to(Path("..") / "etc" / "keys.json")  # dangling until created
    args = ["keys", "--file", str(link)]
    assert main([*args, "create", "alice"]) == 0
    assert main([*args, "create", "bob"]) == 0
    target.chmod(0o640)
    assert main([*args, "revoke", "alice"]) == 0
    assert link.is_symlink() and link.resolve() == target
    assert [r.name for r in read_key_file(target).keys] == ["bob"]
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["keys.json"]
    assert [p.name for p in (tmp_path / "etc").iterdir()] == ["keys.json"]


def test_a_sheddable_key_stays_sheddable_when_rotated_in_a_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch job's key is made sheddable, listed so, and its rotation is too:
    a new key that came back standard would take the room of interactive users
    while its model is saturated."""
    path = tmp_path / "keys.json"
    args = ["keys", "--file", str(path)]
    with pytest.raises(SystemExit):
        main([*args, "create", "batch", "--priority", "urgent"])
    assert main([*args, "create", "batch", "--priority", "sheddable"]) == 0
    assert main([*args, "create", "alice"]) == 0
    capsys.readouterr()
    assert main([*args, "rotate", "batch"]) == 0
    key = _shown_key(capsys.readouterr().out)
    alice, batch = sorted(read_key_file(path).keys, key=lambda r: r.name)
    assert batch.hash == hash_key(key) and batch.priority is Priority.SHEDDABLE
    assert alice.priority is Priority.STANDARD
    assert main([*args, "list"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["NAME", "ROLE", "PRIORITY", "MODELS"]
    assert [row.split()[:3] for row in rows] == [
        ["alice", "user", "standard"],
        ["batch", "user", "sheddable"],
    ]


def test_a_sheddable_key_stays_sheddable_when_rotated_in_secrets(
    kube: _FakeKube, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whether the old key goes at once or is kept a while."""
    assert main(["keys", "-n", "ns", "create", "batch", "--priority", "sheddable"]) == 0
    assert kube.records()["citadel-key-batch"].priority is Priority.SHEDDABLE
    assert main(["keys", "-n", "ns", "rotate", "batch"]) == 0
    assert main(["keys", "-n", "ns", "rotate", "batch", "--keep-old-for", "60"]) == 0
    batches = [r for r in kube.records().values() if r.name == "batch"]
    assert len(batches) == 2
    assert {r.priority for r in batches} == {Priority.SHEDDABLE}
    assert kube.records()["citadel-key-alice"].priority is Priority.STANDARD
    capsys.readouterr()
    assert main(["keys", "-n", "ns", "list"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[2] for row in rows if row.startswith("batch ")] == [
        "sheddable",
        "sheddable",
    ]


def test_a_record_from_before_priorities_is_standard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record without `priority` (written before it, the chart's admin key)
    lists as standard; rewritten now it says so, and the two are one record to
    the gateway's store, which refuses a key whose records differ."""
    path = tmp_path / "keys.json"
    before = {"name": "alice", "hash": hash_key("a"), "models": ["*"], "role": "user"}
    path.write_text(json.dumps({"keys": [before]}))
    args = ["keys", "--file", str(path)]
    assert main([*args, "list"]) == 0
    [row] = capsys.readouterr().out.splitlines()[1:]
    assert row.split()[:3] == ["alice", "user", "standard"]
    assert main([*args, "create", "bob"]) == 0  # rewrites alice's entry
    now = json.loads(path.read_text())["keys"][0]
    assert now["priority"] == "standard" and "priority" not in before
    old, new = (KeyRecord.model_validate(r) for r in (before, now))
    store = InMemoryKeyStore()
    store.hold_all({"old": old, "new": new})  # a copy made before, one now
    assert store.lookup(hash_key("a")) == old == new
    # As Secrets: one the chart renders (no `priority`), one the CLI writes now.
    written = key_secret(new, "ns")
    data = base64.b64encode(json.dumps(before).encode()).decode()
    charted = {**written, "data": {"key.json": data}}
    assert key_from_secret(charted) == key_from_secret(written) == new
