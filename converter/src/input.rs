//! Input image formats. Raw images (and block devices) are read as they are. qcow2, what
//! `rehost-server snapshot export --format qcow2` writes, is first converted to a temporary raw
//! image with `qemu-img convert -f qcow2 -O raw` (its progress shown on a terminal), which the
//! rest of the converter then reads like any raw input; the temporary file is removed at the end,
//! on an error and on SIGINT/SIGTERM. Other formats are recognised by their magic number and
//! refused with their name.
//!
//! Why a temporary raw copy rather than reading through `qemu-nbd`: NBD needs the kernel's `nbd`
//! module, which many hosts and containers do not have (this project's test machines among them),
//! and an NBD device would be one more kind of device to attach and release; the copy needs only
//! `qemu-img` and disk space for the image's data (holes stay holes), and the converter's loop
//! devices with offsets work on it unchanged. The format is never probed by qemu-img (`-f qcow2`
//! is given): a raw image whose first bytes happen to look like a header is not reinterpreted.

use crate::sys::{ChildGuard, TempFile};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Errors reading an input's format or converting it.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("read the start of {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("input {path} is {what}; convert it to raw or qcow2 first (e.g. `qemu-img convert -O raw {path} disk.raw`)")]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("input {path} is {what}; {hint}")]
    NotAnImage {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },
    #[error("create a temporary raw image in {0}")]
    Temp(PathBuf, #[source] std::io::Error),
    #[error("qemu-img is needed to read the qcow2 input {0} (install qemu-utils)")]
    NoQemuImg(PathBuf, #[source] std::io::Error),
    #[error(
        "convert the qcow2 input {input} to the temporary raw image {raw} with qemu-img: {msg}"
    )]
    Convert {
        input: PathBuf,
        raw: PathBuf,
        msg: String,
    },
}

impl InputError {
    /// The input is in a format the converter does not read (not a failure while reading it).
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            InputError::Unsupported { .. } | InputError::NotAnImage { .. }
        )
    }
}

/// The formats the converter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Qcow2,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2",
        }
    }
}

/// What the first bytes of an image say it is.
fn classify(head: &[u8]) -> Result<Kind, (&'static str, Option<&'static str>)> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = head
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(2 | 3) => Ok(Kind::Qcow2),
            _ => Err(("a QCOW version 1 image", None)),
        };
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        return Err(("a VMDK image", None));
    }
    if at(0, b"vhdxfile") {
        return Err(("a VHDX image", None));
    }
    if at(0, b"conectix") {
        return Err(("a VHD image", None));
    }
    if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        return Err(("a VDI image", None));
    }
    if at(0, b"QED\0") {
        return Err(("a QED image", None));
    }
    if at(0, b"LUKS\xba\xbe") {
        return Err((
            "a LUKS-encrypted volume, not a disk image",
            Some("give the whole disk image that contains it"),
        ));
    }
    for (magic, what) in [
        (&b"\x1f\x8b"[..], "a gzip-compressed file"),
        (b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
        (b"\xfd7zXZ\0", "an xz-compressed file"),
        (b"BZh", "a bzip2-compressed file"),
    ] {
        if at(0, magic) {
            return Err((what, Some("decompress it first")));
        }
    }
    Ok(Kind::Raw)
}

/// The format of the image at `path` (refused formats are an error naming them).
pub fn detect(path: &Path) -> Result<Kind, InputError> {
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| InputError::Read(path.to_path_buf(), e))?;
    classify(&head).map_err(|(what, hint)| match hint {
        None => InputError::Unsupported {
            path: path.to_path_buf(),
            what,
        },
        Some(hint) => InputError::NotAnImage {
            path: path.to_path_buf(),
            what,
            hint,
        },
    })
}

/// Raw paths for the inputs: the inputs themselves, or temporary raw copies of the qcow2 ones
/// (removed when this is dropped).
#[derive(Debug)]
pub struct Inputs {
    /// Raw image of each input, in order.
    pub raws: Vec<PathBuf>,
    /// The format each input was in.
    pub kinds: Vec<Kind>,
    _temps: Vec<TempFile>,
}

/// Make every input readable as raw: qcow2 inputs are converted to temporary raw images in
/// `temp_dir`; other formats are refused before anything is written.
pub fn prepare(images: &[PathBuf], temp_dir: &Path) -> Result<Inputs, InputError> {
    let kinds = images
        .iter()
        .map(|p| detect(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Inputs {
        raws: Vec::new(),
        kinds: kinds.clone(),
        _temps: Vec::new(),
    };
    for (img, kind) in images.iter().zip(kinds) {
        match kind {
            Kind::Raw => out.raws.push(img.clone()),
            Kind::Qcow2 => {
                std::fs::create_dir_all(temp_dir)
                    .map_err(|e| InputError::Temp(temp_dir.to_path_buf(), e))?;
                let (fd, raw) =
                    nix::unistd::mkstemp(&temp_dir.join("rehost-converter-input.XXXXXX"))
                        .map_err(|e| InputError::Temp(temp_dir.to_path_buf(), e.into()))?;
                drop(fd);
                let temp = TempFile::new(raw);
                qcow2_to_raw(img, &temp.path)?;
                out.raws.push(temp.path.clone());
                out._temps.push(temp);
            }
        }
    }
    Ok(out)
}

/// After an inspection of `inputs.raws`: name each disk by the input the user gave, with its format.
pub fn name_disks(ins: &mut crate::inspect::Inspection, images: &[PathBuf], inputs: &Inputs) {
    for ((d, img), kind) in ins.disks.iter_mut().zip(images).zip(&inputs.kinds) {
        d.path = img.display().to_string();
        d.format = kind.name();
    }
}

/// `qemu-img convert -f qcow2 -O raw`, with qemu-img's progress meter on a terminal.
fn qcow2_to_raw(input: &Path, raw: &Path) -> Result<(), InputError> {
    crate::progress::step(&format!(
        "converting the qcow2 input {} to a temporary raw image {}",
        input.display(),
        raw.display()
    ));
    let started = Instant::now();
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "qcow2", "-O", "raw"]);
    let terminal = crate::progress::stderr_is_terminal();
    if terminal {
        // qemu-img draws its meter on stdout: send it to our stderr (stdout is for results).
        use std::os::fd::AsFd;
        cmd.arg("-p").stdout(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
    } else {
        cmd.stdout(Stdio::null());
    }
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .arg(input)
        .arg(raw)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InputError::NoQemuImg(input.to_path_buf(), e))?;
    let _guard = ChildGuard::new(child.id());
    let out = child
        .wait_with_output()
        .map_err(|e| InputError::NoQemuImg(input.to_path_buf(), e))?;
    if !out.status.success() {
        return Err(InputError::Convert {
            input: input.to_path_buf(),
            raw: raw.to_path_buf(),
            msg: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    if terminal {
        eprintln!();
    }
    crate::progress::note(&format!(
        "qcow2 input converted in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_magic() {
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        q.resize(512, 0);
        assert_eq!(classify(&q), Ok(Kind::Qcow2));
        q[7] = 1;
        assert_eq!(classify(&q).unwrap_err().0, "a QCOW version 1 image");
        assert_eq!(classify(b"KDMV\x01\0\0\0").unwrap_err().0, "a VMDK image");
        assert_eq!(
            classify(b"# Disk DescriptorFile\nversion=1").unwrap_err().0,
            "a VMDK image"
        );
        assert_eq!(classify(b"vhdxfile").unwrap_err().0, "a VHDX image");
        assert_eq!(classify(b"conectix").unwrap_err().0, "a VHD image");
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(classify(&vdi).unwrap_err().0, "a VDI image");
        assert_eq!(
            classify(b"\x1f\x8b\x08").unwrap_err(),
            ("a gzip-compressed file", Some("decompress it first"))
        );
        // An MBR, a GPT disk, an empty or tiny file: raw.
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(classify(&mbr), Ok(Kind::Raw));
        assert_eq!(classify(b""), Ok(Kind::Raw));
        assert_eq!(classify(b"QF"), Ok(Kind::Raw));
    }
}
