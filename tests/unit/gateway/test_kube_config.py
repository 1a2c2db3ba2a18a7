"""Reading kubeconfig files and the in-cluster service account."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
import yaml

from citadel.gateway.kube.config import KubeConfigError, in_cluster, load_kubeconfig

pytestmark = pytest.mark.unit


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


def test_token_and_inline_ca(tmp_path: Path) -> None:
    ca = base64.b64encode(b"PEM").decode()
    cfg = load_kubeconfig(
        write(tmp_path, {"token": "t0k"}, **{"certificate-authority-data": ca})
    )
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.ca_data == b"PEM" and cfg.bearer() == "t0k" and cfg.namespace == "ns"


def test_files_are_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "client.crt").write_bytes(b"CERT")
    (tmp_path / "client.key").write_bytes(b"KEY")
    (tmp_path / "token").write_text("rotating\n")
    user = {
        "client-certificate": "client.crt",
        "client-key": "client.key",
        "tokenFile": "token",
    }
    cfg = load_kubeconfig(write(tmp_path, user, **{"insecure-skip-tls-verify": True}))
    assert (cfg.cert_data, cfg.key_data, cfg.insecure) == (b"CERT", b"KEY", True)
    assert cfg.bearer() == "rotating"


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
