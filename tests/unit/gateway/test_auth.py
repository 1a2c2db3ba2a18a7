"""Keys: generation, hashing, look-up, model patterns, roles."""

from __future__ import annotations

import orjson
import pytest

from citadel.gateway.errors import AuthenticationFailed, PermissionDenied
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.auth import (
    Authenticator,
    InMemoryKeyStore,
    KeyRecord,
    Role,
    generate_key,
    hash_key,
)

pytestmark = pytest.mark.unit

ROUTE = ModelRoute.model_validate(
    {
        "name": "m",
        "namespace": "n",
        "servedName": "meta-llama/Llama-3-8B",
        "aliases": ["llama"],
        "adapters": ["sql-expert", "support-bot"],
        "service": "m",
    }
)


def test_keys_are_random_prefixed_and_hashed() -> None:
    a, b = generate_key(), generate_key()
    assert a != b and a.startswith("ctd-") and len(a) >= 40
    assert hash_key(a).startswith("sha256:") and a not in hash_key(a)
    assert hash_key(a) == hash_key(a)


def test_authenticate_finds_the_record_by_hash() -> None:
    key = generate_key()
    store = InMemoryKeyStore([KeyRecord(name="alice", hash=hash_key(key))])
    auth = Authenticator(store)
    assert auth.authenticate(f"Bearer {key}").name == "alice"
    assert auth.authenticate(f"bearer   {key}").name == "alice"
    for header in (None, "", "Bearer", f"Basic {key}", "Bearer ctd-other"):
        with pytest.raises(AuthenticationFailed):
            auth.authenticate(header)
    store.remove("alice")
    with pytest.raises(AuthenticationFailed):
        auth.authenticate(f"Bearer {key}")


def test_disabled_auth_is_anonymous() -> None:
    assert (
        Authenticator(InMemoryKeyStore(), required=False).authenticate(None).key is None
    )


@pytest.mark.parametrize(
    ("patterns", "requested", "allowed"),
    [
        (("*",), "llama", True),
        (("meta-llama/*",), "llama", True),  # the served name matches
        (("llama",), "llama", True),
        (("mistral*",), "llama", False),
        ((), "llama", False),
        # An adapter is a model of its own: allowed by its own name only.
        (("*",), "sql-expert", True),
        (("sql-*",), "sql-expert", True),
        (("sql-expert",), "sql-expert", True),
        # The base's names allow the base, not the tenants' fine-tunes on it.
        (("llama",), "sql-expert", False),
        (("meta-llama/*",), "sql-expert", False),
        # An adapter allows neither the base (by any name) nor another adapter.
        (("sql-expert",), "llama", False),
        (("sql-expert",), "meta-llama/Llama-3-8B", False),
        (("sql-expert",), "support-bot", False),
        (("s*",), "llama", False),
    ],
)
def test_model_patterns(
    patterns: tuple[str, ...], requested: str, allowed: bool
) -> None:
    store = InMemoryKeyStore([KeyRecord(name="u", hash=hash_key("k"), models=patterns)])
    who = Authenticator(store).authenticate("Bearer k")
    assert who.may_use(ROUTE, requested) is allowed
    if not allowed:
        with pytest.raises(PermissionDenied):
            who.check(ROUTE, requested)


def test_admins_may_use_every_model() -> None:
    record = KeyRecord(name="a", hash=hash_key("k"), role=Role.ADMIN, models=())
    who = Authenticator(InMemoryKeyStore([record])).authenticate("Bearer k")
    who.check(ROUTE, "llama")
    who.check(ROUTE, "sql-expert")


def test_the_store_is_keyed_by_holder_not_by_name() -> None:
    """Two holders of one key name are two keys: each goes with its holder."""
    old = KeyRecord(name="a", hash=hash_key("old"))
    new = KeyRecord(name="a", hash=hash_key("new"))
    store = InMemoryKeyStore()
    store.hold_all({"A": old})
    assert store.hold("B", new) is None
    assert store.lookup(old.hash) == old and store.lookup(new.hash) == new
    assert store.hold("B", None) == new
    assert store.lookup(old.hash) == old and store.lookup(new.hash) is None
    assert store.hold("A", new) == old  # a holder edited to hold another key
    assert store.lookup(old.hash) is None and store.lookup(new.hash) == new
    store.hold("B", old)
    store.remove("a")  # every key of the name
    assert len(store) == 0


def test_a_key_whose_holders_disagree_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither record is the one meant, whatever order they came in; the same
    record held twice is in force while either holds it."""
    wide = KeyRecord(name="a", hash=hash_key("k"))
    narrow = wide.model_copy(update={"models": ("small",)})
    store = InMemoryKeyStore()
    store.hold("A", wide)
    store.hold("copy", wide)
    store.hold("A", None)
    assert store.lookup(wide.hash) == wide
    store.hold("A", narrow)
    assert store.lookup(wide.hash) is None
    assert "key refused: the records holding it differ" in caplog.text
    assert len(InMemoryKeyStore([narrow, wide])) == 0  # as a key file, too
    store.hold("copy", None)
    assert store.lookup(wide.hash) == narrow


def test_copies_of_a_record_that_does_not_say_when_it_was_made_agree() -> None:
    """The chart's admin key record has no `created`. Reading one filled it in
    with the time of reading, so that two byte-identical copies (two releases
    sharing a keys namespace, a Secret copied) differed and refused the key."""
    raw = orjson.dumps(
        {"hash": hash_key("k"), "models": ["*"], "name": "admin", "role": "admin"}
    )
    first, copy = (KeyRecord.model_validate_json(raw) for _ in range(2))
    assert first.created is None and first == copy
    store = InMemoryKeyStore()
    store.hold("citadel-key-admin.staging", first)
    store.hold("citadel-key-admin.prod", copy)
    assert store.lookup(hash_key("k")) == first
    assert len(InMemoryKeyStore([first, copy])) == 1  # as a key file, too


def test_record_reads_camel_case_quota_fields() -> None:
    record = KeyRecord.model_validate(
        {"name": "a", "hash": hash_key("k"), "dailyTokens": 5, "monthlyTokens": 9}
    )
    assert (record.daily_tokens, record.monthly_tokens) == (5, 9)
    assert "dailyTokens" in record.model_dump_json(by_alias=True)
