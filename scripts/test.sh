#!/usr/bin/env bash
# Sets up (packages, guest images, release vmm) and runs every test: unit tests and end-to-end tests
# that boot real guests under /dev/kvm. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
export VMM_BIN="$PWD/target/release/vmm"
cargo test --release --workspace "$@"
