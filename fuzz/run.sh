#!/usr/bin/env bash
# Builds the fuzz targets and runs each for SECONDS_PER_TARGET (default 60), one after another, each
# with one libFuzzer worker. Prints one line per target: executions, executions per second, corpus
# size, crashes (crash/panic, OOM, timeout) found. Not run in CI.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      targets: frame token bitmap lvm partition fstab grub
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags (-Zsanitizer=address):
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Inputs that crash are kept in
# fuzz/artifacts/<target>/ (reproduce: `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>`); the
# corpus grows in fuzz/corpus/<target>/, seeded from fuzz/seeds/<target>/ (see gen-seeds.sh).
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

SECS=60
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    SECS=$1
    shift
fi
ALL=(frame token bitmap lvm partition fstab grub)
if [[ $# -gt 0 ]]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi
for t in "${TARGETS[@]}"; do
    [[ " ${ALL[*]} " == *" $t "* ]] || { echo "run.sh: unknown target '$t' (targets: ${ALL[*]})" >&2; exit 2; }
done
cargo fuzz --version >/dev/null 2>&1 || { echo "run.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }

# Release build with debug assertions (integer overflow panics) and AddressSanitizer.
echo "run.sh: building ${TARGETS[*]}" >&2
for t in "${TARGETS[@]}"; do
    cargo fuzz build --debug-assertions "$t" 2>&1 | grep -v '^\s*Compiling' >&2 || { echo "run.sh: build of $t failed" >&2; exit 1; }
done

status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t" logs
    log="logs/$t.log"
    touch "logs/$t.start"
    echo "run.sh: $t for ${SECS}s (log: fuzz/$log)" >&2
    # -jobs=1 -workers=1: one worker process; libFuzzer writes its output to fuzz-0.log in the
    # current directory, so run from logs/ and keep that as the target's log.
    rm -f logs/fuzz-0.log
    (cd logs && cargo fuzz run --fuzz-dir .. --debug-assertions "$t" "../corpus/$t" "../seeds/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -jobs=1 -workers=1 \
        -print_final_stats=1 -artifact_prefix="../artifacts/$t/" >/dev/null 2>&1) || true
    mv -f logs/fuzz-0.log "$log" 2>/dev/null || true
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    # A run that stopped on a crash prints no final stats: take its last status line.
    [[ -n $execs && $execs != 0 ]] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    [[ -n $rate ]] || rate=$(grep -o 'exec/s: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
    corp=$(grep -o 'corp: [0-9]*/[0-9a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2 || echo "?")
    new=$(find "artifacts/$t" -type f -newer "logs/$t.start" | sort)
    found=$(printf '%s' "$new" | grep -c . || true)
    line="$t: ${execs:-0} executions (${rate:-0}/s), corpus ${corp:-?} (inputs/bytes), crashes found: $found"
    if [[ $found -gt 0 ]]; then
        status=1
        line+=" -> $(echo $new)"
        line+="; $(grep -m1 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|deadly signal' "$log" || true)"
    fi
    echo "$line"
done
exit $status
