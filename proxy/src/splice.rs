//! Zero-copy forwarding with splice(2) on Linux: socket -> pipe -> socket, the bytes never
//! enter user space. Safe code only (`nix` wraps the system calls).
//!
//! A [`Pipe`] is created for one direction of one connection when that direction starts
//! carrying bulk data, and released when it has been quiet for a while, so idle
//! connections hold neither pipes nor their file descriptors.

use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Capacity asked of each pipe (the kernel rounds to pages; the default is 64 KiB). Larger
/// pipes move more per system call; past 256 KiB it stopped helping on loopback.
pub(crate) const PIPE_SIZE: usize = 256 * 1024;

/// A pipe used as the kernel-side buffer of one forwarding direction. Invariant between
/// calls: it is empty (every byte spliced in was spliced out before the next fill).
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe can hold, as granted by the kernel.
    size: usize,
}

impl Pipe {
    /// Creates a non-blocking pipe and tries to grow it to [`PIPE_SIZE`]. Fails when the
    /// process is out of file descriptors; the caller then copies through user space.
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        // Past /proc/sys/fs/pipe-max-size, or under the per-user pipe quota, the kernel
        // refuses to grow the pipe: keep the default size then.
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |n| usize::try_from(n).unwrap_or(64 * 1024));
        Ok(Pipe { read, write, size })
    }

    /// Moves what `from` has ready (up to the pipe's size) into the pipe. `Ok(0)` is end
    /// of stream; `WouldBlock` means nothing is ready and clears `from`'s readiness.
    pub(crate) fn fill(&self, from: &TcpStream) -> io::Result<usize> {
        from.try_io(Interest::READABLE, || {
            splice(from, None, &self.write, None, self.size, flags()).map_err(io::Error::from)
        })
    }

    /// Moves up to `len` bytes from the pipe into `to`. `WouldBlock` means `to`'s send
    /// buffer is full and clears its readiness.
    pub(crate) fn drain(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        to.try_io(Interest::WRITABLE, || {
            splice(&self.read, None, to, None, len, flags()).map_err(io::Error::from)
        })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}
