"""`citadel`: the command-line tool. `citadel keys create|list|rotate|revoke`
manages API keys as Kubernetes Secrets (with your kubeconfig) or in a static key
file (`--file`, for a gateway run outside Kubernetes)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets as random
import shlex
import stat
import sys
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from pydantic import ValidationError

from citadel.gateway import __version__
from citadel.gateway.kube.client import KubeApiError, KubeClient, Obj, secrets
from citadel.gateway.kube.config import KubeConfigError, load_kubeconfig
from citadel.gateway.routes import invalid_fields
from citadel.gateway.services.auth import (
    KeyRecord,
    Priority,
    Role,
    generate_key,
    hash_key,
)
from citadel.gateway.sources.files import KeyFile, read_key_file
from citadel.gateway.sources.kubernetes import (
    KEY_LABEL,
    KEY_SECRET_PREFIX,
    key_from_secret,
    key_secret,
)


class CliError(Exception):
    """A failure to report in one line, exit code 1."""


# The label a Helm release puts on what it renders (`.Release.Service`).
MANAGED_BY = "app.kubernetes.io/managed-by"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citadel", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="manage API keys")
    keys.add_argument("--namespace", "-n", default="citadel-system")
    keys.add_argument("--kubeconfig", type=Path, help="default: $KUBECONFIG")
    keys.add_argument("--context")
    keys.add_argument("--file", type=Path, help="a static key file instead")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key (shown once)")
    create.add_argument("name")
    create.add_argument("--role", choices=[r.value for r in Role], default="user")
    create.add_argument(
        "--priority",
        choices=[p.value for p in Priority],
        default=Priority.STANDARD.value,
        help="sheddable: refused (503) while every replica of its model is full "
        "(default: standard)",
    )
    create.add_argument(
        "--models", nargs="+", default=["*"], help="glob patterns (default: *)"
    )
    for limit in ("rpm", "tpm", "daily-tokens", "monthly-tokens"):
        create.add_argument(f"--{limit}", type=int)
    actions.add_parser("list", help="list keys (never the keys themselves)")
    rotate = actions.add_parser(
        "rotate", help="replace a key by a new one of the same name (shown once)"
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--keep-old-for",
        type=_seconds,
        metavar="SECONDS",
        help="keep the old key working (not with --file): prints the command "
        "that revokes it, to run once its clients have moved (default: revoke now)",
    )
    revoke = actions.add_parser(
        "revoke", help="revoke every key of a name, or one key Secret, now"
    )
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?")
    target.add_argument(
        "--secret", help="delete this one key Secret (an old key `rotate` kept)"
    )
    return parser


def _seconds(text: str) -> int:
    seconds = int(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; prints errors in one line and returns 1 on failure."""
    args = _parser().parse_args(argv)
    try:
        if args.file is not None:
            _file_command(args)
        else:
            asyncio.run(_kube_command(args))
    except (CliError, KubeConfigError, KubeApiError, OSError) as err:
        print(f"citadel: {err}", file=sys.stderr)
        return 1
    except ValidationError as err:  # a name or limit the key record refuses
        print(f"citadel: {invalid_fields(err, 'record')}", file=sys.stderr)
        return 1
    return 0


def _new_record(args: argparse.Namespace) -> tuple[str, KeyRecord]:
    key = generate_key()
    record = KeyRecord(
        name=args.name,
        hash=hash_key(key),
        role=Role(args.role),
        models=tuple(args.models),
        # Stored always, `standard` too, as every field is (`rpm: null`). Old
        # gateways are unharmed: KeyRecord has ignored unknown fields since the
        # first, so they read every key as standard. Old records are too: the
        # store compares records as read, where one without the field (written
        # before it, the chart's admin key) is standard, the same record as one
        # that says so. Leaving it out when standard would spare neither, and
        # the record would no longer say its priority.
        priority=Priority(args.priority),
        rpm=args.rpm,
        tpm=args.tpm,
        daily_tokens=args.daily_tokens,
        monthly_tokens=args.monthly_tokens,
        created=datetime.now(UTC),
    )
    return key, record


def rotated(current: KeyRecord) -> tuple[str, KeyRecord]:
    """A new key and its record: `current`'s name, role, priority, models and
    limits."""
    key = generate_key()
    return key, current.model_copy(
        update={"hash": hash_key(key), "created": datetime.now(UTC)}
    )


def newest(records: Sequence[tuple[str, KeyRecord]]) -> KeyRecord:
    """The record made last of those held (holder, record): the key in force
    that a rotation copies when a name has several (an earlier rotation kept).
    A record that does not say when it was made counts as the oldest."""
    return max(records, key=lambda held: (_made(held[1]), held[0]))[1]


def _made(record: KeyRecord) -> datetime:
    """When the key was made, in UTC: the earliest time when the record does not
    say, and UTC when it says without a zone (written by hand), so that any two
    compare."""
    if record.created is None:
        return datetime.min.replace(tzinfo=UTC)
    if record.created.tzinfo is None:
        return record.created.replace(tzinfo=UTC)
    return record.created.astimezone(UTC)


def _show_created(key: str, record: KeyRecord, verb: str = "created") -> None:
    print(f"{verb} key {record.name!r}; it is shown once, store it now:")
    print(key)


def _show_list(rows: Sequence[tuple[str | None, KeyRecord]]) -> None:
    """One line per key; its Secret last (none in a key file), which tells two
    keys of one name apart."""
    print(
        f"{'NAME':<24} {'ROLE':<6} {'PRIORITY':<9} {'MODELS':<24} {'RPM':>7} "
        f"{'TPM':>9}  {'CREATED':<20}  SECRET"
    )
    for secret, r in sorted(rows, key=lambda row: (row[1].name, _made(row[1]))):
        # Made at a time the record does not say (the chart's admin key): `-`.
        created = f"{_made(r):%Y-%m-%dT%H:%M:%SZ}" if r.created else "-"
        print(
            f"{r.name:<24} {r.role.value:<6} {r.priority.value:<9} "
            f"{','.join(r.models):<24} {r.rpm or '-':>7} {r.tpm or '-':>9}  "
            f"{created:<20}  {secret or '-'}"
        )


def _file_command(args: argparse.Namespace) -> None:
    path: Path = args.file
    current = read_key_file(path)
    names = {r.name for r in current.keys}
    if args.action == "list":
        _show_list([(None, r) for r in current.keys])
        return
    if args.action == "create":
        if args.name in names:
            raise CliError(f"a key named {args.name!r} exists; revoke it first")
        key, record = _new_record(args)
        _write_key_file(path, KeyFile(keys=[*current.keys, record]))
        _show_created(key, record)
        return
    if args.action == "revoke" and args.secret is not None:
        raise CliError("a key file has no Secrets: revoke a key by its name")
    if args.name not in names:
        raise CliError(f"no key named {args.name!r}")
    others = [r for r in current.keys if r.name != args.name]
    if args.action == "rotate":
        if args.keep_old_for is not None:
            # Its entries have no name of their own to revoke one by later.
            raise CliError("--keep-old-for needs Secrets, not a key file")
        mine = [(str(i), r) for i, r in enumerate(current.keys) if r.name == args.name]
        key, record = rotated(newest(mine))
        _write_key_file(path, KeyFile(keys=[*others, record]))
        _show_created(key, record, "rotated")
        print(f"the old key {args.name!r} is revoked")
        return
    _write_key_file(path, KeyFile(keys=others))
    print(f"revoked key {args.name!r}")


def _write_key_file(path: Path, content: KeyFile) -> None:
    """Writes atomically (a gateway may be reading it), with the mode, owner and
    group of the file it replaces; a new file is private to the user (0600).

    The replacement is another file: made with the CLI's user and 0600, a
    gateway running as another user could no longer read it, kept its old keys
    (a revoke never took effect) and had none after a restart. A path through
    a symbolic link writes the file the link names: the replacement put in the
    link's place left the gateway, which reads the target, its old keys.
    """
    data = orjson.dumps(
        content.model_dump(mode="json", by_alias=True), option=orjson.OPT_INDENT_2
    )
    # The link's target is replaced, by a temporary file beside it: a rename
    # cannot cross file systems, and the link's folder may be on another.
    path = path.resolve()
    try:
        before: os.stat_result | None = path.stat()
    except FileNotFoundError:
        before = None
    # A name of its own (mkstemp makes it 0600): two runs at once must not
    # write into one temporary file, nor one replace the file with the other's.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if before is not None:
                _keep_access(out.fileno(), before)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _keep_access(fd: int, before: os.stat_result) -> None:
    """Gives the open file `fd` the owner, group and mode of `before`: the owner
    and group where this user may (root; a member of the group), else leaves
    them the user's, since the mode (read by group or others) may still let the
    gateway read it."""
    for uid in (before.st_uid, -1):  # -1: the group alone, when not the owner
        try:
            os.fchown(fd, uid, before.st_gid)
        except PermissionError:
            continue
        break
    # After chown, which may clear set-id bits.
    os.fchmod(fd, stat.S_IMODE(before.st_mode))


async def _kube_command(args: argparse.Namespace) -> None:
    kubeconfig = args.kubeconfig or Path(
        os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
    )
    client = KubeClient(load_kubeconfig(kubeconfig, args.context))
    await client.start()
    try:
        path = secrets(args.namespace)
        held, charted = await _key_secrets(client, path)
        if args.action in ("rotate", "revoke"):
            _refuse_charted(args, held, charted)
        if args.action == "list":
            _show_list([(s, r) for s, r in held.items() if r is not None])
        elif args.action == "create":
            await _create(client, path, held, args)
        elif args.action == "rotate":
            await _rotate(client, path, held, args)
        elif args.secret is not None:
            await _revoke_secret(client, path, held, args.secret)
        else:
            deleted = await _delete(client, path, secrets_of(held, args.name))
            if not deleted:
                raise CliError(f"no key named {args.name!r}")
            print(f"revoked key {args.name!r} (Secrets: {', '.join(deleted)})")
    finally:
        await client.close()


async def _key_secrets(
    client: KubeClient, path: str
) -> tuple[dict[str, KeyRecord | None], set[str]]:
    """The key Secrets by name, each with its record (None: unreadable), and
    the names of those a Helm release renders (the chart's admin key)."""
    items, _ = await client.list(path, {"labelSelector": f"{KEY_LABEL}=true"})
    held: dict[str, KeyRecord | None] = {}
    charted: set[str] = set()
    for item in items:
        meta = item.get("metadata")
        secret = meta.get("name") if isinstance(meta, dict) else None
        if isinstance(secret, str):
            held[secret] = key_from_secret(item)
            labels = meta.get("labels") if isinstance(meta, dict) else None
            if isinstance(labels, dict) and labels.get(MANAGED_BY) == "Helm":
                charted.add(secret)
    return held, charted


def _refuse_charted(
    args: argparse.Namespace, held: dict[str, KeyRecord | None], charted: set[str]
) -> None:
    """Refuses to rotate or revoke a key whose Secret a Helm release renders:
    the next upgrade or Argo CD sync would make it again, and the old key
    would work again beside the new one."""
    secret = getattr(args, "secret", None)
    doomed = {secret} if secret is not None else secrets_of(held, args.name)
    mine = sorted(doomed & charted)
    if mine:
        raise CliError(
            f"the Secret {mine[0]} is rendered by the Helm chart, which would make "
            "it again at the next upgrade or sync: rotate the admin key through "
            "the chart's values (gateway.adminKey, see docs/install.md)"
        )


def secrets_of(held: dict[str, KeyRecord | None], name: str) -> set[str]:
    """The key Secrets to delete to revoke every key of a name: those whose
    record names it, and the one `create` makes for it when its record cannot
    be read. The gateway takes each Secret for a key of its own, so a second
    Secret of the name (a kept rotation, one made by hand) left behind would
    keep a key of that name working. A readable Secret of `create`'s name whose
    record names another key is that key's, not this name's."""
    mine = {s for s, r in held.items() if r is not None and r.name == name}
    made = KEY_SECRET_PREFIX + name
    return mine | {made} if made in held and held[made] is None else mine


async def _create(
    client: KubeClient,
    path: str,
    held: dict[str, KeyRecord | None],
    args: argparse.Namespace,
) -> None:
    # The 409 alone misses a name whose keys sit in other Secrets (rotated).
    if any(r is not None and r.name == args.name for r in held.values()):
        raise CliError(f"a key named {args.name!r} exists; rotate or revoke it")
    key, record = _new_record(args)
    await _post(client, path, key_secret(record, args.namespace), args.name)
    _show_created(key, record)


async def _post(client: KubeClient, path: str, secret: Obj, name: str) -> None:
    try:
        await client.request("POST", path, body=secret)
    except KubeApiError as err:
        if err.status == 409:
            raise CliError(f"a key named {name!r} exists") from err
        raise


async def _rotate(
    client: KubeClient,
    path: str,
    held: dict[str, KeyRecord | None],
    args: argparse.Namespace,
) -> None:
    """Makes the new key in a Secret of its own before the old ones go, so
    that the name always has a key that works."""
    mine = [(s, r) for s, r in held.items() if r is not None and r.name == args.name]
    if not mine:
        raise CliError(f"no key named {args.name!r}")
    key, record = rotated(newest(mine))
    # Random: the old Secret (perhaps citadel-key-<name>) is still there. A
    # dot, which no key name holds, so that it is never the Secret `create`
    # makes for another name (bob-1a2b3c's would be citadel-key-bob-1a2b3c).
    secret = f"{KEY_SECRET_PREFIX}{args.name}.{random.token_hex(3)}"
    await _post(client, path, key_secret(record, args.namespace, secret), args.name)
    _show_created(key, record, "rotated")
    print(f"its Secret: {secret}")
    old = sorted(secrets_of(held, args.name) - {secret})
    if args.keep_old_for is None:
        try:
            deleted = await _delete(client, path, old)
        except KubeApiError as err:
            # The new key is shown already: say what still works, and the way out.
            again = shlex.join([*_keys_prefix(args), "revoke", "--secret", "SECRET"])
            raise CliError(
                f"the old key is not revoked ({err}); its Secrets: "
                f"{', '.join(s for s in old if s in held)}; run `{again}` for each"
            ) from err
        print(f"the old key is revoked (Secrets: {', '.join(deleted) or 'none'})")
        return
    # Nothing expires a key by itself: say when, and what to run then.
    until = datetime.now(UTC) + timedelta(seconds=args.keep_old_for)
    print(
        f"the old key works until its Secrets are deleted; after "
        f"{until:%Y-%m-%dT%H:%M:%SZ}, revoke it with:"
    )
    for name in (s for s in old if s in held):
        print(shlex.join([*_keys_prefix(args), "revoke", "--secret", name]))


def _keys_prefix(args: argparse.Namespace) -> list[str]:
    """`citadel keys` with the options that found the Secrets."""
    words = ["citadel", "keys", "-n", args.namespace]
    if args.kubeconfig is not None:
        words += ["--kubeconfig", str(args.kubeconfig)]
    if args.context is not None:
        words += ["--context", args.context]
    return words


async def _revoke_secret(
    client: KubeClient, path: str, held: dict[str, KeyRecord | None], secret: str
) -> None:
    # Only a labelled key Secret: a mistyped name must not delete another
    # Secret of the namespace (the admin key's plain text, a TLS key).
    if secret not in held or not await _delete(client, path, [secret]):
        raise CliError(f"no key Secret named {secret!r}")
    record = held[secret]
    if record is None:
        print(f"deleted the unreadable key Secret {secret}")
        return
    print(f"revoked the key {record.name!r} of Secret {secret}")
    left = sorted(secrets_of(held, record.name) & held.keys() - {secret})
    if left:
        print(f"other keys of that name still work (Secrets: {', '.join(left)})")


async def _delete(client: KubeClient, path: str, doomed: Iterable[str]) -> list[str]:
    """Deletes these Secrets; those it deleted (404: gone already, or never made)."""
    deleted = []
    for secret in sorted(doomed):
        try:
            await client.request("DELETE", f"{path}/{secret}")
        except KubeApiError as err:
            if err.status != 404:
                raise
            continue
        deleted.append(secret)
    return deleted
