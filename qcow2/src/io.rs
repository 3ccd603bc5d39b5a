//! Small wrappers over file syscalls that std does not offer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::error::{Error, Result};

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Zeroes a byte range, with FALLOC_FL_ZERO_RANGE where possible and plain
/// writes otherwise.
pub fn zero_range(file: &File, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
    {
        return Ok(());
    }
    write_zero_bytes(file, offset, len)
}

/// Writes `len` zero bytes at `offset`.
pub fn write_zero_bytes(file: &File, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)
            .map_err(|e| Error::io("write zeroes", e))?;
        done += n as u64;
    }
    Ok(())
}

/// Deallocates a byte range (best effort; contents read as zeros afterwards
/// on file systems that support it).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(Error::io("punch hole", e)),
    }
}

/// Reads exactly `buf.len()` bytes; bytes past the end of the file read as zeros.
pub fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", e)),
        }
    }
    Ok(())
}
