"""A small certificate authority for the local cluster: serving and client
certificates for every component, and the ServiceAccount signing key."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=365)
# Bumped whenever what is issued changes, so that `up` issues everything anew.
PKI_VERSION = "3"

# name -> (common name, organisation) of the client certificates the harness issues.
CLIENTS: dict[str, tuple[str, str | None]] = {
    "admin": ("citadel-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kwok": ("citadel-kwok", "system:masters"),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    *,
    server: bool,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    return key, builder.sign(ca_key, hashes.SHA256())


def pki_current(directory: Path) -> bool:
    """Whether the certificates in `directory` are what this version issues."""
    marker = directory / "complete"
    return marker.exists() and marker.read_text().strip() == PKI_VERSION


def ensure_pki(directory: Path) -> None:
    """Creates the CA and every certificate once; later calls keep what exists.

    Args:
        directory: where `ca.crt`, `<name>.crt`/`.key` and `sa.key`/`sa.pub` go.
    """
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "complete"
    if pki_current(directory):
        return
    ca_key = _key()
    now = dt.datetime.now(dt.UTC)
    ca_name = _name("citadel-local-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + 10 * VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    sans: list[x509.GeneralName] = [
        x509.DNSName(name)
        for name in (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
    ]
    # 10.244.128.1: the pod runtime's bridge, where pods reach the API server.
    addresses = ("127.0.0.1", "10.96.0.1", "10.244.128.1")
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in addresses]
    servers = {"apiserver": sans, "kwok-server": sans, "etcd": sans}
    for name, server_sans in servers.items():
        key, cert = _issue(ca_key, ca_cert, _name(name), server=True, sans=server_sans)
        _write_key(directory / f"{name}.key", key)
        (directory / f"{name}.crt").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
        )
    for name, (cn, org) in CLIENTS.items():
        key, cert = _issue(ca_key, ca_cert, _name(cn, org), server=False)
        _write_key(directory / f"{name}.key", key)
        (directory / f"{name}.crt").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
        )

    sa_key = _key()
    _write_key(directory / "sa.key", sa_key)
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    marker.write_text(PKI_VERSION + "\n")
