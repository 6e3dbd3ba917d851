//! rehost-converter: makes a replicated Linux boot disk boot on KVM with virtio, and proves it by booting.
//!
//! Modules:
//! - [`partition`]: MBR/GPT parsing with strict bounds checks (the host kernel may have no parser).
//! - [`fsprobe`]: filesystem type/UUID/label from superblocks (ext2/3/4, xfs, btrfs, vfat, swap, LUKS, LVM).
//! - [`lvm`]: LVM2 labels and metadata read in userspace; linear logical volumes located on their PV
//!   (its parts: the on-disk label and metadata areas, the metadata text parser, the volume group,
//!   the placement of a logical volume).
//! - [`devmap`]: source device names (`/dev/xvda1`, `/dev/sda2`, `LABEL=`...) to the volumes found.
//! - [`guestfs`]: safe file access inside a mounted guest (`openat2(RESOLVE_IN_ROOT)`, capped reads).
//! - [`fstab`], [`grub`], [`network`]: pure text rewriters (and the guest passes that use them).
//! - [`initramfs`]: which modules an initramfs carries (newc cpio parser, host decompressors).
//! - [`inspect`]: the inspection (its parts: the disks' partitions, filesystems and LVM volumes; the
//!   guest session, loop devices and mounts of the root and /boot; the OS and its kernels; the
//!   human summary).
//! - [`convert`]: the conversion pipeline; [`report`]: the JSON report and human summary.
//! - [`error`]: an error with its sources as one line (for logs).
//! - [`input`]: input formats (raw; qcow2 through a temporary raw copy; others refused by name).
//! - [`progress`]: a line on stderr per step as it starts.
//! - [`image`]: sparse copy and qcow2 output; [`bootcheck`]: QEMU boot proof on the serial console.
//! - [`manifest`]: content manifest of an image, the definition of "same output".
//! - [`sys`]: loop/mount/child guards, the cleanup registry and the SIGINT/SIGTERM handler.

pub mod bootcheck;
pub mod convert;
pub mod devmap;
pub mod error;
pub mod fsprobe;
pub mod fstab;
pub mod grub;
pub mod guestfs;
pub mod image;
pub mod initramfs;
pub mod input;
pub mod inspect;
pub mod lvm;
pub mod manifest;
pub mod network;
pub mod partition;
pub mod progress;
pub mod report;
pub mod sys;
