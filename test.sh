#!/usr/bin/env bash
# Runs every rehost test: unit and property tests, and the end-to-end tests that start the real
# binaries. As root it first installs the Debian packages the system tests use; tests that need
# root skip with a message when run as another user, and fail instead when CI=true.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v debugfs >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing ${need[*]} (run as root to install them)" >&2
  fi
fi

# The end-to-end tests start the real binaries, which `cargo test` alone does not build; building
# every target builds them with the features the tests enable (failpoints in rehost-server).
cargo build --workspace --all-targets
cargo test --workspace "$@"
