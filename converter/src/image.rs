//! Image files: sparse copy of an input (the input is only ever read), and raw -> qcow2 output.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// Errors handling image files.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("copy {from} to {to}")]
    Copy {
        from: String,
        to: String,
        source: io::Error,
    },
    #[error("output {0} is the input itself")]
    SameFile(String),
    #[error("qemu-img convert to qcow2 failed: {0}")]
    Qcow2(String),
}

/// Refuse when `output` is the same file as `input` (also through links).
pub fn check_distinct(input: &Path, output: &Path) -> Result<(), ImageError> {
    if let (Ok(a), Ok(b)) = (std::fs::metadata(input), std::fs::metadata(output)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(ImageError::SameFile(output.display().to_string()));
        }
    }
    Ok(())
}

/// Copy `from` to `to`, keeping holes: only the data extents (SEEK_DATA/SEEK_HOLE) are copied, with
/// copy_file_range. `to` is created or truncated; it must not be `from`.
pub fn sparse_copy(from: &Path, to: &Path) -> Result<u64, ImageError> {
    let err = |e: io::Error| ImageError::Copy {
        from: from.display().to_string(),
        to: to.display().to_string(),
        source: e,
    };
    let src = File::open(from).map_err(err)?;
    let smeta = src.metadata().map_err(err)?;
    if let Ok(dmeta) = std::fs::metadata(to) {
        if dmeta.dev() == smeta.dev() && dmeta.ino() == smeta.ino() {
            return Err(ImageError::SameFile(to.display().to_string()));
        }
    }
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)
        .map_err(err)?;
    let size = smeta.len();
    dst.set_len(size).map_err(err)?;
    let mut pos: i64 = 0;
    let mut copied = 0u64;
    while (pos as u64) < size {
        let data = match nix::unistd::lseek(&src, pos, nix::unistd::Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(err(e.into())),
        };
        let hole = nix::unistd::lseek(&src, data, nix::unistd::Whence::SeekHole)
            .map_err(|e| err(e.into()))?;
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let len = ((hole - off_in) as usize).min(1 << 30);
            let n =
                nix::fcntl::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), len)
                    .map_err(|e| err(e.into()))?;
            if n == 0 {
                return Err(err(io::ErrorKind::UnexpectedEof.into()));
            }
            copied += n as u64;
        }
        pos = hole;
    }
    dst.sync_all().map_err(err)?;
    Ok(copied)
}

/// Convert a raw image to qcow2 with qemu-img.
pub fn raw_to_qcow2(raw: &Path, out: &Path) -> Result<(), ImageError> {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out)
        .output()
        .map_err(|e| ImageError::Qcow2(e.to_string()))?;
    if !o.status.success() {
        return Err(ImageError::Qcow2(
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let mut f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(b"hello").unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        sparse_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 < 8 << 20);
        assert!(matches!(sparse_copy(&a, &a), Err(ImageError::SameFile(_))));
    }
}
