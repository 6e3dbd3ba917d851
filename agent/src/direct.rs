//! Reading a disk past the page cache: a block device is opened with `O_DIRECT` (its page cache
//! is shared with a mounted filesystem's metadata buffers, which can differ from what is on the
//! device), and `O_DIRECT` reads need a buffer aligned to the logical block size.

use std::fs::File;
use std::io;
use std::path::Path;

/// The alignment of [`Aligned`]: 4 KiB covers every logical block size.
const ALIGN: usize = 4096;

/// Opens `path` read-only, with `O_DIRECT` when `direct`.
pub fn open_read(path: &Path, direct: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// A buffer of `len` bytes that starts at an [`ALIGN`] boundary, for `O_DIRECT` reads.
pub struct Aligned {
    backing: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Self {
        let backing = vec![0u8; len + ALIGN];
        let at = backing.as_ptr().align_offset(ALIGN);
        Self { backing, at, len }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.at..self.at + self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.backing[self.at..self.at + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_aligned_and_as_long_as_asked() {
        for len in [0, 1, 4096, 1 << 20] {
            let mut b = Aligned::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_mut_ptr().align_offset(ALIGN), 0);
        }
    }
}
