# Partition nodes of a whole-disk loop device, sourced by demo.sh and the converter's fixture
# builder (they mount a partition of the disk and, for GRUB, need the whole disk too).
#
# A bare `partx -a` fails ("error adding partition N", EBUSY from BLKPG_ADD_PARTITION) when the
# loop number was recycled with stale partitions: a loop device attached without partition
# scanning keeps BLKPG-added partitions after it is detached, and `partx -d` of a partition that
# someone holds open at that moment (a prober such as blkid, a lazily unmounted filesystem) fails
# with EBUSY. So: `partx -u` (drops partitions that are not in the table, adds the others) until the
# kernel's view equals the table, each failure shown, at most 50 times 0.2 s; and removal retries
# `partx -d` until no partition of the device is left.

# "NR START SECTORS" lines of the kernel's partitions of $1.
kernel_partitions() {
    local name=${1#/dev/} p
    for p in /sys/block/"$name"/"$name"p*; do
        [ -e "$p/start" ] || continue
        echo "${p##*p} $(cat "$p/start") $(cat "$p/size")"
    done | sort -n
}

# "NR START SECTORS" lines of the partition table of $1.
table_partitions() {
    partx -g -o NR,START,SECTORS "$1" | awk '{print $1, $2, $3}' | sort -n
}

add_partitions() {
    local want i err
    want=$(table_partitions "$1")
    for i in $(seq 1 50); do
        err=$(partx -u "$1" 2>&1) || true
        [ "$(kernel_partitions "$1")" = "$want" ] && return 0
        echo "partx -u $1: ${err:-kernel view differs from the table}; retrying" >&2
        sleep 0.2
    done
    echo "the kernel does not take the partitions of $1 (a partition node still open by another process?)" >&2
    return 1
}

remove_partitions() {
    local i err
    for i in $(seq 1 50); do
        [ -z "$(kernel_partitions "$1")" ] && return 0
        err=$(partx -d "$1" 2>&1) || true
        [ -z "$(kernel_partitions "$1")" ] && return 0
        echo "partx -d $1: $err; retrying" >&2
        sleep 0.2
    done
    echo "partitions of $1 still in the kernel (busy): $(kernel_partitions "$1" | tr '\n' ' ')" >&2
    return 1
}
