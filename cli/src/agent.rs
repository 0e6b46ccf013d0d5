//! `dso agent`: the long-running process. Loads the config, binds the listeners, serves the
//! control API, and maps signals onto the proxy's shutdown.
//!
//! Signal contract: the first SIGTERM or SIGINT stops accepting and drains with a deadline,
//! then exits 0; a second one closes every connection at once and exits 0 as well (the
//! operator asked for it). The log says which of the two happened.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dso_proxy::Proxy;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::api::{self, State};
use crate::args::AgentArgs;
use crate::config::{self, Config, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_SOCKET};

/// Runs the agent until a signal ends it.
pub fn main(args: AgentArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    if args.upgrade {
        return crate::upgrade::command(&args, socket);
    }
    crate::upgrade::record_start();
    let cfg = config::load(&args.config)?;
    init_logging(cfg.logging.default_filter());
    raise_fd_limit();
    let socket = socket
        .or_else(|| cfg.agent.socket.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let shutdown = args
        .shutdown_timeout
        .map(|d| d.get())
        .or(cfg.agent.shutdown_timeout)
        .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(cfg, &args, &socket, shutdown))
}

/// Each proxied connection takes two file descriptors; the usual soft limit of 1024 would
/// stop an agent near 500 connections. Raise the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// `RUST_LOG`, when set, wins whole; else the file's `logging.level`; else `info`.
fn init_logging(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logwriter::RedactingStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(cfg: Config, args: &AgentArgs, socket: &Path, shutdown: Duration) -> anyhow::Result<()> {
    let path = args.config.as_path();
    // Signal streams first, so a signal that arrives during start-up is not lost.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // SIGHUP reloads the config file (`reload.rs`); installed now, so that one arriving
    // during start-up does not kill the agent (the default action) and is served once ready.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // SIGUSR2: hitless upgrade to the binary the agent was started from (`upgrade.rs`).
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    // Started by an upgrade: the previous agent's sockets and state, before anything binds.
    let mut takeover = crate::upgrade::take_over()?;
    let takeover_started = takeover.is_some();

    api::vault::configure(&cfg);
    let events = crate::events::Bus::new();
    // Before anything is bound (a bad key file changes nothing), and before the Docker side
    // starts, so that recovery's events reach the webhooks too.
    let stop_notify = CancellationToken::new();
    crate::notify::start(&cfg.agent.webhooks, &events, stop_notify.clone())?;
    let proxy = Proxy::new(cfg.proxy.clone());
    // What a reload diffs against: the config as the agent starts from it.
    let reload_base = cfg.clone();
    let mut taken_over = std::collections::HashSet::new();
    if let Some(t) = takeover.as_mut() {
        for (state, fd) in std::mem::take(&mut t.listeners) {
            let name = state.name.clone();
            proxy
                .import(state, fd)
                .with_context(|| format!("taking over listener {name} from the previous agent"))?;
            taken_over.insert(name);
        }
    }
    for l in cfg.listeners {
        if taken_over.contains(&l.name) {
            // Handed over by the previous agent, running on: its socket, route and hold.
            continue;
        }
        let name = l.name.clone();
        proxy
            .add_listener(l)
            .with_context(|| format!("starting listener {name} from {}", path.display()))?;
    }
    crate::reload::install(Arc::new(crate::reload::Reloader::new(
        path,
        proxy.clone(),
        events.clone(),
        reload_base,
    )));
    if let Some(t) = takeover.as_mut() {
        t.accepting()?;
    }
    let docker_on = args.manages_docker();
    // The state directory holds what root acts on later (journals, locks, versions): refuse
    // one that another user could plant a symlink in, before anything is written there.
    if docker_on
        || !cfg.secrets.providers.is_empty()
        || !cfg.secrets.secrets.is_empty()
        || args.state_dir.exists()
    {
        dso_rotator::journal::check_state_dir(&args.state_dir)?;
    }
    let server = match takeover.as_mut().and_then(|t| t.control.take()) {
        Some(l) => api::inherit(l, socket, cfg.agent.socket_group.as_deref())?,
        None => api::bind_with_group(socket, cfg.agent.socket_group.as_deref()).await?,
    };
    api::health::configure(api::health::Expect { docker: docker_on });
    if let Some(file) = &cfg.agent.http.webhook_key_file {
        api::webhook::configure(api::webhook::Webhook::from_file(
            file,
            cfg.agent.http.webhook_tolerance,
        )?);
    }
    let inherited_http = takeover.as_mut().and_then(|t| t.http.take());
    let http = match cfg.agent.http.listen {
        _ if inherited_http.is_some() => {
            let h = api::http::inherit(inherited_http.expect("checked"))?;
            api::health::set_http(api::health::HttpListener::Bound(h.addr()));
            Some(h)
        }
        None => {
            api::health::set_http(api::health::HttpListener::Off);
            None
        }
        Some(addr) => match api::http::bind(addr).await {
            Ok(h) => {
                api::health::set_http(api::health::HttpListener::Bound(h.addr()));
                Some(h)
            }
            // The default address taken (another agent, a test): the agent runs without
            // it, says so, and is not ready. A configured address must bind.
            Err(e) if !cfg.agent.http.explicit => {
                warn!(
                    error = format!("{e:#}"),
                    "HTTP listener not started; /health reports it"
                );
                api::health::set_http(api::health::HttpListener::Failed(format!("{e:#}")));
                None
            }
            Err(e) => return Err(e),
        },
    };
    let stop_api = CancellationToken::new();
    let stop_docker = CancellationToken::new();
    // Ends the retries of a Docker side still waiting for its engine when shutdown begins.
    let stop_docker_retry = CancellationToken::new();
    // Delivery needs both sides: secrets to deliver (configured `secrets:`, or providers
    // that containers' `dso.refs` labels and `dso up` name) and Docker to deliver them to.
    let delivery = if docker_on && (!cfg.secrets.secrets.is_empty() || !cfg.secrets.providers.is_empty()) {
        Some(crate::delivery::open(&cfg.agent.delivery, &cfg.secrets)?)
    } else {
        None
    };
    let stop_secrets = CancellationToken::new();
    let secrets = crate::secrets::Secrets::start(
        &cfg.secrets,
        &args.state_dir,
        stop_secrets.clone(),
        events.clone(),
    )?;
    // The Docker Swarm secret driver (`swarm:`, docs/swarm.md): its socket, its rotation.
    let stop_swarm = CancellationToken::new();
    let swarm = match &cfg.swarm {
        Some(settings) => Some(
            crate::swarm::start(
                takeover_started,
                settings.clone(),
                secrets.clone(),
                &cfg.secrets,
                events.clone(),
                stop_swarm.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let docker = if docker_on {
        // The delivery wiring follows the Docker side whenever it starts: at once when the
        // engine answers, or at the retry that finds it.
        let wiring = (
            secrets.clone(),
            delivery.clone(),
            cfg.secrets.clone(),
            stop_secrets.clone(),
        );
        let on_ready = move |docker: Arc<crate::docker::Docker>| {
            let (secrets, delivery, secrets_cfg, stop) = wiring;
            if let (Some(secrets), Some(delivery)) = (secrets, delivery) {
                crate::delivery::Deliverer::start(secrets, docker, delivery, secrets_cfg, stop);
            }
        };
        crate::docker::DockerSlot::start(
            crate::docker::StartParams {
                proxy: proxy.clone(),
                state_dir: args.state_dir.clone(),
                scope: args.docker_scope.clone(),
                delivery: delivery.clone().map(|d| (d, cfg.agent.delivery.remote)),
                events: events.clone(),
            },
            stop_docker.clone(),
            stop_docker_retry.clone(),
            on_ready,
        )
        .await
    } else {
        crate::docker::DockerSlot::off()
    };
    let state_docker = docker.clone();
    let state = State {
        proxy: proxy.clone(),
        started: Instant::now(),
        docker,
        secrets,
        events: events.clone(),
    };
    // What a hitless upgrade hands over (`upgrade.rs`), gathered before the servers start.
    let handover = crate::upgrade::Handover {
        proxy: proxy.clone(),
        control_path: socket.to_owned(),
        control: server.socket().context("duplicating the control socket")?,
        http: match &http {
            Some(h) => Some((h.addr(), h.socket().context("duplicating the HTTP listener")?)),
            None => None,
        },
        docker: state_docker.clone(),
    };
    let handed_over = (
        server.handover_token(),
        http.as_ref().map(api::http::HttpServer::handover_token),
    );
    let (upgrades, mut upgrade_requests) = tokio::sync::mpsc::unbounded_channel();
    api::upgrade::configure(upgrades);
    let http_addr = http.as_ref().map(|h| h.addr().to_string());
    let http_task = http.map(|h| tokio::spawn(h.serve(state.clone(), stop_api.clone())));
    let api_task = tokio::spawn(server.serve(state, stop_api.clone()));
    info!(
        config = %path.display(),
        socket = %socket.display(),
        http = http_addr.as_deref().unwrap_or("off"),
        listeners = proxy.listeners().len(),
        pid = std::process::id(),
        "agent ready"
    );
    // systemd (`Type=notify`): the listeners and the control socket are bound, so the unit
    // is started now and `systemctl start` returns.
    notify(&crate::sdnotify::ready_message(&format!(
        "serving {} listener(s); control socket {}",
        proxy.listeners().len(),
        socket.display()
    )));
    if let Some(t) = takeover {
        let from = t.from_pid;
        t.ready()?;
        info!(
            from_pid = from,
            "took over from the previous agent, which now drains and exits"
        );
    }

    let first = loop {
        let request = tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the config file");
                if let Some(r) = crate::reload::get() {
                    // A task, so that a signal to stop is not kept waiting by a reload.
                    tokio::spawn(async move { r.reload("SIGHUP").await });
                }
                continue;
            }
            _ = usr2.recv() => crate::upgrade::Request {
                binary: None,
                ready_timeout: crate::upgrade::DEFAULT_READY_TIMEOUT,
                reply: None,
            },
            Some(r) = upgrade_requests.recv() => r,
        };
        if crate::upgrade::serve_request(&handover, request).await {
            break "upgrade";
        }
    };
    if first == "upgrade" {
        // The new agent serves every socket: stop accepting (the sockets stay open in it,
        // the control socket's file stays), stop the Docker, secret and delivery sides and
        // the event streams now, then drain. systemd already follows the new MAINPID.
        info!(deadline = ?shutdown, "handed over: stopped accepting; draining open connections, then exiting");
        handed_over.0.cancel();
        if let Some(t) = &handed_over.1 {
            t.cancel();
        }
        stop_docker_retry.cancel();
        stop_docker.cancel();
        stop_secrets.cancel();
        // The new agent's driver socket is already at the path (renamed over this one's);
        // this one stops rotating Swarm services now and leaves the file alone.
        stop_swarm.cancel();
        stop_notify.cancel();
        events.close();
    } else {
        info!(signal = first, deadline = ?shutdown, "shutting down gracefully; send the signal again to force");
        notify(&crate::sdnotify::stopping_message(&format!(
            "{first}: draining connections for up to {shutdown:?}"
        )));
    }
    // Order: refuse new rotations and route changes (the API answers 409 from here on),
    // let running rotations finish while connections drain, both within the deadline;
    // then stop the Docker watcher and the API.
    stop_docker_retry.cancel();
    let rotations = {
        let docker = state_docker.ready();
        async move {
            match docker {
                Some(d) => d.finish(shutdown).await,
                None => 0,
            }
        }
    };
    let graceful = async { tokio::join!(proxy.shutdown(shutdown), rotations) };
    tokio::pin!(graceful);
    tokio::select! {
        (report, unfinished) = &mut graceful => {
            if report.drained {
                info!(took_ms = report.took_ms, "every connection finished; exiting");
            } else {
                warn!(took_ms = report.took_ms, forced = report.forced, "shutdown deadline passed; remaining connections were closed");
            }
            if unfinished > 0 {
                warn!(rotations = unfinished, "rotations still running at the shutdown deadline; the next agent start finishes them from the journal");
            }
        }
        second = async { tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" } } => {
            let open = proxy.snapshot().listeners.iter().map(|l| l.counters.active + l.counters.held).sum::<u64>();
            warn!(signal = second, connections = open, "second signal: closing every connection now");
            proxy.force_close();
        }
    }
    // Ends the event streams (`GET /v1/events`), so their connections close.
    events.close();
    stop_notify.cancel();
    stop_api.cancel();
    stop_docker.cancel();
    stop_secrets.cancel();
    stop_swarm.cancel();
    if let Some(d) = swarm {
        d.stopped().await;
    }
    let _ = api_task.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    Ok(())
}

/// Tells systemd (when it started us with `$NOTIFY_SOCKET`) about a state change; a failure
/// is logged, never fatal: the agent serves whether or not its supervisor hears it.
fn notify(state: &str) {
    match crate::sdnotify::notify(state) {
        Ok(true) => info!(state = %state.lines().next().unwrap_or(""), "told systemd"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)"),
    }
}
