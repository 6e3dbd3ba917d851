#!/usr/bin/env bash
# Loop-device churn, to run beside the test suite: every second, attach a loop device over a small
# file of its own, read its first blocks (as a prober such as udev's blkid would), and detach it, so
# that loop numbers are taken and released while the tests attach theirs. Runs until killed
# (Ctrl-C or SIGTERM) and then detaches its device and removes its file. Needs root.
#
#   scripts/loop-stress.sh [INTERVAL_SECONDS]   (default 1)
set -euo pipefail
INTERVAL=${1:-1}
[ "$(id -u)" = 0 ] || { echo "loop-stress.sh needs root (losetup)" >&2; exit 1; }
DIR=$(mktemp -d /var/tmp/loop-stress.XXXXXX)
FILE=$DIR/disk.img
truncate -s 16M "$FILE"
DEV=""
cleanup() {
    set +e
    [ -n "$DEV" ] && losetup -d "$DEV"
    rm -rf "$DIR"
    echo "loop-stress: stopped after $N cycles" >&2
}
N=0
trap cleanup EXIT
trap 'exit 0' INT TERM HUP
echo "loop-stress: attaching and detaching a loop device over $FILE every $INTERVAL s (pid $$)" >&2
while true; do
    DEV=$(losetup --find --show "$FILE")
    dd if="$DEV" of=/dev/null bs=64k count=4 status=none || true
    losetup -d "$DEV"
    DEV=""
    N=$((N + 1))
    sleep "$INTERVAL" & wait $!
done
