//! The new process's side of a handover: connect to the socket `DSO_UPGRADE_FROM` names,
//! receive the offer and the sockets, report `accepting` and `ready`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::Context as _;
use dso_proxy::ListenerState;

use super::wire::{read_frame, recv_fds, write_frame};
use super::{DEFAULT_READY_TIMEOUT, ENV, Offer, Report};

/// What a new process received from the agent it takes over from.
#[derive(Debug)]
pub struct TakeOver {
    stream: UnixStream,
    /// The pid of the agent handing over.
    pub from_pid: u32,
    /// The proxy listeners with their sockets.
    pub listeners: Vec<(ListenerState, OwnedFd)>,
    /// The control socket (taken by the agent's start-up).
    pub control: Option<std::os::unix::net::UnixListener>,
    /// The HTTP listener.
    pub http: Option<std::net::TcpListener>,
    /// The old process's stderr, which this one moves onto once ready.
    stderr: OwnedFd,
}

/// When started by an upgrade (`DSO_UPGRADE_FROM` set), connects to the handover socket
/// and receives the sockets and state; `None` for an ordinary start.
pub fn take_over() -> anyhow::Result<Option<TakeOver>> {
    let Some(path) = std::env::var_os(ENV).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("{ENV}: connecting to the handover socket {}", path.display()))?;
    stream.set_read_timeout(Some(DEFAULT_READY_TIMEOUT))?;
    let offer: Offer =
        serde_json::from_slice(&read_frame(&mut stream).context("reading the handover offer")?)
            .context("decoding the handover offer")?;
    let mut fds = recv_fds(&stream, offer.fd_count())
        .context("receiving the sockets")?
        .into_iter();
    let mut next = |what: &str| fds.next().with_context(|| format!("the handover lacks {what}"));
    let stderr = next("stderr")?;
    let control = Some(std::os::unix::net::UnixListener::from(next(
        "the control socket",
    )?));
    let http = match offer.http {
        Some(_) => Some(std::net::TcpListener::from(next("the HTTP listener")?)),
        None => None,
    };
    let mut listeners = Vec::with_capacity(offer.listeners.len());
    for state in offer.listeners {
        let fd = next(&format!("the socket of listener {}", state.name))?;
        listeners.push((state, fd));
    }
    Ok(Some(TakeOver {
        stream,
        from_pid: offer.from_pid,
        listeners,
        control,
        http,
        stderr,
    }))
}

impl TakeOver {
    /// Tells the old process that the proxy listeners accept here too.
    pub fn accepting(&mut self) -> anyhow::Result<()> {
        self.report(&Report::Accepting)
    }

    /// Moves this process's stderr onto the old one's (the journal, a log file) and tells
    /// the old process to stop accepting and drain.
    pub fn ready(mut self) -> anyhow::Result<()> {
        nix::unistd::dup2_stderr(&self.stderr).context("moving stderr onto the old agent's")?;
        self.report(&Report::Ready)
    }

    fn report(&mut self, r: &Report) -> anyhow::Result<()> {
        let json = serde_json::to_vec(r)?;
        write_frame(&mut self.stream, &json).context("reporting to the old agent")
    }
}
