//! `dso-testsrv`: the server dso's rotation tests run inside containers.
//!
//! It is deliberately small and built as one static binary, so the test image is
//! `FROM scratch` with nothing else in it (see `Dockerfile` and `.ci/build-test-image.sh`).
//!
//! Start reading at [`Server`]: it binds a TCP echo listener ([`echo`]) that greets each
//! connection with the instance id, and an HTTP control listener ([`http`]) with a
//! controllable health endpoint and views of the environment and files (for secret
//! injection tests). [`state`] holds what both share; [`config`] turns arguments into a
//! [`config::Command`]; [`probe`] is the HEALTHCHECK client. Signals are mapped in `main.rs`:
//! SIGTERM/SIGINT stop, SIGHUP calls [`state::State::reload`].

pub mod config;
pub mod echo;
pub mod http;
pub mod probe;
pub mod state;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::ServeConfig;
use crate::state::State;

/// Both listeners, bound and not yet serving.
#[derive(Debug)]
pub struct Server {
    /// The TCP echo listener.
    echo: TcpListener,
    /// The HTTP control listener, when enabled.
    http: Option<TcpListener>,
    /// Shared with every connection and with the signal handler.
    state: Arc<State>,
}

impl Server {
    /// Binds the listeners named in `config` (port 0 picks a free port; see the `*_addr`
    /// methods for the result).
    pub async fn bind(config: &ServeConfig) -> io::Result<Self> {
        let echo = TcpListener::bind(config.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("binding echo {}: {e}", config.listen)))?;
        let http = match config.http {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("binding http {addr}: {e}")))?,
            ),
            None => None,
        };
        let state = Arc::new(
            State::new(
                config.instance_id.clone(),
                config.healthy_after,
                config.never_healthy,
            )
            .with_reload_file(config.reload_file.clone())
            .with_health_file(config.health_file.clone()),
        );
        Ok(Self { echo, http, state })
    }

    /// The bound echo address.
    pub fn echo_addr(&self) -> SocketAddr {
        self.echo.local_addr().expect("bound listener has an address")
    }

    /// The bound HTTP address, when enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The shared state (for the SIGHUP handler and for tests).
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and returns. Open connections
    /// are not drained: a test server that stops is meant to look like a process that died.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let echo = tokio::spawn(echo::serve(self.echo, self.state.clone()));
        let http = self
            .http
            .map(|l| tokio::spawn(http::serve(l, self.state.clone())));
        shutdown.await;
        echo.abort();
        if let Some(h) = http {
            h.abort();
        }
    }
}

/// This machine's (or container's) hostname: the fallback instance id. In a container it is
/// the short container id unless `--hostname` was given.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}
