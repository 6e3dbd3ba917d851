//! Initramfs inspection: which kernel modules an initramfs carries.
//!
//! An initramfs is a sequence of newc cpio archives, the first ones often uncompressed (CPU microcode),
//! the last one compressed (gzip, zstd, xz, lz4, bzip2, lzma). The cpio framing is parsed here with
//! bounded reads; decompression is left to the host's `gzip`/`zstd`/`xz`/`lz4`/`bzip2` tools fed from a
//! pipe. Nothing is extracted to disk.

use std::collections::BTreeSet;
use std::io::{self, BufReader, Read};
use std::process::{Command, Stdio};

/// Drivers the target (KVM with virtio) needs in the initramfs, by module name.
pub const REQUIRED: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "nvme",
];

const MAX_ENTRIES: usize = 500_000;
const MAX_NAME: usize = 4096;

/// Errors reading an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("read initramfs")]
    Read(#[from] io::Error),
    #[error("malformed cpio archive: {0}")]
    Malformed(String),
    #[error("compression {0} is not supported")]
    Compression(String),
    #[error("run decompressor {0}")]
    Decompressor(String, #[source] io::Error),
}

/// Normalise a module file name (`virtio-blk.ko.zst`) to its module name (`virtio_blk`).
pub fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|s| base.strip_suffix(s))?;
    Some(stem.replace('-', "_"))
}

fn hex_field(h: &[u8], i: usize) -> Result<u64, InitramfsError> {
    let f = &h[6 + i * 8..6 + (i + 1) * 8];
    let s =
        std::str::from_utf8(f).map_err(|_| InitramfsError::Malformed("non-ASCII header".into()))?;
    u64::from_str_radix(s, 16)
        .map_err(|_| InitramfsError::Malformed(format!("bad header field {s:?}")))
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Outcome of reading one cpio archive.
enum Next {
    /// Trailer seen; more data may follow.
    Trailer,
    /// Clean end of the stream.
    End,
}

/// Read one newc archive from `r` (after `magic6`, the first 6 bytes, were already read), adding names.
fn read_archive(
    r: &mut impl Read,
    mut magic6: [u8; 6],
    names: &mut Vec<String>,
) -> Result<Next, InitramfsError> {
    let mut offset: u64 = 0;
    loop {
        if &magic6 != b"070701" && &magic6 != b"070702" {
            return Err(InitramfsError::Malformed(format!(
                "bad magic {:?} at {offset}",
                String::from_utf8_lossy(&magic6)
            )));
        }
        let mut h = [0u8; 110];
        h[..6].copy_from_slice(&magic6);
        r.read_exact(&mut h[6..])?;
        let filesize = hex_field(&h, 6)?;
        let namesize = hex_field(&h, 11)? as usize;
        if namesize == 0 || namesize > MAX_NAME {
            return Err(InitramfsError::Malformed(format!("name size {namesize}")));
        }
        let mut name = vec![0u8; namesize];
        r.read_exact(&mut name)?;
        let name = String::from_utf8_lossy(&name[..namesize - 1]).into_owned();
        let pad = (4 - (110 + namesize) % 4) % 4;
        skip(r, pad as u64)?;
        let dpad = (4 - filesize % 4) % 4;
        skip(r, filesize + dpad)?;
        offset += 110 + (namesize + pad) as u64 + filesize + dpad;
        if name == "TRAILER!!!" {
            return Ok(Next::Trailer);
        }
        names.push(name);
        if names.len() > MAX_ENTRIES {
            return Err(InitramfsError::Malformed(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        match read_up_to(r, &mut magic6)? {
            6 => {}
            0 => return Ok(Next::End),
            _ => return Err(InitramfsError::Malformed("truncated header".into())),
        }
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn decompressor(magic: &[u8]) -> Option<&'static str> {
    match magic {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        [0xfd, b'7', b'z', b'X', b'Z', ..] => Some("xz"),
        [0x02, 0x21, 0x4c, 0x18, ..] => Some("lz4"),
        [b'B', b'Z', b'h', ..] => Some("bzip2"),
        [0x5d, 0x00, 0x00, ..] => Some("lzma"),
        _ => None,
    }
}

/// List every file name in an initramfs stream.
pub fn list_names(input: impl Read + Send + 'static) -> Result<Vec<String>, InitramfsError> {
    let mut r = BufReader::with_capacity(1 << 16, input);
    let mut names = Vec::new();
    loop {
        // Skip the zero padding between archives.
        let mut first = [0u8; 1];
        loop {
            if read_up_to(&mut r, &mut first)? == 0 {
                return Ok(names);
            }
            if first[0] != 0 {
                break;
            }
        }
        let mut rest = [0u8; 5];
        let got = read_up_to(&mut r, &mut rest)?;
        let mut magic = [0u8; 6];
        magic[0] = first[0];
        magic[1..1 + got].copy_from_slice(&rest[..got]);
        if &magic == b"070701" || &magic == b"070702" {
            match read_archive(&mut r, magic, &mut names)? {
                Next::Trailer => continue,
                Next::End => return Ok(names),
            }
        }
        let tool = decompressor(&magic)
            .ok_or_else(|| InitramfsError::Compression(format!("{:02x?}", &magic[..4])))?;
        let args: Vec<&str> = match tool {
            "lzma" => vec!["xz", "--format=lzma", "-dc"],
            t => vec![t, "-dc"],
        };
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| InitramfsError::Decompressor(args[0].to_string(), e))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let prefix = magic[..1 + got].to_vec();
        let feeder = std::thread::spawn(move || -> io::Result<()> {
            use std::io::Write;
            stdin.write_all(&prefix)?;
            // A broken pipe when the decompressor stops early (trailing garbage) is not an error here.
            match io::copy(&mut r, &mut stdin) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                other => other.map(|_| ()),
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let result = list_names_plain(stdout, &mut names);
        let _ = child.kill();
        let _ = child.wait();
        let _ = feeder.join();
        result?;
        return Ok(names);
    }
}

/// Names from a stream of uncompressed archives (the decompressed tail).
fn list_names_plain(input: impl Read, names: &mut Vec<String>) -> Result<(), InitramfsError> {
    let mut r = BufReader::with_capacity(1 << 16, input);
    loop {
        let mut first = [0u8; 1];
        loop {
            if read_up_to(&mut r, &mut first)? == 0 {
                return Ok(());
            }
            if first[0] != 0 {
                break;
            }
        }
        let mut magic = [0u8; 6];
        magic[0] = first[0];
        r.read_exact(&mut magic[1..])?;
        if let Next::End = read_archive(&mut r, magic, names)? {
            return Ok(());
        }
    }
}

/// Module names contained in an initramfs.
pub fn modules(input: impl Read + Send + 'static) -> Result<BTreeSet<String>, InitramfsError> {
    Ok(list_names(input)?
        .iter()
        .filter_map(|n| module_name(n))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        let namesize = name.len() + 1;
        out.extend_from_slice(
            format!("070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}", 1, 0o100644, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, namesize, 0)
                .as_bytes(),
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, d) in files {
            entry(&mut out, n, d);
        }
        entry(&mut out, "TRAILER!!!", b"");
        while out.len() % 512 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn plain_and_gzip_archives() {
        let early = archive(&[("kernel/x86/microcode/GenuineIntel.bin", b"ucode")]);
        let main = archive(&[
            (
                "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko",
                b"elf",
            ),
            (
                "usr/lib/modules/6.1.0/kernel/drivers/net/virtio-net.ko.xz",
                b"elf",
            ),
            ("init", b"#!/bin/sh"),
        ]);
        let mut gz = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            gz.stdin.take().unwrap().write_all(&main).unwrap();
        }
        let compressed = gz.wait_with_output().unwrap().stdout;
        let mut img = early.clone();
        img.extend_from_slice(&compressed);
        let mods = modules(io::Cursor::new(img)).unwrap();
        assert_eq!(
            mods.into_iter().collect::<Vec<_>>(),
            vec!["virtio_blk", "virtio_net"]
        );
        let names = list_names(io::Cursor::new(early)).unwrap();
        assert_eq!(names, vec!["kernel/x86/microcode/GenuineIntel.bin"]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(list_names(io::Cursor::new(b"hello world, not an archive".to_vec())).is_err());
        assert!(list_names(io::Cursor::new(b"070701zzzz".to_vec())).is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("a/b/virtio_pci.ko.zst").as_deref(),
            Some("virtio_pci")
        );
        assert_eq!(
            module_name("a/b/xen-blkfront.ko").as_deref(),
            Some("xen_blkfront")
        );
        assert_eq!(module_name("a/b/modules.dep"), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..2048), cpio in any::<bool>()) {
            if cpio {
                let mut a = b"070701".to_vec();
                a.append(&mut bytes);
                bytes = a;
            }
            // Only uncompressed framing here: random bytes starting like a compressor magic would spawn tools.
            if bytes.first().is_some_and(|&b| b != b'0' && b != 0) {
                return Ok(());
            }
            let _ = list_names(io::Cursor::new(bytes));
        }
    }
}
