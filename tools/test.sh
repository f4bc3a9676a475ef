#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set everything up, then run the
# formatting and lint gates and the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_tools
setup_libtorch
cd "$repo"
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
step "cargo test"
cargo test --locked --workspace --no-fail-fast
