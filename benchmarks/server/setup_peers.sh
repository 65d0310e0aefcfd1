#!/usr/bin/env bash
# Opt-in: create the peer servers' virtual environments for benchmarks/server/bench_server.py.
#
#   .venv-pytriton   nvidia-pytriton (a real Triton server; needs numpy < 2) + onnxruntime
#   .venv-litserve   litserve + onnxruntime
#
# Both live in the repository root (git-ignored) and are never touched by `make test`.
# Also installs wrk (Debian package) when it is missing and we are root.
# Usage: benchmarks/server/setup_peers.sh [pytriton|litserve|wrk ...]   (default: all three)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
# The same onnxruntime as the project's .venv when there is one, so every server runs the same kernels.
if [[ -z "${ORT:-}" ]]; then
  ORT="onnxruntime>=1.18"
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    v="$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))' 2>/dev/null || true)"
    if [[ -n "$v" ]]; then ORT="onnxruntime==$v"; fi
  fi
fi

make_venv() {  # make_venv DIR PACKAGES...: skipped when DIR/.bench-peer already lists the same packages
  local dir="$ROOT/$1"
  shift
  local stamp="$dir/.bench-peer"
  if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$*" ]]; then
    echo "up to date: $dir ($*)"
    return
  fi
  if [[ ! -x "$dir/bin/python" ]]; then
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
  fi
  "$dir/bin/python" -m pip install -q "$@"
  echo "$*" > "$stamp"
  echo "ready: $dir ($*)"
}

want=("$@")
if [[ ${#want[@]} -eq 0 ]]; then want=(wrk pytriton litserve); fi

for what in "${want[@]}"; do
  case "$what" in
    wrk)
      if ! command -v wrk >/dev/null; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
          apt-get update -q && apt-get install -y -q wrk
        else
          echo "wrk is missing: install the Debian/Ubuntu package 'wrk' (apt-get install wrk)" >&2
        fi
      fi
      ;;
    pytriton) make_venv .venv-pytriton "nvidia-pytriton==0.7.0" "numpy<2" "$ORT" ;;
    litserve) make_venv .venv-litserve "litserve==0.2.19" "$ORT" ;;
    *) echo "unknown peer: $what (pytriton, litserve or wrk)" >&2; exit 2 ;;
  esac
done
