//! Service lifecycle with real Compose v2 projects (`docker compose up/stop/start/down`):
//! a service with no running member has an empty route (nothing is dialed), a service gone
//! for good loses its listener after the grace period, and a changed `dso.host_ports`
//! moves the listener. No client ever connects while the route could name a container that
//! no longer exists: each step first waits for the route to be as expected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dso_rotator::{RotateRequest, Strategy, listener_name};

use crate::support::{Agent, RUN_LABEL, exchange, image, require_compose, require_docker, short};

/// A Compose project in a temporary directory; `down -v` (and removal of anything left
/// with the run label) on drop.
struct Project {
    run: String,
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        require_docker();
        require_compose();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Project {
            run: format!("dsoc{}x{nanos:x}", std::process::id()),
            dir: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes compose.yaml: one service `web` with the given host ports label.
    fn write(&self, host_ports: &str, replicas: u32) {
        let yaml = format!(
            r#"services:
  web:
    image: {image}
    deploy:
      replicas: {replicas}
    healthcheck:
      test: ["CMD", "/dso-testsrv", "probe", "127.0.0.1:8081/health"]
      interval: 200ms
      retries: 1
    labels:
      {RUN_LABEL}: "{run}"
      dso.reloader: "true"
      dso.host_ports: "{host_ports}"
      dso.update.strategy: "restart"
      dso.health.timeout: "20s"
      dso.drain.timeout: "1s"
"#,
            image = image(),
            run = self.run,
        );
        std::fs::write(self.dir.path().join("compose.yaml"), yaml).unwrap();
    }

    fn compose(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("docker")
            .arg("compose")
            .arg("--project-directory")
            .arg(self.dir.path())
            .args(["-p", &self.run])
            .args(args)
            .output()
            .expect("docker compose");
        assert!(
            out.status.success(),
            "docker compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn key(&self) -> dso_rotator::ServiceKey {
        dso_rotator::ServiceKey {
            project: self.run.clone(),
            service: "web".into(),
        }
    }

    fn agent(&self, grace: Duration) -> Agent {
        let a = Agent::start_with(PathBuf::from(self.state.path()), &self.run, |c| {
            c.release_grace = grace;
        });
        a.watch();
        a
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .arg("compose")
            .arg("--project-directory")
            .arg(self.dir.path())
            .args(["-p", &self.run, "down", "-v", "--remove-orphans", "-t", "1"])
            .output();
        let label = format!("label={RUN_LABEL}={}", self.run);
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-fv", id])
                    .output();
            }
        }
    }
}

/// Polls `f` every 20 ms for up to 20 s.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bindable(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

/// A loopback port free right now (bound, then closed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_stopped_service_has_an_empty_route_and_a_removed_one_releases_its_port() {
    let p = Project::new();
    p.write("127.0.0.1:0:8080", 1);
    p.compose(&["up", "-d", "--wait"]);
    let agent = p.agent(Duration::from_millis(500));
    let name = listener_name(&p.key(), 8080);
    let listener = || agent.proxy.listener(&name);
    let backends = || listener().map(|l| l.snapshot().backends.len());
    let addr = listener().expect("listener of the compose service").local_addr();
    let id = p.compose(&["ps", "-q", "web"]);
    assert_eq!(agent.rt.block_on(exchange(addr, "up")).unwrap(), short(&id));

    // Stopped: the container exists but has no address to dial; the route empties.
    p.compose(&["stop", "-t", "1", "web"]);
    until("the route to empty after compose stop", || {
        backends().is_ok_and(|n| n == 0)
    });
    assert_eq!(listener().unwrap().local_addr(), addr, "the port stays owned");
    // Nothing to dial: the proxy closes the connection at once.
    agent.rt.block_on(async {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut c, &mut buf),
        )
        .await
        .expect("closed promptly, not held");
        assert!(matches!(r, Ok(0) | Err(_)), "no greeting from anything: {r:?}");
    });
    let snap = listener().unwrap().snapshot();
    assert_eq!(snap.counters.dial_errors, 0, "nothing was dialed: {snap:?}");

    // Started again: routed again, on the same port.
    p.compose(&["start", "web"]);
    until("the route to come back", || backends().is_ok_and(|n| n == 1));
    assert_eq!(agent.rt.block_on(exchange(addr, "again")).unwrap(), short(&id));

    // Down: the containers are removed; the route empties at once, the port goes after
    // the grace period.
    p.compose(&["down", "-t", "1"]);
    until("the listener to be released", || listener().is_err());
    until("the port to be free", || bindable(addr));
    assert!(agent.rotator.gateway().services().is_empty());
}

#[test]
fn a_changed_host_port_binds_the_new_port_and_releases_the_old() {
    let p = Project::new();
    let first = free_port();
    p.write(&format!("127.0.0.1:{first}:8080"), 1);
    p.compose(&["up", "-d", "--wait"]);
    let agent = p.agent(Duration::from_secs(30));
    let name = listener_name(&p.key(), 8080);
    let old = SocketAddr::from(([127, 0, 0, 1], first));
    assert_eq!(agent.proxy.listener(&name).unwrap().local_addr(), old);
    let id = p.compose(&["ps", "-q", "web"]);
    assert_eq!(agent.rt.block_on(exchange(old, "a")).unwrap(), short(&id));

    let second = free_port();
    p.write(&format!("127.0.0.1:{second}:8080"), 1);
    // Compose recreates the container (its labels changed).
    p.compose(&["up", "-d", "--wait"]);
    let new = SocketAddr::from(([127, 0, 0, 1], second));
    until("the listener on the new port", || {
        agent
            .proxy
            .listener(&name)
            .is_ok_and(|l| l.local_addr() == new && !l.snapshot().backends.is_empty())
    });
    until("the old port to be free", || bindable(old));
    let id2 = p.compose(&["ps", "-q", "web"]);
    assert_ne!(id2, id, "recreated");
    assert_eq!(agent.rt.block_on(exchange(new, "b")).unwrap(), short(&id2));
}

#[test]
fn restart_of_one_of_two_compose_replicas_never_holds() {
    let p = Project::new();
    p.write("127.0.0.1:0:8080", 2);
    p.compose(&["up", "-d", "--wait"]);
    let agent = p.agent(Duration::from_secs(30));
    let name = listener_name(&p.key(), 8080);
    until("two members", || {
        agent
            .proxy
            .listener(&name)
            .is_ok_and(|l| l.snapshot().backends.len() == 2)
    });
    let report = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: format!("{}/web", p.run),
            strategy: Some(Strategy::Restart),
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(report.containers.len(), 2);
    for c in &report.containers {
        let paused = c
            .steps
            .iter()
            .find(|s| s.step == dso_rotator::journal::Step::Paused)
            .unwrap();
        assert!(paused.detail.contains("taken out of the route"), "{paused:?}");
    }
    let snap = agent.proxy.listener(&name).unwrap().snapshot();
    assert_eq!(snap.counters.held, 0, "no connection was ever held");
    assert_eq!(snap.backends.len(), 2);
    let addr = snap.bind;
    let ids = p.compose(&["ps", "-q", "web"]);
    let seen = agent.rt.block_on(async {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..10 {
            seen.insert(exchange(addr, &format!("m{i}")).await.unwrap());
        }
        seen
    });
    for id in ids.lines() {
        assert!(seen.contains(&short(id)), "{id} serves: {seen:?}");
    }
}
