"""The local Kubernetes cluster harness: real control-plane binaries built from Go
modules, kwok playing the kubelets of fake GPU nodes, all on loopback.

`python -m harness up|down|status` (with `tests/e2e` on the path) is what
`make cluster-up` and `make cluster-down` run; the pytest fixtures use the same code.
"""
