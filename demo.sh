#!/usr/bin/env bash
# rehost local demo, the whole path of a migration:
#  1. a bootable Debian disk, configured as on a Xen host (root on /dev/xvda1, static IP on a
#     MAC-bound eth0), is attached as a loop device with its root filesystem mounted;
#  2. the real agent replicates it over TLS to the real server on 127.0.0.1:1500 (the kernel's
#     block tracepoints find every write); the replica is checked byte for byte;
#  3. a recovery point is taken (the agent freezes the filesystem for it) and verified;
#  4. a test launch exports it, converts it for KVM/virtio with rehost-converter, starts it under
#     QEMU and waits for it to boot; replication goes on;
#  5. a file is written on the source, and the cutover takes a final consistency point, boots
#     the target from it (the file is there), and stops replication.
# Its data (about 3 GB) goes to $REHOST_DEMO_DIR (default /var/tmp/rehost-demo); it is removed when
# the demo succeeds, unless `./demo.sh --keep` or REHOST_DEMO_KEEP=1; a failed run keeps it.
set -euo pipefail
cd "$(dirname "$0")"
KEEP=${REHOST_DEMO_KEEP:-0}
for a in "$@"; do
  case "$a" in
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument $a (only --keep)" >&2; exit 2 ;;
  esac
done
W=${REHOST_DEMO_DIR:-/var/tmp/rehost-demo}
PORT=${REHOST_DEMO_PORT:-1500}
ADMIN_PORT=${REHOST_DEMO_ADMIN_PORT:-1501}

step() { printf '\n== %s\n' "$*"; }
# add_partitions / remove_partitions: partx with retries (see the file for why).
source scripts/partitions.sh

[ "$(id -u)" = 0 ] || { echo "demo.sh needs root (loop devices, mount, tracefs, the converter)" >&2; exit 1; }
scripts/install-deps.sh

step "building rehost (release)"
cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
SERVER=("$BIN/rehost-server" --data-dir "$W/server" --admin "127.0.0.1:$ADMIN_PORT")

step "building the source disk: Debian bookworm as on a Xen host (cached after the first run)"
FIXTURE=$(converter/fixtures/build-debian-image.sh xen)

pids=()
LOOP=""
DONE=0
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  for pf in "$W"/targets/*/*/qemu.pid; do [ -f "$pf" ] && kill "$(cat "$pf")" 2>/dev/null; done
  mountpoint -q "$W/mnt" && umount "$W/mnt"
  if [ -n "$LOOP" ]; then remove_partitions "$LOOP"; losetup -d "$LOOP"; fi
  # Only the demo machine's kernel trace instances: other agents on this host keep theirs.
  local mid
  mid=$(sed -n 's/.*"machine_id": *"\(m-[0-9a-f]*\)".*/\1/p' "$W/agent/agent.json" 2>/dev/null | head -n 1)
  for t in /sys/kernel/tracing/instances/rehost-"$mid"-*; do
    [ -n "$mid" ] && [ -d "$t" ] || continue
    echo 0 > "$t/events/block/block_rq_complete/enable" 2>/dev/null; rmdir "$t" 2>/dev/null
  done
}
finish() {
  cleanup
  if [ "$DONE" = 1 ] && [ "$KEEP" != 1 ]; then
    rm -rf "$W"
    echo "removed the demo's data in $W (./demo.sh --keep or REHOST_DEMO_KEEP=1 keeps it)"
  elif [ -d "$W" ]; then
    echo "the demo's data is in $W ($(du -sh "$W" 2>/dev/null | cut -f1); logs: server.log, agent.log); rm -rf $W removes it"
  fi
}
trap finish EXIT
cleanup
rm -rf "$W" && mkdir -p "$W/mnt"
cp --sparse=always "$FIXTURE" "$W/source.img"
LOOP=$(losetup -f --show "$W/source.img")
add_partitions "$LOOP"
mount "${LOOP}p1" "$W/mnt"
echo "source disk: $LOOP ($(du -h --apparent-size "$W/source.img" | cut -f1), root filesystem mounted on $W/mnt)"
grep -v '^#' "$W/mnt/etc/fstab" | sed 's/^/  fstab: /'

step "starting the replication server (agents: 127.0.0.1:$PORT, admin API: 127.0.0.1:$ADMIN_PORT)"
"${SERVER[@]}" serve --listen "127.0.0.1:$PORT" 2> "$W/server.log" &
pids+=($!)
for _ in $(seq 1 100); do "${SERVER[@]}" token list >/dev/null 2>&1 && break; sleep 0.1; done
"${SERVER[@]}" token list >/dev/null || { cat "$W/server.log"; exit 1; }

step "creating an install token, installing the agent for $LOOP"
TOKEN=$("${SERVER[@]}" token create --description demo)
"$BIN/rehost-agent" install --server "127.0.0.1:$PORT" --token "$TOKEN" --devices "$LOOP" \
  --no-prompt --no-service --hostname demo-web --state-dir "$W/agent"

step "running the agent; initial sync"
"$BIN/rehost-agent" run --state-dir "$W/agent" 2> "$W/agent.log" &
pids+=($!)
for _ in $(seq 1 1200); do
  if "${SERVER[@]}" machines --json | grep -q '"state": "continuous"'; then break; fi
  "${SERVER[@]}" machines | sed -n 3p
  sleep 1
done
"${SERVER[@]}" machines

step "checking the replica while the source is idle"
sync
for _ in $(seq 1 100); do
  SRC_SUM=$(blockdev --flushbufs "$LOOP"; "$BIN/rehost-agent" checksum "$LOOP" | cut -d' ' -f1)
  DST_SUM=$("$BIN/rehost-agent" checksum "$W"/server/volumes/*/disk-*.vol | cut -d' ' -f1)
  [ "$SRC_SUM" = "$DST_SUM" ] && break
  sleep 0.5
done
echo "source  blake3 $SRC_SUM"
echo "replica blake3 $DST_SUM"
[ "$SRC_SUM" = "$DST_SUM" ] || { echo "FAILED: the replica differs from the source" >&2; exit 1; }
echo "OK: the replica is byte-identical to the source"

step "target settings (blueprint): QEMU under TCG, user networking (isolated), raw image"
"${SERVER[@]}" blueprint set demo-web --launch qemu --accel tcg --cpus 1 --memory 1024 --format raw \
  --network user --target-dir "$W/targets"

step "a recovery point (the agent freezes the filesystem for it), verified"
"${SERVER[@]}" snapshot create demo-web --wait
"${SERVER[@]}" snapshots demo-web
"${SERVER[@]}" snapshot verify demo-web latest

step "test launch from the latest recovery point (export, convert, boot); replication goes on"
"${SERVER[@]}" launch demo-web --mode test --wait
"${SERVER[@]}" machines | head -1

step "a file written on the source after the test"
echo "written on the source at $(date -u +%FT%TZ), before the cutover" > "$W/mnt/root/cutover-proof.txt"
sync -f "$W/mnt/root/cutover-proof.txt"
cat "$W/mnt/root/cutover-proof.txt"

step "cutover: final consistency point, convert, boot; replication of the machine stops"
"${SERVER[@]}" mark demo-web ready-for-cutover
START=$(date +%s.%N)
"${SERVER[@]}" launch demo-web --mode cutover --wait
END=$(date +%s.%N)
printf 'cutover took %.1f s from the command to the boot marker\n' "$(echo "$END - $START" | bc 2>/dev/null || python3 -c "print($END - $START)")"

step "where things stand"
"${SERVER[@]}" machines
"${SERVER[@]}" jobs
"${SERVER[@]}" machine history demo-web
TARGET=$("${SERVER[@]}" jobs --json | python3 -c 'import json,sys; print([j for j in json.load(sys.stdin)["jobs"] if j["mode"]=="cutover"][-1]["target_dir"])')
IMG="$TARGET/demo-web.raw"
START_SECTOR=$(partx -g -o START -n 1 "$IMG" | tr -d ' ')
PART=$(losetup -f --show -r -o $((START_SECTOR * 512)) "$IMG")
echo "in the cutover target $IMG:"
debugfs -c -R 'cat /root/cutover-proof.txt' "$PART" 2>/dev/null | sed 's/^/  \/root\/cutover-proof.txt: /'
debugfs -c -R 'cat /etc/fstab' "$PART" 2>/dev/null | grep -v '^#' | sed 's/^/  fstab: /'
losetup -d "$PART"
echo "serial console of the target ($TARGET/serial.log), last lines:"
tail -n 6 "$TARGET/serial.log" | sed 's/^/  /'
echo
echo "OK: the source was replicated, tested and cut over; the target VM boots on KVM/virtio."
if [ "$KEEP" = 1 ]; then
  echo "(the demo stops the target VM on exit; $TARGET/qemu.sh starts it again)"
fi
DONE=1
