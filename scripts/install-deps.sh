#!/usr/bin/env bash
# Installs the Debian packages rehost's demo and tests use, when they are missing (as root):
# filesystem tools (ext4, btrfs, xfs, LVM2), debootstrap for the converter's fixture images, QEMU for boot
# checks, libvirt (its daemon and virt-xml-validate) for the launch method `libvirt`, prometheus
# for `promtool check metrics` on the /metrics page, and systemd for `systemd-analyze` on the
# agent's unit.
# QEMU comes from <codename>-backports: the machine's qemu-utils is from there, so the plain
# suite's qemu-system-x86 would conflict. The backports source reuses the machine's own mirror.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: not root; skipping package installation (tests that need root will skip)" >&2
  exit 0
fi

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have mkfs.ext4 && have debugfs && have e2fsck || need+=(e2fsprogs)
have debootstrap || need+=(debootstrap)
have sfdisk || need+=(fdisk)
have mkfs.btrfs || need+=(btrfs-progs)
have mkfs.xfs || need+=(xfsprogs)
have pvcreate && have lvcreate || need+=(lvm2)
have zstd || need+=(zstd)
have xz || need+=(xz-utils)
have pgrep || need+=(procps)
have losetup && have partx && have blockdev || need+=(util-linux)
have qemu-img || need+=(qemu-utils)
have virt-xml-validate && have xmllint || need+=(libvirt-clients libxml2-utils)
have libvirtd || need+=(libvirt-daemon-system)
have promtool || need+=(prometheus)
have systemd-analyze || need+=(systemd)
have fsfreeze || need+=(util-linux)
qemu=()
have qemu-system-x86_64 || qemu=(qemu-system-x86)

if [ ${#need[@]} -eq 0 ] && [ ${#qemu[@]} -eq 0 ]; then
  exit 0
fi

if [ ${#qemu[@]} -gt 0 ]; then
  . /etc/os-release
  suite="${VERSION_CODENAME}-backports"
  if ! grep -rqs "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    echo "install-deps: adding $suite from $uri"
    cat > /etc/apt/sources.list.d/rehost-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
fi

echo "install-deps: installing ${need[*]} ${qemu[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ${#qemu[@]} -gt 0 ]; then
  . /etc/os-release
  apt-get install -y -qq --no-install-recommends -t "${VERSION_CODENAME}-backports" "${qemu[@]}" >/dev/null
fi
