#!/usr/bin/env bash
# Builds the local cluster's binaries from pinned Go modules into a cache outside the
# repository ($CITADEL_CACHE/bin, default ~/.cache/citadel/bin). Each binary is built
# in a throw-away wrapper module of its own, because kubernetes, helm, kwok and etcd
# pin different versions of the same libraries. A stamp per binary records what it
# was built from, so a second run rebuilds nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
cache=${CITADEL_CACHE:-$HOME/.cache/citadel}
bin=$cache/bin
src=$cache/src
mkdir -p "$bin" "$src"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Each binary's stamp records what it was built from (module, version, flags), so
# changing one pin rebuilds that binary alone.
# up_to_date NAME RECIPE: true when bin/NAME exists and was built from RECIPE.
up_to_date() { [[ -x $bin/$1 && -f $bin/.$1.stamp && $(cat "$bin/.$1.stamp") == "$2" ]]; }
mark_built() { echo "$2" >"$bin/.$1.stamp"; }

# wrapper DIR MODULE VERSION [REPLACES...]: a module that requires MODULE@VERSION.
wrapper() {
  local dir=$1 module=$2 version=$3
  shift 3
  rm -rf "$dir" && mkdir -p "$dir"
  {
    echo "module citadel.local/build/$(basename "$dir")"
    echo "go 1.26.0"
    echo "require $module $version"
    for r in "$@"; do echo "replace $r"; done
  } >"$dir/go.mod"
}

build_kubernetes() {
  local names=(kube-apiserver kube-controller-manager kube-scheduler kubectl) missing=()
  local recipe="k8s.io/kubernetes@$KUBERNETES_VERSION stamped"
  for n in "${names[@]}"; do up_to_date "$n" "$recipe" || missing+=("$n"); done
  ((${#missing[@]})) || { log "kubernetes $KUBERNETES_VERSION: cached"; return; }
  local dir=$src/kubernetes start=$SECONDS
  # The staging modules are `replace`d by relative paths in kubernetes' own go.mod;
  # derive the matching published v0.x for each from that go.mod instead of typing them.
  local staging_version=v0.${KUBERNETES_VERSION#v1.}
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local replaces=()
  while read -r mod; do
    # Only modules kubernetes requires need a replacement; some staging modules
    # (sample-cli-plugin) are never published.
    if grep -qE "^\s+$mod v0\.0\.0" "$gomod"; then replaces+=("$mod => $mod $staging_version"); fi
  done < <(sed -nE 's#^\s+(k8s\.io/[a-z0-9-]+) => \./staging/.*#\1#p' "$gomod")
  wrapper "$dir" k8s.io/kubernetes "$KUBERNETES_VERSION" "${replaces[@]}"
  local major=${KUBERNETES_VERSION#v}; major=${major%%.*}
  local minor=${KUBERNETES_VERSION#v*.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major"
    ldflags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  log "kubernetes $KUBERNETES_VERSION: building ${missing[*]} (cold builds take tens of minutes on 2 cores)"
  (
    cd "$dir"
    go get "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null
    for n in "${missing[@]}"; do
      local t=$SECONDS
      go build -trimpath -ldflags "$ldflags" -o "$bin/$n" "k8s.io/kubernetes/cmd/$n"
      log "  $n built in $((SECONDS - t))s"
    done
  )
  for n in "${missing[@]}"; do mark_built "$n" "$recipe"; done
  log "kubernetes: done in $((SECONDS - start))s"
}

# build_simple NAME MODULE VERSION PACKAGE LDFLAGS
build_simple() {
  local name=$1 module=$2 version=$3 package=$4 ldflags=$5
  local recipe="$module@$version $ldflags"
  up_to_date "$name" "$recipe" && { log "$name $version: cached"; return; }
  local dir=$src/$name start=$SECONDS
  log "$name $version: building"
  wrapper "$dir" "$module" "$version"
  (cd "$dir" && go get "$module@$version" >/dev/null && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name" "$package")
  mark_built "$name" "$recipe"
  log "$name: done in $((SECONDS - start))s"
}

build_etcd() {
  build_simple etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 ""
}

build_helm() {
  # Like Helm's own Makefile: the Kubernetes version `helm lint` and `helm template`
  # assume without a cluster is that of the client-go Helm is built with.
  local client_go minor flags
  client_go=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])' \
    | xargs sed -nE 's#^\s+k8s\.io/client-go v0\.([0-9]+)\..*#\1#p')
  minor=${client_go:?cannot read client-go from helm go.mod}
  flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  build_simple helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$flags"
}

build_kwok() {
  build_simple kwok sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
}

(($# > 0)) || set -- etcd helm kwok kubernetes
for part in "$@"; do "build_$part"; done
