"""Where the harness keeps its files and which loopback ports it uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
CLUSTER_DIR = HARNESS_DIR.parent / "cluster"
CONTEXT_NAME = "citadel-local"


def read_versions() -> dict[str, str]:
    """Returns the pinned versions from `tests/e2e/cluster/versions.env`."""
    versions: dict[str, str] = {}
    for line in (CLUSTER_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key] = value
    return versions


@dataclass(frozen=True)
class Ports:
    """Loopback ports, chosen high and uncommon so they rarely collide."""

    @classmethod
    def shifted(cls, offset: int) -> Ports:
        """The same set of ports moved by `offset`, for a second cluster."""
        base = cls()
        return cls(**{f: getattr(base, f) + offset for f in base.__dataclass_fields__})

    etcd_client: int = 23790
    etcd_peer: int = 23800
    apiserver: int = 26443
    controller_manager: int = 26257
    scheduler: int = 26259
    kwok_server: int = 26250
    pod_runtime: int = 26251


@dataclass(frozen=True)
class Layout:
    """Every path the harness reads or writes; nothing lives in the repository.

    Attributes:
        cache: the root (`$CITADEL_CACHE`, default `~/.cache/citadel`).
        bin: the built binaries.
        state: the running cluster: certificates, etcd data, logs, pid files.
    """

    cache: Path
    state_dir: Path | None = None
    """Overrides `<cache>/cluster`, so a second cluster can share the binaries."""

    @classmethod
    def from_env(cls) -> Layout:
        root = os.environ.get("CITADEL_CACHE") or str(Path.home() / ".cache/citadel")
        return cls(cache=Path(root))

    @property
    def bin(self) -> Path:
        return self.cache / "bin"

    @property
    def state(self) -> Path:
        return self.state_dir or self.cache / "cluster"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def etcd_data(self) -> Path:
        return self.state / "etcd"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state / "admin.kubeconfig"

    def binary(self, name: str) -> Path:
        return self.bin / name
