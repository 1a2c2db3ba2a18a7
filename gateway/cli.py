"""`citadel`: the command-line tool. `citadel keys create|list|revoke` manages API
keys as Kubernetes Secrets (with your kubeconfig) or in a static key file
(`--file`, for a gateway run outside Kubernetes)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
from pydantic import ValidationError

from citadel.gateway import __version__
from citadel.gateway.kube.client import KubeApiError, KubeClient, secrets
from citadel.gateway.kube.config import KubeConfigError, load_kubeconfig
from citadel.gateway.routes import invalid_fields
from citadel.gateway.services.auth import (
    KeyRecord,
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
        "--models", nargs="+", default=["*"], help="glob patterns (default: *)"
    )
    for limit in ("rpm", "tpm", "daily-tokens", "monthly-tokens"):
        create.add_argument(f"--{limit}", type=int)
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke every key of a name now")
    revoke.add_argument("name")
    return parser


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
        rpm=args.rpm,
        tpm=args.tpm,
        daily_tokens=args.daily_tokens,
        monthly_tokens=args.monthly_tokens,
    )
    return key, record


def _show_created(key: str, record: KeyRecord) -> None:
    print(f"created key {record.name!r}; it is shown once, store it now:")
    print(key)


def _show_list(records: Sequence[KeyRecord]) -> None:
    print(f"{'NAME':<24} {'ROLE':<6} {'MODELS':<24} {'RPM':>7} {'TPM':>9}  CREATED")
    for r in sorted(records, key=lambda r: r.name):
        print(
            f"{r.name:<24} {r.role.value:<6} {','.join(r.models):<24} "
            f"{r.rpm or '-':>7} {r.tpm or '-':>9}  {r.created:%Y-%m-%dT%H:%M:%SZ}"
        )


def _file_command(args: argparse.Namespace) -> None:
    path: Path = args.file
    current = read_key_file(path)
    names = {r.name for r in current.keys}
    if args.action == "list":
        _show_list(current.keys)
        return
    if args.action == "create":
        if args.name in names:
            raise CliError(f"a key named {args.name!r} exists; revoke it first")
        key, record = _new_record(args)
        _write_key_file(path, KeyFile(keys=[*current.keys, record]))
        _show_created(key, record)
        return
    if args.name not in names:
        raise CliError(f"no key named {args.name!r}")
    _write_key_file(
        path, KeyFile(keys=[r for r in current.keys if r.name != args.name])
    )
    print(f"revoked key {args.name!r}")


def _write_key_file(path: Path, content: KeyFile) -> None:
    """Writes atomically (a gateway may be reading it) and private to the user."""
    data = orjson.dumps(
        content.model_dump(mode="json", by_alias=True), option=orjson.OPT_INDENT_2
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(path)


async def _kube_command(args: argparse.Namespace) -> None:
    kubeconfig = args.kubeconfig or Path(
        os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
    )
    client = KubeClient(load_kubeconfig(kubeconfig, args.context))
    await client.start()
    try:
        path = secrets(args.namespace)
        if args.action == "list":
            items, _ = await client.list(path, {"labelSelector": f"{KEY_LABEL}=true"})
            _show_list([r for r in map(key_from_secret, items) if r is not None])
        elif args.action == "create":
            key, record = _new_record(args)
            try:
                await client.request(
                    "POST", path, body=key_secret(record, args.namespace)
                )
            except KubeApiError as err:
                if err.status == 409:
                    raise CliError(f"a key named {args.name!r} exists") from err
                raise
            _show_created(key, record)
        else:
            await _revoke_secrets(client, path, args.name)
    finally:
        await client.close()


async def _revoke_secrets(client: KubeClient, path: str, name: str) -> None:
    """Deletes every key Secret whose record names the key, and the one
    `create` made for it (readable or not): the gateway takes each Secret for a
    key of its own, so a second Secret of the name (a rotation made by hand)
    left behind would keep a key of that name working."""
    items, _ = await client.list(path, {"labelSelector": f"{KEY_LABEL}=true"})
    doomed = {KEY_SECRET_PREFIX + name}
    for item in items:
        record = key_from_secret(item)
        meta = item.get("metadata")
        secret = meta.get("name") if isinstance(meta, dict) else None
        if record is not None and record.name == name and isinstance(secret, str):
            doomed.add(secret)
    deleted = []
    for secret in sorted(doomed):
        try:
            await client.request("DELETE", f"{path}/{secret}")
        except KubeApiError as err:
            if err.status != 404:  # 404: gone already, or never made
                raise
            continue
        deleted.append(secret)
    if not deleted:
        raise CliError(f"no key named {name!r}")
    print(f"revoked key {name!r} (Secrets: {', '.join(deleted)})")
