#!/usr/bin/env bash
# Installs the peers the gateway is measured against, each in its own venv under
# $CITADEL_CACHE/bench (never in the repository, never in .venv), pinned.
# A second run does nothing (a stamp records each peer's requirements). A peer that
# fails to install is reported in $CITADEL_CACHE/bench/<peer>.failed and the
# benchmark measures the others.
set -u -o pipefail
CACHE="${CITADEL_CACHE:-$HOME/.cache/citadel}/bench"
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE"

install_peer() {  # name, pip requirement...
  local name="$1"; shift
  local venv="$CACHE/$name"
  local key
  key="$(echo "$*" | sha256sum | cut -c1-16)"
  if [[ -f "$venv/.installed-$key" ]]; then return 0; fi
  rm -rf "$venv" "$CACHE/$name.failed"
  echo "bench: installing $name ($*) into $venv" >&2
  if "$PYTHON" -m venv "$venv" \
      && "$venv/bin/pip" install -q --upgrade pip \
      && "$venv/bin/pip" install -q "$@" >"$CACHE/$name.log" 2>&1; then
    touch "$venv/.installed-$key"
  else
    echo "bench: $name did not install; see $CACHE/$name.log" >&2
    tail -20 "$CACHE/$name.log" >"$CACHE/$name.failed" 2>/dev/null || true
  fi
}

install_peer vllm-router "vllm-router==0.1.17"
# litellm 1.110.2 and 1.108.14 (the newest) need litellm-proxy /
# litellm-proxy-extras versions that the registry does not serve; 1.100.5 is the
# newest whose [proxy] extra resolves.
install_peer litellm "litellm[proxy]==1.100.5"
exit 0
