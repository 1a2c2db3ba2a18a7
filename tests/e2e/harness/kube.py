"""A handle on the cluster under test for e2e tests: kubectl and helm against one
kubeconfig."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path


class KubectlError(RuntimeError):
    """kubectl exited non-zero; the message holds its stderr."""


@dataclass(frozen=True)
class KubeCluster:
    """The cluster under test, reached through a kubeconfig file.

    Attributes:
        kubeconfig: the kubeconfig file the tests (and any process they start) use.
        context: the context in it, or None for its current context.
        kubectl_path: the kubectl binary.
        helm_path: the helm binary.
        local: True when this is the local harness (kwok nodes, known node names).
    """

    kubeconfig: Path
    context: str | None
    kubectl_path: str
    helm_path: str
    local: bool

    def _base(self, tool: str, context_flag: str) -> list[str]:
        args = [tool, f"--kubeconfig={self.kubeconfig}"]
        if self.context:
            args.append(f"{context_flag}={self.context}")
        return args

    def with_token(self, token: str, path: Path) -> KubeCluster:
        """The same cluster, authenticating only with a bearer `token`.

        Args:
            token: e.g. a ServiceAccount token from `kubectl create token`.
            path: where to write the derived kubeconfig.
        """
        config = json.loads(
            self.kubectl("config", "view", "--raw", "--minify", "-o", "json")
        )
        context = config["contexts"][0]
        config["users"] = [{"name": "token-user", "user": {"token": token}}]
        context["context"]["user"] = "token-user"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return KubeCluster(
            kubeconfig=path,
            context=context["name"],
            kubectl_path=self.kubectl_path,
            helm_path=self.helm_path,
            local=self.local,
        )

    def kubectl(
        self,
        *args: str,
        input_text: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> str:
        """Runs kubectl against the cluster and returns its standard output.

        Args:
            timeout: seconds before kubectl is killed; a command with its own
                `--timeout` needs a longer one here.

        Raises:
            KubectlError: kubectl failed and `check` is true.
        """
        return self._run(
            self._base(self.kubectl_path, "--context"), args, input_text, check, timeout
        )

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """Runs helm against the cluster and returns its standard output."""
        return self._run(
            self._base(self.helm_path, "--kube-context"), args, None, check, timeout
        )

    @staticmethod
    def _run(
        base: list[str],
        args: tuple[str, ...],
        input_text: str | None,
        check: bool,
        timeout: float = 120,
    ) -> str:
        result = subprocess.run(
            [*base, *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(
                f"{Path(base[0]).name} {' '.join(args)} failed: {result.stderr.strip()}"
            )
        return result.stdout if result.returncode == 0 else result.stderr
