#!/usr/bin/env bash
# Runs every rehost test: unit and property tests, and the end-to-end tests that start the real
# binaries. As root it first installs the Debian packages the system tests use; tests that need
# root skip with a message when run as another user, and fail instead when CI=true.
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh

# The end-to-end tests start the real binaries, which `cargo test` alone does not build; building
# every target builds them with the features the tests enable (failpoints in rehost-server).
cargo build --workspace --all-targets
cargo test --workspace "$@"
