//! The handover socket's wire format: length-prefixed JSON frames, and descriptors in
//! SCM_RIGHTS messages of one byte each (rustix, so that received descriptors arrive as
//! `OwnedFd` without `unsafe`).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// SCM_RIGHTS takes at most 253 descriptors per message (SCM_MAX_FD).
const FDS_PER_MESSAGE: usize = 250;

/// Largest frame either side accepts (an offer with 1024 backends on many listeners).
const MAX_FRAME: usize = 64 << 20;

pub(super) fn write_frame(stream: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("frame too large"))?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(bytes)
}

pub(super) fn read_frame(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!(
            "frame of {len} bytes is over the limit"
        )));
    }
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// Sends `fds` in messages of at most [`FDS_PER_MESSAGE`], each with one byte of data.
pub(super) fn send_fds(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(chunk.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(chunk)) {
            return Err(io::Error::other("descriptor buffer too small"));
        }
        let sent = sendmsg(stream, &[IoSlice::new(b"F")], &mut control, SendFlags::empty())?;
        if sent != 1 {
            return Err(io::Error::other("short send of a descriptor message"));
        }
    }
    Ok(())
}

/// Receives `n` descriptors sent by [`send_fds`].
pub(super) fn recv_fds(stream: &UnixStream, n: usize) -> io::Result<Vec<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let msg = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if msg.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the old agent closed the socket after {} of {n} descriptors",
                    out.len()
                ),
            ));
        }
        if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(io::Error::other("descriptors were truncated"));
        }
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                out.extend(fds);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// More descriptors than one SCM_RIGHTS message carries arrive, in order.
    #[test]
    fn descriptors_cross_in_batches_and_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let listeners: Vec<std::net::TcpListener> = (0..300)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| send_fds(&a, &fds));
            let got = recv_fds(&b, 300).unwrap();
            h.join().unwrap().unwrap();
            got
        });
        for (l, fd) in listeners.iter().zip(sender) {
            let got = std::net::TcpListener::from(fd);
            assert_eq!(got.local_addr().unwrap(), l.local_addr().unwrap());
        }
    }
}
