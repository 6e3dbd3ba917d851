#!/usr/bin/env bash
# rehost local demo: a disk image holding a real ext4 filesystem is replicated by the real agent
# to the real replication server over TLS on 127.0.0.1:1500, and the replica is checked against
# the source (blake3 of the whole disk, fsck, the files inside).
set -euo pipefail
cd "$(dirname "$0")"
W=${REHOST_DEMO_DIR:-/tmp/rehost-demo}
PORT=${REHOST_DEMO_PORT:-1500}
ADMIN_PORT=${REHOST_DEMO_ADMIN_PORT:-1501}

step() { printf '\n== %s\n' "$*"; }

scripts/install-deps.sh

step "building rehost (release)"
cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
SERVER=("$BIN/rehost-server" --data-dir "$W/server" --admin "127.0.0.1:$ADMIN_PORT")

rm -rf "$W" && mkdir -p "$W/files/etc" "$W/files/var/www" "$W/files/data"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

step "creating a 256 MiB source disk with an ext4 filesystem and files"
printf 'demo-host\n' > "$W/files/etc/hostname"
for i in $(seq 1 200); do printf 'page %s served by the source machine\n' "$i" > "$W/files/var/www/page-$i.html"; done
head -c $((24 << 20)) /dev/urandom > "$W/files/data/random.bin"
seq 1 2000000 > "$W/files/data/numbers.txt"
mkfs.ext4 -q -F -L demo-root -d "$W/files" "$W/source.img" 256M
echo "source: $W/source.img"

step "starting the replication server (agents: 127.0.0.1:$PORT, admin API: 127.0.0.1:$ADMIN_PORT)"
"${SERVER[@]}" serve --listen "127.0.0.1:$PORT" 2> "$W/server.log" &
pids+=($!)
for _ in $(seq 1 100); do "${SERVER[@]}" token list >/dev/null 2>&1 && break; sleep 0.1; done
"${SERVER[@]}" token list >/dev/null || { cat "$W/server.log"; exit 1; }

step "creating an install token"
TOKEN=$("${SERVER[@]}" token create --description demo)
echo "$TOKEN"

step "installing the agent against the image"
"$BIN/rehost-agent" install --server "127.0.0.1:$PORT" --token "$TOKEN" --devices "$W/source.img" \
  --no-prompt --no-service --hostname demo-host --state-dir "$W/agent"

step "running the agent; waiting for the initial sync"
"$BIN/rehost-agent" run --state-dir "$W/agent" 2> "$W/agent.log" &
pids+=($!)
for _ in $(seq 1 600); do
  if "${SERVER[@]}" machines --json | grep -q '"state": "continuous"'; then break; fi
  "${SERVER[@]}" machines | sed -n 3p
  sleep 0.5
done
"${SERVER[@]}" machines
# The agent refreshes its status file every second.
for _ in $(seq 1 50); do
  "$BIN/rehost-agent" status --json --state-dir "$W/agent" | grep -q '"state": "continuous"' && break
  sleep 0.2
done
"$BIN/rehost-agent" status --state-dir "$W/agent"

step "checking the replica"
REPLICA=$(ls "$W"/server/volumes/*/disk-*.vol)
SRC_SUM=$("$BIN/rehost-agent" checksum "$W/source.img" | cut -d' ' -f1)
DST_SUM=$("$BIN/rehost-agent" checksum "$REPLICA" | cut -d' ' -f1)
echo "source  blake3 $SRC_SUM"
echo "replica blake3 $DST_SUM  ($REPLICA)"
e2fsck -fn "$REPLICA" >/dev/null && echo "replica filesystem: e2fsck clean"
debugfs -R 'cat /etc/hostname' "$REPLICA" 2>/dev/null | sed 's/^/replica \/etc\/hostname: /'
if [ "$SRC_SUM" = "$DST_SUM" ]; then
  echo "OK: the replica's blake3 equals the source's"
else
  echo "FAILED: the replica differs from the source" >&2
  exit 1
fi

step "taking a recovery point while replication goes on, and exporting it"
printf 'changed after the initial sync\n' > "$W/files/etc/motd"
debugfs -w -R "write $W/files/etc/motd /etc/motd" "$W/source.img" >/dev/null 2>&1
POINT_SUM=$("$BIN/rehost-agent" checksum "$W/source.img" | cut -d' ' -f1)
"${SERVER[@]}" snapshot create demo-host --wait
"${SERVER[@]}" snapshots demo-host
"${SERVER[@]}" snapshot export demo-host latest --output "$W/point.img"
EXPORT_SUM=$("$BIN/rehost-agent" checksum "$W/point.img" | cut -d' ' -f1)
echo "source at the point blake3 $POINT_SUM"
echo "exported point      blake3 $EXPORT_SUM"
e2fsck -fn "$W/point.img" >/dev/null && echo "exported filesystem: e2fsck clean"
debugfs -R 'cat /etc/motd' "$W/point.img" 2>/dev/null | sed 's/^/exported \/etc\/motd: /'
"${SERVER[@]}" snapshot verify demo-host latest
"$BIN/rehost-converter" inspect "$W/point.img" || echo "(inspect: this demo image holds files, not an OS: the converter says what a bootable disk would need)"
if [ "$POINT_SUM" = "$EXPORT_SUM" ]; then
  echo "OK: the recovery point is byte-identical to the source at that point"
else
  echo "FAILED: the exported recovery point differs from the source" >&2
  exit 1
fi
