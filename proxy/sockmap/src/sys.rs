//! The system calls this crate needs and no safe wrapper offers: `bpf(2)` (map create,
//! update, delete, lookup; program load and attach) and three socket queries (`SO_COOKIE`,
//! `TCP_INFO`, `SIOCOUTQ`), plus the `SO_RCVLOWAT` kick. Every `unsafe` block of the crate
//! is here, each one system call with its `// SAFETY:` note.
//!
//! The attribute structs are the prefixes of the kernel's `union bpf_attr` that each
//! command reads (include/uapi/linux/bpf.h); the kernel accepts a shorter attribute as long
//! as the bytes it does not get would have been zero.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// `BPF_MAP_CREATE` and the other commands used.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;

/// `SO_COOKIE` (asm-generic/socket.h): the socket's 64-bit cookie, the key the verdict
/// program sees through `bpf_get_socket_cookie`.
const SO_COOKIE: libc::c_int = 57;
/// `SIOCOUTQ` (= `TIOCOUTQ`): bytes in a TCP socket's write queue, sent but not acked
/// included.
const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`, and its exact size is passed; the kernel reads (and for a few commands
    // writes) only those bytes. Pointers inside it (keys, values, instructions, log) point
    // to buffers the caller keeps alive for the duration of this call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf returned an out-of-range fd"))?;
    // SAFETY: `fd` was just returned by a successful bpf(2) call that creates a new file
    // descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a map; returns its file descriptor.
pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// Inserts or replaces `key -> value` (both as native-endian bytes of the map's sizes).
pub(crate) fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..MapElem::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Reads the value of `key` into `value`; `Ok(false)` when the key is absent.
pub(crate) fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..MapElem::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes `key`; `Ok(false)` when it was absent.
pub(crate) fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<bool> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..MapElem::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Loads a program; on a verifier refusal the error carries the verifier's log.
pub(crate) fn prog_load(
    prog_type: u32,
    insns: &[u64],
    license: &std::ffi::CStr,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        ..ProgLoad::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            if text.trim().is_empty() {
                Err(e)
            } else {
                Err(io::Error::new(
                    e.kind(),
                    format!("{e}; verifier: {}", text.trim()),
                ))
            }
        }
    }
}

/// Attaches `prog` to `map` as `attach_type`.
pub(crate) fn prog_attach(map: &OwnedFd, prog: &OwnedFd, attach_type: u32) -> io::Result<()> {
    let mut attr = ProgAttach {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

/// The socket's cookie (`SO_COOKIE`), stable for its life and unique on this host.
pub(crate) fn socket_cookie(sock: &impl AsFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals; the kernel writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// The kernel's `TCP_INFO` of a TCP socket.
pub(crate) fn tcp_info(sock: &impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: `tcp_info` is plain old data; all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are live locals; the kernel writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(info)
    }
}

/// Bytes in the socket's write queue (`SIOCOUTQ`): written by someone, not yet acked.
pub(crate) fn outq(sock: &impl AsFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one `int` to the pointer given; `n` is a live local.
    let r = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), SIOCOUTQ, &mut n as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Sets `SO_RCVLOWAT` to `value`. On TCP this re-checks the receive queue and calls the
/// socket's data-ready callback when data is waiting: with the socket in the map, that is
/// the verdict path, which then forwards what arrived before the socket was inserted.
pub(crate) fn set_rcvlowat(sock: &impl AsFd, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a live local of the size passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new epoll instance (close-on-exec).
pub(crate) fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: no pointer arguments; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    owned(libc::c_long::from(fd))
}

/// Registers `sock` in `epoll` for `events`, with `token` given back by `epoll_wait`.
pub(crate) fn epoll_add(epoll: &OwnedFd, sock: &impl AsFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a live local; both descriptors are open for the call.
    let r = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            sock.as_fd().as_raw_fd(),
            &mut ev,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes `sock` from `epoll`.
pub(crate) fn epoll_del(epoll: &OwnedFd, sock: &impl AsFd) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: as for `epoll_add`.
    let r = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            sock.as_fd().as_raw_fd(),
            &mut ev,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits for events (at most `out.len()`, `timeout_ms` -1 = forever); returns
/// `(events, token)` pairs written into `out`.
pub(crate) fn epoll_wait(epoll: &OwnedFd, out: &mut [(u32, u64)], timeout_ms: i32) -> io::Result<usize> {
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; out.len()];
    let max = libc::c_int::try_from(evs.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `evs` has room for `max` events and lives across the call.
    let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), evs.as_mut_ptr(), max, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(n).unwrap_or(0);
    for (o, e) in out.iter_mut().zip(&evs[..n]) {
        *o = (e.events, e.u64);
    }
    Ok(n)
}
