//! Waiting for a new container to be ready to serve.
//!
//! The check, in order of preference: the container's Docker HEALTHCHECK when it has one;
//! otherwise a TCP connect to every proxied container port on the routed network. The
//! optional exec probe (`dso.health.exec`) runs after that and must exit 0; its real exit
//! code is awaited. A container that stops while being checked fails at once; Docker's
//! `unhealthy` is not final (the next passing check heals it), so the wait goes on until
//! the timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::engine::{DockerHealth, Engine, short};
use crate::error::Error;
use crate::network;

/// Pause between two checks.
pub const POLL: Duration = Duration::from_millis(50);
/// Timeout of one TCP connect probe.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// What to check on a container.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Container ports that must accept a TCP connection (when there is no HEALTHCHECK).
    pub ports: Vec<u16>,
    /// Network whose IP is dialed (see [`crate::network::choose`]).
    pub network: Option<String>,
    /// Compose project, for the default-network rule.
    pub project: String,
    /// Command that must exit 0, run in the container.
    pub exec: Option<Vec<String>>,
    /// Longest wait.
    pub timeout: Duration,
}

/// A healthy container: the address the proxy dials for each port, and how long it took.
#[derive(Debug, Clone)]
pub struct Healthy {
    /// Container IP and the wait.
    pub ip: std::net::IpAddr,
    /// Time from the start of the wait.
    pub waited: Duration,
}

/// Waits until container `id` is healthy per `check`.
pub async fn wait<E: Engine>(engine: &E, id: &str, check: &HealthCheck) -> Result<Healthy, Error> {
    let started = Instant::now();
    // Label durations are bounded (a week), so the sum fits; should it not, the wait ends
    // after one round instead of panicking.
    let deadline = started.checked_add(check.timeout).unwrap_or(started);
    let mut previous: Option<String> = None;
    loop {
        // Every round, exec probe and engine calls included, ends by the deadline: a hung
        // probe fails the wait instead of stalling the rotation.
        let left = deadline.saturating_duration_since(Instant::now());
        let round = tokio::time::timeout(left, probe(engine, id, check, left)).await;
        let last = match round {
            Err(_) => {
                let cut = format!(
                    "a check round did not finish within the {} ms left (hung exec probe or daemon)",
                    left.as_millis()
                );
                // A round the deadline cut short says less than the one before it.
                match previous.take() {
                    Some(p) => format!("{p}; then {cut}"),
                    None => cut,
                }
            }
            Ok(r) => match r? {
                Ok(ip) => {
                    let waited = started.elapsed();
                    debug!(
                        container = short(id),
                        waited_ms = waited.as_millis() as u64,
                        "healthy"
                    );
                    return Ok(Healthy { ip, waited });
                }
                Err(why) => why,
            },
        };
        previous = Some(last.clone());
        if Instant::now() >= deadline {
            return Err(Error::Unhealthy {
                container: short(id).to_owned(),
                waited: started.elapsed(),
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One round of checks: `Ok(Ok(ip))` healthy, `Ok(Err(why))` not yet, `Err` give up.
async fn probe<E: Engine>(
    engine: &E,
    id: &str,
    check: &HealthCheck,
    left: Duration,
) -> Result<Result<std::net::IpAddr, String>, Error> {
    let c = engine.inspect(id).await?.ok_or_else(|| Error::Vanished {
        container: short(id).to_owned(),
    })?;
    if !c.running {
        return Err(Error::Exited {
            container: c.name.clone(),
        });
    }
    let Some((_, ip)) = network::choose(&c, check.network.as_deref(), &check.project) else {
        return Ok(Err("no IP address on any network yet".to_owned()));
    };
    match c.health {
        // Not final: with few retries and no start period, a check that ran before the
        // server was up marks the container unhealthy, and the next passing one heals it.
        DockerHealth::Unhealthy => return Ok(Err("docker reports the container unhealthy".to_owned())),
        DockerHealth::Starting => return Ok(Err("docker healthcheck still starting".to_owned())),
        DockerHealth::Healthy => {}
        DockerHealth::None => {
            for port in &check.ports {
                let addr = SocketAddr::new(ip, *port);
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Ok(Err(format!("connect {addr}: {e}"))),
                    Err(_) => return Ok(Err(format!("connect {addr}: timed out"))),
                }
            }
        }
    }
    if let Some(cmd) = &check.exec {
        // The round's own deadline (in `wait`) ends a hung exec first, keeping the result
        // of the round before; the engine's deadline is the backstop.
        let code = match engine
            .exec(id, cmd, left.saturating_add(Duration::from_secs(1)))
            .await
        {
            Ok(code) => code,
            Err(e) => return Ok(Err(format!("probe {cmd:?}: {e}"))),
        };
        if code != 0 {
            return Ok(Err(format!("probe {cmd:?} exited with {code}")));
        }
    }
    Ok(Ok(ip))
}
