"""Where the Kubernetes API is and how to authenticate: kubeconfig or in-cluster."""

from __future__ import annotations

import base64
import re
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(ValueError):
    """A kubeconfig that cannot be used; the message says why."""


@dataclass(frozen=True)
class KubeConfig:
    """Everything needed to reach one API server.

    Attributes:
        server: `https://host:port`.
        ca_data: PEM of the CA that signs the server's certificate.
        insecure: skip verifying the server's certificate.
        cert_data, key_data: PEM of a client certificate and its key.
        token: a bearer token.
        token_file: a file holding a bearer token, re-read as it rotates.
        namespace: the context's namespace.
    """

    server: str
    ca_data: bytes | None = None
    insecure: bool = False
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    token_file: Path | None = None
    namespace: str | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS context for aiohttp (True: system defaults)."""
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(
            cadata=self.ca_data.decode() if self.ca_data else None
        )
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_data and self.key_data:
            _load_client_pair(ctx, self.cert_data, self.key_data)
        return ctx

    def bearer(self) -> str | None:
        """The current bearer token, if any (the file wins: it rotates)."""
        if self.token_file is not None and self.token_file.exists():
            return self.token_file.read_text().strip()
        return self.token


_Source = tuple[bytes, str]
"""Data a kubeconfig names, and where it came from, for messages:
`<field>-data`, or `<field> <path>`."""


def _data(entry: Mapping[str, Any], field: str, base: Path) -> _Source | None:
    """`<field>-data` (base64) or the file named by `<field>`.

    Raises:
        KubeConfigError: the data is not base64, or the file cannot be read.
    """
    data = entry.get(f"{field}-data")
    if data:
        try:
            # Whitespace (a value folded over lines) is no error; anything
            # else outside the alphabet is, where b64decode dropped it.
            decoded = base64.b64decode("".join(str(data).split()), validate=True)
        except ValueError as err:  # binascii.Error is one
            raise KubeConfigError(f"kubeconfig {field}-data is not base64") from err
        return decoded, f"{field}-data"
    if entry.get(field):
        path = (base / str(entry[field])).expanduser()
        try:
            return path.read_bytes(), f"{field} {path}"
        except OSError as err:
            raise KubeConfigError(
                f"cannot read kubeconfig {field} {path}: {err}"
            ) from err
    return None


def _no_password() -> bytes:
    """An encrypted key's password: none. Without a callback OpenSSL asks for
    one on the terminal, which a start-up must never wait on."""
    return b""


def _load_client_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Loads a client certificate and its key into `ctx`.

    Raises:
        ssl.SSLError: either is no PEM, or the key is not the certificate's.
    """
    # load_cert_chain reads files only: write them where only we can read.
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)


def _certificates(source: _Source) -> bytes:
    """The PEM certificates in `source`, once OpenSSL reads them.

    Raises:
        KubeConfigError: it holds none (the message says where it came from).
    """
    data, where = source
    # The certificates alone: text around them (a bundle's comments, in any
    # language) is no part of them, and OpenSSL's cadata takes ASCII only.
    blocks = _PEM_CERTIFICATE.findall(data)
    try:
        pem = b"\n".join(blocks)
        # The parse the CA gets in `ssl_context`; it also tells a client
        # certificate from anything else, its key included.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=pem.decode("ascii")
        )
    except (ssl.SSLError, ValueError) as err:  # not ASCII, or empty: ValueError
        raise KubeConfigError(f"kubeconfig {where} holds no PEM certificate") from err
    return pem + b"\n"


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S
)


def _client_pair(
    cert: _Source | None, key: _Source | None
) -> tuple[bytes | None, bytes | None]:
    """The client certificate and its key, once they load as a pair.

    Raises:
        KubeConfigError: one without the other, a certificate that is none, or
            a key that is no PEM private key, or not the certificate's.
    """
    if cert is None or key is None:
        # One alone went unused, and the API server refused every request.
        if cert is not None:
            raise KubeConfigError(f"kubeconfig {cert[1]} comes without a client-key")
        if key is not None:
            raise KubeConfigError(
                f"kubeconfig {key[1]} comes without a client-certificate"
            )
        return None, None
    cert_data = _certificates(cert)
    try:
        # What `ssl_context` will load: the certificates alone.
        _load_client_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_data, key[0])
    except ssl.SSLError as err:
        if err.reason in _CERTIFICATE_REFUSED:
            raise KubeConfigError(
                f"kubeconfig {cert[1]} is refused by OpenSSL ({err.reason}): a "
                "stronger certificate is needed"
            ) from err
        why = (
            "is not the key of the client certificate"
            if err.reason in _NOT_THE_KEY
            else "holds no PEM private key (an encrypted one is not supported)"
        )
        raise KubeConfigError(f"kubeconfig {key[1]} {why}") from err
    return cert_data, key[0]


_NOT_THE_KEY = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"})
"""OpenSSL's reasons for a key that does not go with the certificate: of
another certificate, or of another type (an EC key beside an RSA
certificate)."""

_CERTIFICATE_REFUSED = frozenset(
    {"CA_MD_TOO_WEAK", "EE_KEY_TOO_SMALL", "CA_KEY_TOO_SMALL"}
)
"""OpenSSL's reasons for refusing a client certificate under its security
level: signed with SHA-1 or MD5, or a key too small (1024-bit RSA)."""


def _named(items: Any, name: str, kind: str) -> dict[str, Any]:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("name") == name:
            found = item.get(kind) or {}
            if not isinstance(found, dict):
                raise KubeConfigError(f"kubeconfig {kind} {name!r} is not a mapping")
            return found
    raise KubeConfigError(f"kubeconfig has no {kind} named {name!r}")


def load_kubeconfig(path: Path, context: str | None = None) -> KubeConfig:
    """Reads a kubeconfig file (client certificates or token; no exec plugins).

    Raises:
        KubeConfigError: the file cannot be read or is no kubeconfig, lacks
            the context, cluster or user named, or names data it cannot read:
            not base64, a CA or client certificate with no PEM certificate in
            it, a client key that is no PEM private key or not the
            certificate's, or one of the two without the other.
    """
    try:
        doc = yaml.safe_load(path.expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {err}") from err
    if not isinstance(doc, dict):
        raise KubeConfigError(f"kubeconfig {path} is not a mapping of settings")
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError(f"kubeconfig {path} has no current context")
    ctx = _named(doc.get("contexts"), name, "context")
    cluster = _named(doc.get("clusters"), ctx.get("cluster", ""), "cluster")
    user = _named(doc.get("users"), ctx.get("user", ""), "user")
    base = path.expanduser().parent
    token_file = user.get("tokenFile")
    # Read here as `ssl_context` reads them: data OpenSSL cannot use stops the
    # start with a line naming it, where it stopped the app's start-up with an
    # SSLError's traceback.
    ca = _data(cluster, "certificate-authority", base)
    cert_data, key_data = _client_pair(
        _data(user, "client-certificate", base), _data(user, "client-key", base)
    )
    return KubeConfig(
        server=str(cluster.get("server", "")).rstrip("/"),
        ca_data=_certificates(ca) if ca else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        cert_data=cert_data,
        key_data=key_data,
        token=user.get("token"),
        token_file=base / token_file if token_file else None,
        namespace=ctx.get("namespace"),
    )


def in_cluster(
    environ: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR
) -> KubeConfig:
    """The pod's service account (`KUBERNETES_SERVICE_HOST`/`_PORT` from environ).

    Raises:
        KubeConfigError: not running in a pod.
    """
    host = environ.get("KUBERNETES_SERVICE_HOST")
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeConfigError(
            "not in a cluster (no KUBERNETES_SERVICE_HOST): set "
            "CITADEL_GATEWAY_KUBECONFIG or CITADEL_GATEWAY_ROUTES_SOURCE=file"
        )
    if ":" in host:
        host = f"[{host}]"
    ca = account_dir / "ca.crt"
    namespace = account_dir / "namespace"
    return KubeConfig(
        server=f"https://{host}:{port}",
        ca_data=ca.read_bytes() if ca.exists() else None,
        token_file=account_dir / "token",
        namespace=namespace.read_text().strip() if namespace.exists() else None,
    )
