#!/usr/bin/env bash
# README command 1: set everything up and run the embedded default recipe
# (recipes/mini.toml on synthetic phantom data). Extra args go to `pipeline run`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_tools
setup_libtorch
step "building pipeline (release)"
cargo build --release --locked --bin pipeline
cd "$repo"
step "pipeline run recipes/mini.toml $*"
exec "$CARGO_TARGET_DIR/release/pipeline" run recipes/mini.toml "$@"
