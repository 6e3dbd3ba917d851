#!/usr/bin/env bash
# Runs every rehost test: unit and property tests, and the end-to-end tests that start the real
# binaries. As root it first installs the Debian packages the system tests use; tests that need
# root skip with a message when run as another user, and fail instead when CI=true.
# Every test binary runs even when one fails (--no-fail-fast); the output is shown as it comes and
# ends with one line of passed/failed/ignored across the workspace. Exits non-zero if anything
# failed (a test, a test binary that could not run, or the build).
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh

# The end-to-end tests start the real binaries, which `cargo test` alone does not build; building
# every target builds them with the features the tests enable (failpoints in rehost-server).
cargo build --workspace --all-targets

LOG=$(mktemp "${TMPDIR:-/tmp}/rehost-test.XXXXXX")
trap 'rm -f "$LOG"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$LOG" || status=$?

# cargo prints one "test result: ok. 3 passed; 0 failed; 1 ignored; ..." line per test binary.
read -r passed failed ignored binaries < <(awk '
    /^test result: / {
        n++
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) p += $(i - 1)
            if ($(i) ~ /^failed;?$/) f += $(i - 1)
            if ($(i) ~ /^ignored;?$/) g += $(i - 1)
        }
    }
    END { printf "%d %d %d %d\n", p, f, g, n }' "$LOG")
# With --no-fail-fast cargo ends with "error: test failed, to rerun pass ..." (one failed test
# binary) or "error: N targets failed:" (several), counting binaries that crashed or were killed
# before printing a result line too.
bad=$(awk '/^error: test failed, to rerun pass/ { n = 1 } /^error: [0-9]+ targets failed/ { n = $2 } END { print n + 0 }' "$LOG")
summary="test.sh: $passed passed, $failed failed, $ignored ignored ($binaries test binaries reported"
[ "$bad" -gt 0 ] && summary="$summary; $bad test binaries failed, listed by cargo above"
[ "$status" -ne 0 ] && [ "$bad" -eq 0 ] && summary="$summary; cargo test exited with $status"
echo "$summary)"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
