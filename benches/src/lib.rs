//! Shared set-up for the criterion benchmarks in `benches/`: a proxy with one listener in
//! front of loopback backends, and backends that report when a connection reaches them.
//!
//! Each bench answers one question (see `docs/benchmarks.md` for the figures):
//! `swap` (how long a route store takes), `route_load` (what the accept path pays to read
//! the route), `swap_contended` (both while other threads load), `swap_to_effect` (from
//! the swap call to the first new connection reaching the new backend).

use std::net::SocketAddr;
use std::time::Duration;

use dso_proxy::{Backend, Listener, ListenerConfig, Proxy, ProxyConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A multi-threaded tokio runtime with the machine's two cores, as the agent would run.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Starts a proxy with one listener on an OS-chosen loopback port forwarding to `backends`.
/// Must run inside the runtime. Drains are short so retired generations do not pile up.
pub fn proxy(backends: Vec<Backend>) -> (Proxy, Listener) {
    let proxy = Proxy::new(ProxyConfig::default());
    let mut cfg = ListenerConfig::new("bench", SocketAddr::from(([127, 0, 0, 1], 0)), backends);
    cfg.drain_timeout = Duration::from_secs(5);
    let listener = proxy.add_listener(cfg).expect("listener");
    (proxy, listener)
}

/// A loopback backend that sends the instant of every accept on a channel and then closes
/// the connection.
pub struct ReportingBackend {
    /// Address the backend listens on.
    pub addr: SocketAddr,
    /// One instant per accepted connection, taken right after `accept` returned.
    pub accepts: mpsc::UnboundedReceiver<Instant>,
}

impl ReportingBackend {
    /// Binds `127.0.0.1:0` and starts accepting. Must run inside the runtime.
    pub async fn start() -> ReportingBackend {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = socket.local_addr().expect("backend addr");
        let (tx, accepts) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                let at = Instant::now();
                drop(stream);
                if tx.send(at).is_err() {
                    return;
                }
            }
        });
        ReportingBackend { addr, accepts }
    }

    /// The backend as a route entry.
    pub fn backend(&self) -> Backend {
        Backend::new(self.addr)
    }
}
