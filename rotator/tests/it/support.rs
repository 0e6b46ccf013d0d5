//! Scenario helpers: a scratch Docker world per test (uniquely named network and
//! containers, all labelled with the test's run ID and removed on drop), an agent (proxy +
//! rotator on its own runtime, so dropping it is like killing the process), and a client
//! load that counts every failed connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dso_proxy::{Proxy, ProxyConfig};
use dso_rotator::{Config, DockerEngine, Rotator};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The label every object of a test carries, with the test's run ID.
pub const RUN_LABEL: &str = "dso.test.run";

/// Fails the test loudly when Compose v2 (`docker compose`) is missing.
pub fn require_compose() {
    if let Err(e) = docker(&["compose", "version"]) {
        panic!(
            "Docker Compose v2 is missing ({e}). These tests need it: run `bash -c 'source .ci/services.sh; ensure_compose'` first."
        );
    }
}

pub fn image() -> String {
    std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned())
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Fails the test loudly when the engine or the image is missing.
pub fn require_docker() {
    if let Err(e) = docker(&["version", "--format", "{{.Server.APIVersion}}"]) {
        panic!(
            "Docker is not reachable ({e}). These tests need it: run `bash .ci/services.sh docker` (ensure_docker) first."
        );
    }
    if docker(&["image", "inspect", &image()]).is_err() {
        panic!(
            "test image {} is missing: run `bash .ci/build-test-image.sh` first.",
            image()
        );
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A Compose-like project: its own `PROJECT_default` network; containers labelled as
/// services of it. Everything it created is removed on drop.
pub struct World {
    pub run: String,
    pub network: String,
    pub state: tempfile::TempDir,
}

/// How a test container is started.
pub struct Svc<'a> {
    pub service: &'a str,
    pub ports: &'a str,
    pub strategy: &'a str,
    pub extra_labels: Vec<(&'a str, String)>,
    /// Docker healthcheck interval; `None` disables the HEALTHCHECK (TCP check used).
    pub health_interval: Option<&'a str>,
    /// More `docker run` arguments (before the image).
    pub run_args: Vec<String>,
    /// The image (default: the test image).
    pub image: Option<String>,
}

impl<'a> Svc<'a> {
    pub fn new(service: &'a str) -> Self {
        Svc {
            service,
            ports: "127.0.0.1:0:8080",
            strategy: "rolling",
            extra_labels: vec![
                ("dso.drain.timeout", "2s".to_owned()),
                ("dso.health.timeout", "20s".to_owned()),
            ],
            health_interval: Some("200ms"),
            run_args: Vec::new(),
            image: None,
        }
    }
}

impl World {
    pub fn new() -> World {
        require_docker();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let run = format!("dsot{}x{n}x{nanos:x}", std::process::id());
        let network = format!("{run}_default");
        docker(&[
            "network",
            "create",
            "--label",
            &format!("{RUN_LABEL}={run}"),
            &network,
        ])
        .unwrap();
        World {
            run,
            network,
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// Starts a container of service `s`, named `RUN-SERVICE-1`; returns its ID.
    pub fn start(&self, s: &Svc<'_>) -> String {
        self.start_named(s, &format!("{}-{}-1", self.run, s.service))
    }

    pub fn start_named(&self, s: &Svc<'_>, name: &str) -> String {
        let mut args: Vec<String> = vec!["run", "-d", "--name", name, "--network", &self.network]
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut labels = vec![
            (RUN_LABEL.to_owned(), self.run.clone()),
            ("dso.reloader".to_owned(), "true".to_owned()),
            ("dso.host_ports".to_owned(), s.ports.to_owned()),
            ("dso.update.strategy".to_owned(), s.strategy.to_owned()),
            ("com.docker.compose.project".to_owned(), self.run.clone()),
            ("com.docker.compose.service".to_owned(), s.service.to_owned()),
        ];
        labels.extend(s.extra_labels.iter().map(|(k, v)| (k.to_string(), v.clone())));
        for (k, v) in labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        match s.health_interval {
            Some(i) => {
                args.push(format!("--health-interval={i}"));
                args.push("--health-retries=1".into());
            }
            None => args.push("--no-healthcheck".into()),
        }
        args.extend(s.run_args.iter().cloned());
        args.push(s.image.clone().unwrap_or_else(image));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&a).unwrap()
    }

    /// Every container of this test (running or not): name → (id, running).
    pub fn containers(&self) -> BTreeMap<String, (String, bool)> {
        let out = docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label={RUN_LABEL}={}", self.run),
            "--format",
            "{{.Names}} {{.ID}} {{.State}}",
        ])
        .unwrap();
        out.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((
                    it.next()?.to_owned(),
                    (it.next()?.to_owned(), it.next()? == "running"),
                ))
            })
            .collect()
    }

    /// Containers of one service.
    pub fn service_containers(&self, service: &str) -> BTreeMap<String, (String, bool)> {
        let prefix = format!("{}-{service}-", self.run);
        self.containers()
            .into_iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect()
    }

    pub fn docker(&self, args: &[&str]) -> Result<String, String> {
        docker(args)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state.path().to_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label={RUN_LABEL}={}", self.run),
        ])
        .unwrap_or_default();
        for id in ids.lines() {
            // -v: anonymous volumes of test containers go too.
            let _ = docker(&["rm", "-fv", id]);
        }
        // Extra networks and volumes a test made carry the run label too.
        let label = format!("label={RUN_LABEL}={}", self.run);
        for net in docker(&["network", "ls", "-q", "--filter", &label])
            .unwrap_or_default()
            .lines()
        {
            if docker(&["network", "inspect", "-f", "{{.Name}}", net])
                .ok()
                .as_deref()
                != Some(self.network.as_str())
            {
                let _ = docker(&["network", "rm", net]);
            }
        }
        for vol in docker(&["volume", "ls", "-q", "--filter", &label])
            .unwrap_or_default()
            .lines()
        {
            let _ = docker(&["volume", "rm", "-f", vol]);
        }
        // A container still being torn down keeps the network busy for a moment.
        for attempt in 0..50 {
            match docker(&["network", "rm", &self.network]) {
                Ok(_) => break,
                Err(_) if docker(&["network", "inspect", &self.network]).is_err() => break,
                // Docker 20.10 can keep a stale endpoint after a container was force-removed
                // mid-connect (moby#17217); only a daemon restart clears it. Say so.
                Err(e) if attempt == 49 => eprintln!("warning: test network left behind: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// An agent: its own multi-threaded runtime with a proxy and a rotator. Dropping it drops
/// every task at once, as a killed process would stop.
pub struct Agent {
    pub rt: tokio::runtime::Runtime,
    pub rotator: Rotator<DockerEngine>,
    pub proxy: Proxy,
    pub recovered: Vec<dso_rotator::recovery::Recovered>,
}

impl Agent {
    /// An agent managing only the containers of `world`.
    pub fn start(world: &World) -> Agent {
        Agent::start_in(world.state_dir(), &world.run)
    }

    /// An agent on state directory `state` managing the containers labelled `run`.
    pub fn start_in(state: PathBuf, run: &str) -> Agent {
        Agent::start_with(state, run, |_| {})
    }

    /// Like [`Agent::start_in`], with the rotator's settings adjusted by `adjust`.
    pub fn start_with(state: PathBuf, run: &str, adjust: impl FnOnce(&mut Config)) -> Agent {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (rotator, proxy, recovered) = rt.block_on(async {
            let engine = DockerEngine::connect().await.expect("connect to docker");
            let proxy = Proxy::new(ProxyConfig::default());
            let mut cfg = Config::new(state);
            cfg.scope = Some((RUN_LABEL.to_owned(), run.to_owned()));
            adjust(&mut cfg);
            let (r, rec) = Rotator::start(engine, proxy.clone(), cfg)
                .await
                .expect("rotator start");
            (r, proxy, rec)
        });
        Agent {
            rt,
            rotator,
            proxy,
            recovered,
        }
    }

    /// Starts following Docker events (as the real agent does); stopped with the agent.
    pub fn watch(&self) {
        let r = self.rotator.clone();
        self.rt
            .spawn(async move { r.watch(CancellationToken::new()).await });
    }

    /// The bound address of the service's listener for a container port.
    pub fn addr(&self, service: &dso_rotator::ServiceKey, port: u16) -> SocketAddr {
        self.proxy
            .listener(&dso_rotator::listener_name(service, port))
            .expect("listener of the service")
            .local_addr()
    }

    /// Drops the agent without any shutdown of its own, as SIGKILL would: every task is
    /// dropped where it stands (so its lock files close, as the kernel would close them),
    /// listening sockets included. Returns once that is done.
    pub fn kill(self) {
        self.rt.shutdown_timeout(Duration::from_secs(10));
    }
}

pub fn key(world: &World, service: &str) -> dso_rotator::ServiceKey {
    dso_rotator::ServiceKey {
        project: world.run.clone(),
        service: service.to_owned(),
    }
}

/// One echo exchange through `addr`; returns the instance ID from the greeting.
pub async fn exchange(addr: SocketAddr, msg: &str) -> Result<String, String> {
    let t = Duration::from_secs(15);
    let s = tokio::time::timeout(t, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut greeting = String::new();
    tokio::time::timeout(t, r.read_line(&mut greeting))
        .await
        .map_err(|_| "greeting timed out".to_owned())?
        .map_err(|e| format!("greeting: {e}"))?;
    let id = greeting
        .trim_end()
        .strip_prefix("dso-testsrv ")
        .ok_or_else(|| format!("bad greeting {greeting:?}"))?
        .to_owned();
    w.write_all(format!("{msg}\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = String::new();
    tokio::time::timeout(t, r.read_line(&mut echo))
        .await
        .map_err(|_| "echo timed out".to_owned())?
        .map_err(|e| format!("echo: {e}"))?;
    if echo.trim_end() != msg {
        return Err(format!("echo {echo:?} != {msg:?}"));
    }
    Ok(id)
}

/// Continuous short connections from `clients` tasks until stopped.
pub struct Load {
    stop: CancellationToken,
    pub ok: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<String>>>,
    pub seen: Arc<Mutex<BTreeSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(rt: &tokio::runtime::Handle, addr: SocketAddr, clients: usize) -> Load {
        let stop = CancellationToken::new();
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, ok, failures, seen) = (stop.clone(), ok.clone(), failures.clone(), seen.clone());
                rt.spawn(async move {
                    let mut i = 0u64;
                    while !stop.is_cancelled() {
                        i += 1;
                        match exchange(addr, &format!("c{c}-{i}")).await {
                            Ok(id) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                seen.lock().unwrap().insert(id);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            seen,
            tasks,
        }
    }

    /// Stops the clients and returns (successful exchanges, failures, instance IDs seen).
    pub async fn finish(self) -> (u64, Vec<String>, BTreeSet<String>) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let f = self.failures.lock().unwrap().clone();
        let s = self.seen.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), f, s)
    }
}

/// The greeting of a container is the first 12 characters of its ID (its hostname).
pub fn short(id: &str) -> String {
    id[..12].to_owned()
}
