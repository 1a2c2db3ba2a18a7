"""Reading kubeconfig files and the in-cluster service account."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from citadel.gateway.kube.config import KubeConfigError, in_cluster, load_kubeconfig

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Pki:
    """PEMs: a CA, a client certificate and its key, a key of no certificate
    here, and the client key under a password."""

    ca: bytes
    cert: bytes
    key: bytes
    other_key: bytes
    encrypted_key: bytes


def _self_signed(
    name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
) -> tuple[bytes, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key


def _pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, _ = _self_signed("ca")
    cert, key = _self_signed("client")
    return Pki(
        ca=ca,
        cert=cert,
        key=_pem(key),
        other_key=_pem(ec.generate_private_key(ec.SECP256R1())),
        encrypted_key=_pem(key, b"secret"),
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write(tmp_path: Path, user: dict[str, object], **cluster: object) -> Path:
    doc = {
        "current-context": "c",
        "contexts": [
            {"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ns"}}
        ],
        "clusters": [
            {"name": "k", "cluster": {"server": "https://127.0.0.1:6443/", **cluster}}
        ],
        "users": [{"name": "u", "user": user}],
    }
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_token_and_inline_ca(tmp_path: Path, pki: Pki) -> None:
    ca = b64(pki.ca)
    cfg = load_kubeconfig(
        write(tmp_path, {"token": "t0k"}, **{"certificate-authority-data": ca})
    )
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.ca_data == pki.ca and cfg.bearer() == "t0k" and cfg.namespace == "ns"
    assert isinstance(cfg.ssl_context(), ssl.SSLContext)


def test_inline_client_certificate_and_key(tmp_path: Path, pki: Pki) -> None:
    user = {"client-certificate-data": b64(pki.cert), "client-key-data": b64(pki.key)}
    cfg = load_kubeconfig(write(tmp_path, user))
    assert (cfg.cert_data, cfg.key_data) == (pki.cert, pki.key)
    assert isinstance(cfg.ssl_context(), ssl.SSLContext)


def test_files_are_relative_to_the_kubeconfig(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.ca)
    (tmp_path / "client.crt").write_bytes(pki.cert)
    (tmp_path / "client.key").write_bytes(pki.key)
    (tmp_path / "token").write_text("rotating\n")
    user = {
        "client-certificate": "client.crt",
        "client-key": "client.key",
        "tokenFile": "token",
    }
    cfg = load_kubeconfig(write(tmp_path, user, **{"certificate-authority": "ca.crt"}))
    assert (cfg.ca_data, cfg.cert_data, cfg.key_data) == (pki.ca, pki.cert, pki.key)
    assert cfg.bearer() == "rotating"
    assert isinstance(cfg.ssl_context(), ssl.SSLContext)


def test_missing_context_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="no context named 'other'"):
        load_kubeconfig(write(tmp_path, {}), "other")


def test_insecure_context_skips_verification(tmp_path: Path) -> None:
    cfg = load_kubeconfig(write(tmp_path, {}, **{"insecure-skip-tls-verify": True}))
    ctx = cfg.ssl_context()
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_NONE


def test_in_cluster(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("citadel-system")
    cfg = in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, tmp_path)
    assert cfg.server == "https://10.96.0.1:443" and cfg.bearer() == "sa-token"
    assert cfg.namespace == "citadel-system"
    with pytest.raises(KubeConfigError, match="not in a cluster"):
        in_cluster({}, tmp_path)


@pytest.mark.parametrize(
    ("text", "user", "cluster", "message"),
    [
        ("- a\n- b\n", None, {}, "is not a mapping of settings"),
        (None, {"client-certificate": "missing.crt"}, {}, "cannot read kubeconfig"),
        (
            None,
            {},
            {"certificate-authority-data": "not base64!"},
            "certificate-authority-data is not base64",
        ),
    ],
)
def test_a_kubeconfig_it_cannot_use_says_why(
    tmp_path: Path,
    text: str | None,
    user: dict[str, object] | None,
    cluster: dict[str, object],
    message: str,
) -> None:
    """A YAML list, a certificate file that is not there, data that is not
    base64: each ended the gateway's start in a traceback (AttributeError,
    FileNotFoundError, binascii.Error) where a KubeConfigError is one line."""
    path = write(tmp_path, user or {}, **cluster)
    if text is not None:
        path.write_text(text)
    with pytest.raises(KubeConfigError, match=message):
        load_kubeconfig(path)


HELLO = b"hello"
"""Valid base64 once encoded, and no PEM of anything."""


@pytest.mark.parametrize(
    ("user", "cluster", "message"),
    [
        (
            {},
            {"certificate-authority-data": b64(HELLO)},
            "kubeconfig certificate-authority-data holds no PEM certificate",
        ),
        (
            {},
            {"certificate-authority-data": b64(b"\xff\xfe")},  # not even text
            "kubeconfig certificate-authority-data holds no PEM certificate",
        ),
        (
            {},
            {"certificate-authority": "hello.txt"},
            r"kubeconfig certificate-authority \S+/hello.txt holds no PEM cert",
        ),
        (
            {},
            {"certificate-authority": "empty.txt"},
            r"kubeconfig certificate-authority \S+/empty.txt holds no PEM cert",
        ),
        (
            {"client-certificate-data": b64(HELLO), "client-key-data": "KEY"},
            {},
            "kubeconfig client-certificate-data holds no PEM certificate",
        ),
        (
            {"client-certificate-data": "KEY", "client-key-data": "KEY"},  # swapped
            {},
            "kubeconfig client-certificate-data holds no PEM certificate",
        ),
        (
            {"client-certificate": "hello.txt", "client-key": "client.key"},
            {},
            r"kubeconfig client-certificate \S+/hello.txt holds no PEM cert",
        ),
        (
            {"client-certificate-data": "CERT", "client-key-data": b64(HELLO)},
            {},
            "kubeconfig client-key-data holds no PEM private key",
        ),
        (
            {"client-certificate": "client.crt", "client-key": "hello.txt"},
            {},
            r"kubeconfig client-key \S+/hello.txt holds no PEM private key",
        ),
        (
            {"client-certificate-data": "CERT", "client-key-data": "OTHER_KEY"},
            {},
            "kubeconfig client-key-data is not the key of the client certificate",
        ),
        (
            # OpenSSL asked for its password on the terminal.
            {"client-certificate-data": "CERT", "client-key-data": "ENCRYPTED_KEY"},
            {},
            "client-key-data holds no PEM private key",
        ),
        (
            {"client-certificate-data": "CERT"},
            {},
            "kubeconfig client-certificate-data comes without a client-key",
        ),
        (
            {"client-key": "client.key"},
            {},
            r"kubeconfig client-key \S+/client.key comes without a client-cert",
        ),
    ],
    ids=[
        "ca-data-hello",
        "ca-data-binary",
        "ca-file-hello",
        "ca-file-empty",
        "cert-data-hello",
        "cert-data-is-a-key",
        "cert-file-hello",
        "key-data-hello",
        "key-file-hello",
        "key-of-another",
        "key-encrypted",
        "cert-alone",
        "key-alone",
    ],
)
def test_tls_data_it_cannot_use_is_refused_at_load_naming_the_field(
    tmp_path: Path,
    pki: Pki,
    user: dict[str, str],
    cluster: dict[str, str],
    message: str,
) -> None:
    """Valid base64 of something that is no PEM (or a file holding none)
    passed the load and stopped the app's start-up with an SSLError traceback
    (exit 3); a key alone, or a certificate alone, went unused."""
    inline = {
        "CERT": b64(pki.cert),
        "KEY": b64(pki.key),
        "OTHER_KEY": b64(pki.other_key),
        "ENCRYPTED_KEY": b64(pki.encrypted_key),
    }
    (tmp_path / "hello.txt").write_bytes(HELLO)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "client.crt").write_bytes(pki.cert)
    (tmp_path / "client.key").write_bytes(pki.key)
    path = write(tmp_path, {k: inline.get(v, v) for k, v in user.items()}, **cluster)
    with pytest.raises(KubeConfigError, match=message):
        load_kubeconfig(path)


def test_a_key_of_another_type_is_not_the_certificate_s(
    tmp_path: Path, pki: Pki
) -> None:
    """OpenSSL says NO_CERTIFICATE_ASSIGNED, not KEY_VALUES_MISMATCH, for an EC
    key beside an RSA certificate: it was called no PEM private key."""
    rsa_cert, _ = _self_signed("client", rsa.generate_private_key(65537, 2048))
    user = {"client-certificate-data": b64(rsa_cert), "client-key-data": b64(pki.key)}
    with pytest.raises(KubeConfigError, match="client-key-data is not the key of"):
        load_kubeconfig(write(tmp_path, user))


def test_a_certificate_openssl_refuses_is_named_with_the_reason(
    tmp_path: Path,
) -> None:
    """A 1024-bit RSA certificate, below OpenSSL's security level: its key,
    a fine PEM, was blamed."""
    cert, key = _self_signed("client", rsa.generate_private_key(65537, 1024))
    user = {"client-certificate-data": b64(cert), "client-key-data": b64(_pem(key))}
    with pytest.raises(KubeConfigError) as err:
        load_kubeconfig(write(tmp_path, user))
    assert str(err.value).startswith(
        "kubeconfig client-certificate-data is refused by OpenSSL (EE_KEY_TOO_SMALL)"
    )


def test_a_ca_bundle_with_text_around_its_certificates_loads(
    tmp_path: Path, pki: Pki
) -> None:
    """A bundle's comments may be in any language (older Mozilla bundles name
    issuers in Hungarian); OpenSSL's cadata takes ASCII only, and kubectl reads
    the certificates alone."""
    other, _ = _self_signed("other ca")
    bundle = "# Issuer: CN=Főtanúsítvány\n".encode() + pki.ca + b"trailing\r\n" + other
    cfg = load_kubeconfig(
        write(tmp_path, {"token": "t"}, **{"certificate-authority-data": b64(bundle)})
    )
    assert cfg.ca_data == pki.ca + other  # each ends in a line end
    context = cfg.ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509"] == 2
