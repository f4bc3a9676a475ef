#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set everything up, then run the
# formatting and lint gates and the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_tools
setup_libtorch
cd "$repo"
step "cargo fmt --check"
cargo fmt --all -- --check
step "no import cycles between modules"
python3 "$repo/tools/check_module_cycles.py"
step "cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
# The NCCL collective (data-parallel training on CUDA) is behind a feature:
# keep it compiling and lint-clean without a GPU (cudarc loads libnccl at run time).
step "cargo clippy --features nccl -D warnings"
cargo clippy --locked -p stages-train --features nccl -- -D warnings
step "single-node Slurm cluster (for tests/slurm_e2e.rs)"
slurm_rc=0
bash "$repo/tools/setup-slurm.sh" || slurm_rc=$?
if [ "$slurm_rc" -eq 3 ]; then
  echo "Slurm cannot start here (reason above): tests/slurm_e2e.rs will skip, or fail under CI as root" >&2
elif [ "$slurm_rc" -ne 0 ]; then
  exit "$slurm_rc"
fi
step "cargo test"
cargo test --locked --workspace --no-fail-fast
