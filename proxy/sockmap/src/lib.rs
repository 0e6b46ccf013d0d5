//! `dso-sockmap`: an evaluation of a BPF sockmap fast path for established proxied
//! connections (issue 13).
//!
//! A [`FastPath`] owns two sockhash maps, a hash map and one `SK_SKB` stream-verdict
//! program. [`FastPath::join`] puts the two legs of a connection in it; from then on each
//! leg's incoming bytes are moved by the kernel to the other leg's send side, in softirq
//! context, with no system call per message. User space keeps the sockets (it still sees
//! end of stream and errors) and decides when to half-close and close.
//!
//! Where to start reading: `prog.rs` (the program, as raw instructions), this file (the
//! maps and [`Joined`], the handle of one connection in the fast path), `sys.rs` (every
//! system call and every `unsafe` block). What the kernel does with half-close, drain,
//! backpressure and byte counts is measured by `tests/it` and written down in
//! docs/proxy.md ("Sockmap fast path: evaluation").
//!
//! Linux only; root (by the kernel's rules `CAP_BPF` with `CAP_NET_ADMIN`; only root was
//! tried). Without the permission [`FastPath::new`] fails with [`Error::Unavailable`] and
//! the caller keeps its user-space path.

#[cfg(target_os = "linux")]
mod prog;
// bpf(2), SO_COOKIE, TCP_INFO and SIOCOUTQ have no safe wrapper in libc, nix or socket2;
// every unsafe block of the crate is one system call in sys.rs, with its SAFETY note.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys;

use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// What can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The fast path cannot be set up here: no permission, a kernel without sockmap, a
    /// verifier refusal, or not Linux. The reason is the kernel's answer.
    #[error("sockmap fast path not available: {reason}")]
    Unavailable {
        /// What the kernel said, and which step it refused.
        reason: String,
    },
    /// A map operation on one connection failed (a socket that is not an established TCP
    /// socket, a full map).
    #[error("sockmap {op} failed: {source}")]
    Map {
        /// The step: `insert`, `remove`, `read counters`.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// `BPF_MAP_TYPE_HASH`, `BPF_MAP_TYPE_SOCKHASH`, `BPF_PROG_TYPE_SK_SKB`,
/// `BPF_SK_SKB_STREAM_VERDICT`.
#[cfg(target_os = "linux")]
const MAP_HASH: u32 = 1;
#[cfg(target_os = "linux")]
const MAP_SOCKHASH: u32 = 18;
#[cfg(target_os = "linux")]
const PROG_SK_SKB: u32 = 14;
#[cfg(target_os = "linux")]
const ATTACH_STREAM_VERDICT: u32 = 5;

/// The maps and the verdict program. One per process is enough; closing it (drop) takes
/// every socket out of the fast path, and the kernel frees the program and maps.
#[derive(Debug)]
pub struct FastPath {
    /// Sockhash with the verdict program attached: a socket here has its incoming bytes
    /// judged by the program.
    socks: OwnedFd,
    /// Sockhash without a program: where the program finds the peer to redirect to. A leg
    /// enters it before either leg enters `socks`, so the first byte already finds its
    /// peer.
    targets: OwnedFd,
    /// Hash: a socket's cookie -> `{ peer's cookie, bytes redirected from this socket }`.
    peers: OwnedFd,
    /// Kept open for the program's life (the map attachment holds a reference too).
    _prog: OwnedFd,
}

impl FastPath {
    /// Creates the maps (room for `capacity` sockets, two per connection) and loads and
    /// attaches the program. [`Error::Unavailable`] says why when this host refuses.
    #[cfg(target_os = "linux")]
    pub fn new(capacity: u32) -> Result<FastPath, Error> {
        let unavailable = |step: &str, e: io::Error| Error::Unavailable {
            reason: format!("{step}: {e}"),
        };
        let socks = sys::map_create(MAP_SOCKHASH, 8, 8, capacity)
            .map_err(|e| unavailable("creating a sockhash", e))?;
        let targets = sys::map_create(MAP_SOCKHASH, 8, 8, capacity)
            .map_err(|e| unavailable("creating a sockhash", e))?;
        let peers =
            sys::map_create(MAP_HASH, 8, 16, capacity).map_err(|e| unavailable("creating a hash map", e))?;
        let insns = prog::verdict(&peers, &targets);
        let prog = sys::prog_load(PROG_SK_SKB, &insns, c"Dual MIT/GPL", "dso_verdict")
            .map_err(|e| unavailable("loading the verdict program", e))?;
        sys::prog_attach(&socks, &prog, ATTACH_STREAM_VERDICT)
            .map_err(|e| unavailable("attaching the verdict program", e))?;
        Ok(FastPath {
            socks,
            targets,
            peers,
            _prog: prog,
        })
    }

    /// Not Linux: never available.
    #[cfg(not(target_os = "linux"))]
    pub fn new(_capacity: u32) -> Result<FastPath, Error> {
        Err(Error::Unavailable {
            reason: "sockmap is Linux only".into(),
        })
    }

    /// Puts the two legs of one connection into the fast path. Both must be established
    /// TCP sockets. Call it only when user space holds none of their bytes (nothing read
    /// and not yet written): from here on, every byte either socket receives, including
    /// what already waits in its receive queue, goes straight to the other.
    #[cfg(target_os = "linux")]
    pub fn join(&self, a: &impl AsFd, b: &impl AsFd) -> Result<Joined<'_>, Error> {
        let map = |op, source| Error::Map { op, source };
        let ca = sys::socket_cookie(a).map_err(|e| map("insert", e))?;
        let cb = sys::socket_cookie(b).map_err(|e| map("insert", e))?;
        let start_a = Written::of(a).map_err(|e| map("insert", e))?;
        let start_b = Written::of(b).map_err(|e| map("insert", e))?;
        let joined = Joined {
            fast: self,
            a: ca,
            b: cb,
            start_a,
            start_b,
        };
        // Order: peer entries and redirect targets first, so that the first byte either
        // socket receives after it enters `socks` finds its peer. If a step fails, what
        // was inserted is removed again (`Joined`'s drop).
        let fd = |s: &dyn AsFd| std::os::fd::AsRawFd::as_raw_fd(&s.as_fd()) as u64;
        let steps = || -> io::Result<()> {
            sys::map_update(&self.peers, &ca.to_ne_bytes(), &entry(cb))?;
            sys::map_update(&self.peers, &cb.to_ne_bytes(), &entry(ca))?;
            sys::map_update(&self.targets, &ca.to_ne_bytes(), &fd(a).to_ne_bytes())?;
            sys::map_update(&self.targets, &cb.to_ne_bytes(), &fd(b).to_ne_bytes())?;
            sys::map_update(&self.socks, &ca.to_ne_bytes(), &fd(a).to_ne_bytes())?;
            sys::map_update(&self.socks, &cb.to_ne_bytes(), &fd(b).to_ne_bytes())?;
            // Bytes that arrived before the insertion wait in the receive queue, and the
            // verdict runs only when more arrive: kick each socket so they move now.
            sys::set_rcvlowat(a, 1)?;
            sys::set_rcvlowat(b, 1)
        };
        steps().map_err(|e| map("insert", e))?;
        Ok(joined)
    }

    /// Not Linux: never called (no `FastPath` exists).
    #[cfg(not(target_os = "linux"))]
    pub fn join(&self, _a: &impl AsFd, _b: &impl AsFd) -> Result<Joined<'_>, Error> {
        Err(Error::Unavailable {
            reason: "sockmap is Linux only".into(),
        })
    }
}

/// A `peers` value: the peer's cookie and a zero byte count.
#[cfg(target_os = "linux")]
fn entry(peer: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&peer.to_ne_bytes());
    v
}

/// How many bytes have been written into a socket's send side in total, by anyone
/// (user space or a redirect): acknowledged bytes plus what is still queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Written(u64);

impl Written {
    #[cfg(target_os = "linux")]
    fn of(s: &impl AsFd) -> io::Result<Written> {
        let info = sys::tcp_info(s)?;
        Ok(Written(info.tcpi_bytes_acked + sys::outq(s)?))
    }
}

/// Byte counts of one connection in the fast path, since [`FastPath::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Moved {
    /// Bytes the program redirected from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes the program redirected from `b` to `a`.
    pub b_to_a: u64,
    /// Of `a_to_b`, the bytes already written into `b`'s send queue (the rest waits in the
    /// kernel's redirect queue, for room in `b`'s send buffer).
    pub into_b: u64,
    /// Of `b_to_a`, the bytes already written into `a`'s send queue.
    pub into_a: u64,
}

impl Moved {
    /// Whether every redirected byte has reached the other socket's send queue: only then
    /// may a side be half-closed (its FIN would otherwise overtake bytes still in the
    /// redirect queue, which the kernel then drops).
    /// `>=`, not `==`: once the proxy has passed a FIN on to a leg, that FIN counts one in
    /// its `into_*` (a sequence number, acked like a byte).
    pub fn settled(&self) -> bool {
        self.into_b >= self.a_to_b && self.into_a >= self.b_to_a
    }
}

/// One connection in the fast path. Dropping it takes both sockets out of the maps (the
/// sockets themselves stay open: closing them is the owner's business; closing a socket
/// also takes it out of every map).
#[derive(Debug)]
pub struct Joined<'f> {
    fast: &'f FastPath,
    a: u64,
    b: u64,
    start_a: Written,
    start_b: Written,
}

impl Joined<'_> {
    /// Byte counts since the join. `a` and `b` must be the sockets given to `join`.
    #[cfg(target_os = "linux")]
    pub fn moved(&self, a: &impl AsFd, b: &impl AsFd) -> Result<Moved, Error> {
        let err = |source| Error::Map {
            op: "read counters",
            source,
        };
        let bytes = |cookie: u64| -> io::Result<u64> {
            let mut v = [0u8; 16];
            sys::map_lookup(&self.fast.peers, &cookie.to_ne_bytes(), &mut v)?;
            Ok(u64::from_ne_bytes(v[8..].try_into().unwrap_or_default()))
        };
        let wa = Written::of(a).map_err(err)?;
        let wb = Written::of(b).map_err(err)?;
        Ok(Moved {
            a_to_b: bytes(self.a).map_err(err)?,
            b_to_a: bytes(self.b).map_err(err)?,
            into_b: wb.0.saturating_sub(self.start_b.0),
            into_a: wa.0.saturating_sub(self.start_a.0),
        })
    }

    /// Not Linux: never called.
    #[cfg(not(target_os = "linux"))]
    pub fn moved(&self, _a: &impl AsFd, _b: &impl AsFd) -> Result<Moved, Error> {
        Ok(Moved::default())
    }

    /// Takes both sockets out of the maps now (what `drop` does, with the error).
    pub fn leave(self) -> Result<(), Error> {
        let r = self.remove();
        std::mem::forget(self);
        r
    }

    #[cfg(target_os = "linux")]
    fn remove(&self) -> Result<(), Error> {
        let mut first = None;
        for (map, key) in [
            (&self.fast.socks, self.a),
            (&self.fast.socks, self.b),
            (&self.fast.targets, self.a),
            (&self.fast.targets, self.b),
            (&self.fast.peers, self.a),
            (&self.fast.peers, self.b),
        ] {
            if let Err(e) = sys::map_delete(map, &key.to_ne_bytes()) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |source| Err(Error::Map { op: "remove", source }))
    }

    #[cfg(not(target_os = "linux"))]
    fn remove(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// Waits for end of stream and errors of sockets in the fast path without waking for the
/// bytes the program moves: an epoll set whose interest is only `EPOLLRDHUP` (plus the
/// `EPOLLERR`/`EPOLLHUP` epoll always reports). Interest in `EPOLLIN` would wake the
/// waiter for every redirected chunk (the verdict path calls the socket's data-ready
/// wake-up), one wake-up and one empty read per message: the cost the fast path exists to
/// remove.
#[derive(Debug)]
pub struct EndWatch {
    #[cfg(target_os = "linux")]
    epoll: OwnedFd,
}

/// One event of an [`EndWatch`]: the token given to [`EndWatch::add`] and whether the
/// socket reported an error or hang-up rather than only its peer's FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// The caller's token.
    pub token: u64,
    /// `EPOLLERR` came with it: the connection is broken (a reset). Without it the event is
    /// the peer's FIN (`EPOLLRDHUP`, with `EPOLLHUP` once both ways are shut).
    pub error: bool,
}

#[cfg(target_os = "linux")]
impl EndWatch {
    /// A new, empty watch.
    pub fn new() -> io::Result<EndWatch> {
        Ok(EndWatch {
            epoll: sys::epoll_create()?,
        })
    }

    /// Watches `sock` for end of stream or error, reported once (edge-triggered) with `token`.
    pub fn add(&self, sock: &impl AsFd, token: u64) -> io::Result<()> {
        let rdhup = libc::EPOLLRDHUP as u32 | libc::EPOLLET as u32;
        sys::epoll_add(&self.epoll, sock, rdhup, token)
    }

    /// Stops watching `sock` (closing it does too).
    pub fn remove(&self, sock: &impl AsFd) -> io::Result<()> {
        sys::epoll_del(&self.epoll, sock)
    }

    /// Waits up to `timeout` (forever with `None`) and returns what ended.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> io::Result<Vec<End>> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut out = [(0u32, 0u64); 64];
        let n = match sys::epoll_wait(&self.epoll, &mut out, ms) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            r => r?,
        };
        let bad = libc::EPOLLERR as u32;
        Ok(out[..n]
            .iter()
            .map(|&(ev, token)| End {
                token,
                error: ev & bad != 0,
            })
            .collect())
    }
}
