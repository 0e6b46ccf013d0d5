//! `dso doctor [--level full] [--json]`: a list of checks of this host's setup, each with a
//! status (ok, warn, fail, skipped), what it found and the fix. Exit code 1 when a check
//! failed. The basic level is local and quick (files, sockets, the engine, Compose, the
//! local vault); `--level full` adds what may be slow or leave the host (remote providers).
//!
//! Checks run in the order of [`run_checks`]; each is one function from the gathered
//! [`Context`] to one or more [`Check`]s.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::config::{self, Config, DEFAULT_SOCKET};

/// The oldest engine API dso supports (Docker Engine 20.10).
const MIN_API: (u32, u32) = (1, 41);
/// Clock skew above which HMAC webhooks and AWS signatures start failing.
const MAX_SKEW: Duration = Duration::from_secs(30);
/// Deadline of one engine or agent request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one `docker compose version` / `docker-compose version`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// The config file used when `--config` is not given and it exists.
const SYSTEM_CONFIG: &str = "/etc/dso/dso.yaml";

/// `dso doctor` options.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Config file [default: /etc/dso/dso.yaml when it exists, else ./dso.yaml].
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The agent's state directory (journal, locks, versions).
    #[arg(
        long,
        env = "DSO_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/dso"
    )]
    pub state_dir: PathBuf,
    /// `basic` (local and quick) or `full` (also every remote provider: metadata calls only).
    #[arg(long, value_enum, default_value_t = Level::Basic)]
    pub level: Level,
    /// Print `{"ok": bool, "checks": [{"name", "status", "found", "fix"}]}`.
    #[arg(long)]
    pub json: bool,
}

/// How far the doctor looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// Local checks only: files, sockets, the engine, Compose, the local vault.
    Basic,
    /// Also the remote providers (Vault, AWS, Azure, plugins), metadata calls only.
    Full,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Works, but something is off (does not fail the run).
    Warn,
    /// Broken: dso will not work as configured.
    Fail,
    /// Not checked (not relevant here, or needs something that failed first).
    Skipped,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skipped => "skipped",
        }
    }
}

/// One check's report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, e.g. `docker engine`.
    pub name: String,
    /// Its outcome.
    pub status: Status,
    /// What was found (versions, paths, modes, the error).
    pub found: String,
    /// What to do about it; empty when nothing is to be done.
    pub fix: String,
}

fn check(name: &str, status: Status, found: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        status,
        found: found.into(),
        fix: fix.into(),
    }
}

/// What `--json` prints.
#[derive(Serialize)]
struct Report<'a> {
    /// No check failed.
    ok: bool,
    checks: &'a [Check],
}

/// What the checks look at, gathered once.
struct Context {
    level: Level,
    config_path: PathBuf,
    /// Why this config path (given, or which default).
    config_origin: &'static str,
    config: Result<Config, String>,
    socket: PathBuf,
    state_dir: PathBuf,
    engine_url: String,
    /// `GET /version` of the engine.
    engine_version: Result<serde_json::Value, String>,
}

/// Runs `dso doctor`.
pub fn run(args: DoctorArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        let ctx = gather(&args, socket).await;
        let checks = run_checks(&ctx).await;
        let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
        if args.json {
            let report = Report {
                ok: failed == 0,
                checks: &checks,
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_text(&ctx, &checks);
        }
        if failed > 0 {
            anyhow::bail!("{failed} check(s) failed; see the fix under each");
        }
        Ok(())
    })
}

async fn gather(args: &DoctorArgs, socket: Option<PathBuf>) -> Context {
    let (config_path, config_origin) = match &args.config {
        Some(p) => (p.clone(), "given with --config"),
        None if Path::new(SYSTEM_CONFIG).exists() => (PathBuf::from(SYSTEM_CONFIG), "the default"),
        None => (
            PathBuf::from("dso.yaml"),
            "the default: there is no /etc/dso/dso.yaml",
        ),
    };
    let config = config::load(&config_path).map_err(|e| format!("{:#}", anyhow::Error::new(e)));
    let socket = socket
        .or_else(|| config.as_ref().ok().and_then(|c| c.agent.socket.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let engine_url = crate::docker::engine_address();
    let engine_version = engine_get(&engine_url, "/version").await;
    Context {
        level: args.level,
        config_path,
        config_origin,
        config,
        socket,
        state_dir: args.state_dir.clone(),
        engine_url,
        engine_version,
    }
}

/// Every check, in the order shown. The ones that wait on something else (a program, a
/// socket, a provider) run at the same time; `docker-compose version` alone takes seconds.
async fn run_checks(ctx: &Context) -> Vec<Check> {
    let (clock, compose, sockets, providers) = tokio::join!(
        clock_check(ctx),
        compose_check(),
        socket_checks(ctx),
        provider_checks(ctx)
    );
    let mut out = vec![config_check(ctx), engine_check(ctx), clock, compose];
    out.extend(sockets);
    out.push(tmpfs_check(ctx));
    out.push(launcher_check(ctx));
    out.push(state_dir_check(ctx));
    // Checks of managed services go here (one `out.push` each), e.g. a service that a
    // plain `docker compose up` recreated without its secrets.
    out.extend(providers);
    out
}

fn print_text(ctx: &Context, checks: &[Check]) {
    println!(
        "dso doctor: level {}, config {} ({})",
        match ctx.level {
            Level::Basic => "basic (add --level full for remote providers)",
            Level::Full => "full",
        },
        ctx.config_path.display(),
        ctx.config_origin
    );
    for c in checks {
        println!(
            "  {:<8} {:<18} {}",
            c.status.word(),
            c.name,
            super::table::printable(&c.found)
        );
        if !c.fix.is_empty() {
            println!("  {:<8} {:<18} fix: {}", "", "", super::table::printable(&c.fix));
        }
    }
    let count = |s| checks.iter().filter(|c| c.status == s).count();
    println!(
        "{} ok, {} warning(s), {} failed, {} skipped",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skipped)
    );
}

// ---- config ----

fn config_check(ctx: &Context) -> Check {
    let path = ctx.config_path.display();
    match &ctx.config {
        Ok(c) => check(
            "config",
            Status::Ok,
            format!(
                "{path} ({}): valid; {} listener(s), {} provider(s), {} secret(s), mode {}",
                ctx.config_origin,
                c.listeners.len(),
                c.secrets.providers.len(),
                c.secrets.secrets.len(),
                c.secrets.mode.as_str()
            ),
            "",
        ),
        Err(e) if !ctx.config_path.exists() => check(
            "config",
            Status::Fail,
            format!("{e} ({})", ctx.config_origin),
            format!(
                "create it (`dso setup` writes {SYSTEM_CONFIG}; docs/config.md) or give the agent's file with --config"
            ),
        ),
        Err(e) => check(
            "config",
            Status::Fail,
            format!("{e} ({}; the agent refuses to start on it)", ctx.config_origin),
            format!(
                "edit {path} at the key and line named (docs/config.md), then `dso config validate {path}`; \
                 or give another file with --config"
            ),
        ),
    }
}

fn skipped_without_config(name: &str) -> Check {
    check(
        name,
        Status::Skipped,
        "the config file did not load (see config)",
        "",
    )
}

// ---- the engine ----

fn engine_check(ctx: &Context) -> Check {
    let fix_unreachable = format!(
        "start the engine (systemctl start docker) or point DOCKER_HOST at it (now {}); \
         an agent started meanwhile serves its listeners and retries",
        ctx.engine_url
    );
    let v = match &ctx.engine_version {
        Ok(v) => v,
        Err(e) => {
            return check(
                "docker engine",
                Status::Fail,
                format!("no answer at {}: {e}", ctx.engine_url),
                fix_unreachable,
            );
        }
    };
    let version = v["Version"].as_str().unwrap_or("?");
    let api = v["ApiVersion"].as_str().unwrap_or("?");
    let found = format!("Engine {version}, API {api} at {}", ctx.engine_url);
    match parse_api(api) {
        Some(a) if a >= MIN_API => check("docker engine", Status::Ok, found, ""),
        Some(_) => check(
            "docker engine",
            Status::Fail,
            format!("{found}: older than API {}.{}", MIN_API.0, MIN_API.1),
            "upgrade the engine to Docker 20.10 or newer (API 1.41)",
        ),
        None => check(
            "docker engine",
            Status::Fail,
            format!("{found}: the API version does not parse"),
            "check that DOCKER_HOST points at a Docker engine",
        ),
    }
}

fn parse_api(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

async fn clock_check(ctx: &Context) -> Check {
    if ctx.engine_version.is_err() {
        return check(
            "clock",
            Status::Skipped,
            "the engine does not answer (see docker engine); nothing to compare with",
            "",
        );
    }
    let info = match engine_get(&ctx.engine_url, "/info").await {
        Ok(i) => i,
        Err(e) => return check("clock", Status::Warn, format!("engine info: {e}"), ""),
    };
    let local = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let Some(engine) = info["SystemTime"].as_str().and_then(parse_rfc3339) else {
        return check(
            "clock",
            Status::Warn,
            format!("the engine's SystemTime {} does not parse", info["SystemTime"]),
            "",
        );
    };
    let skew = local - engine;
    let found = format!(
        "this host's clock is {:.1} s {} the engine's ({})",
        skew.abs(),
        if skew >= 0.0 { "ahead of" } else { "behind" },
        ctx.engine_url
    );
    if skew.abs() > MAX_SKEW.as_secs_f64() {
        check(
            "clock",
            Status::Warn,
            found,
            "synchronise both clocks (timedatectl set-ntp true, chrony); HMAC webhooks and AWS signatures are refused beyond a few minutes of skew",
        )
    } else {
        check("clock", Status::Ok, found, "")
    }
}

/// `GET path` on the engine at `url` (`unix://PATH`, `tcp://HOST:PORT`, `http://HOST:PORT`).
async fn engine_get(url: &str, path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = if let Some(p) = url.strip_prefix("unix://") {
        let s = tokio::time::timeout(HTTP_TIMEOUT, tokio::net::UnixStream::connect(p))
            .await
            .map_err(|_| "no connection within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        http_get(s, path).await?
    } else if let Some(hp) = url.strip_prefix("tcp://").or_else(|| url.strip_prefix("http://")) {
        let hp = hp.trim_end_matches('/');
        let s = tokio::time::timeout(HTTP_TIMEOUT, tokio::net::TcpStream::connect(hp))
            .await
            .map_err(|_| "no connection within 5 s".to_owned())?
            .map_err(|e| e.to_string())?;
        http_get(s, path).await?
    } else {
        return Err("unsupported DOCKER_HOST; use unix:///PATH or tcp://HOST:PORT".to_owned());
    };
    if !status.is_success() {
        return Err(format!("GET {path}: HTTP {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: not JSON: {e}"))
}

/// One HTTP/1.1 `GET` on a connected stream, bounded by [`HTTP_TIMEOUT`].
async fn http_get<S>(stream: S, path: &str) -> Result<(StatusCode, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within 5 s"))?
}

/// Seconds since the epoch of an RFC 3339 time such as `2026-12-01T22:40:00.123456789Z`
/// or `...+01:00`.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut d = date.splitn(3, '-');
    let (y, mo, da): (i64, u32, u32) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (clock, offset) = match time.find(['Z', 'z', '+', '-']) {
        Some(i) => time.split_at(i),
        None => return None,
    };
    let offset_s = match offset {
        "Z" | "z" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let (h, m) = o[1..].split_once(':')?;
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)
        }
    };
    let mut c = clock.splitn(3, ':');
    let (h, mi): (i64, i64) = (c.next()?.parse().ok()?, c.next()?.parse().ok()?);
    let sec: f64 = c.next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let days = days_from_civil(y, mo, da);
    Some((days * 86_400 + h * 3600 + mi * 60 - offset_s) as f64 + sec)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---- Compose ----

async fn compose_check() -> Check {
    let (v2, v1) = tokio::join!(
        command_version("docker", &["compose", "version"]),
        command_version("docker-compose", &["version"])
    );
    let show = |r: &Result<String, String>| match r {
        Ok(v) => v.clone(),
        Err(e) => format!("not found ({e})"),
    };
    let found = format!(
        "v2 (docker compose): {}; v1 (docker-compose): {}",
        show(&v2),
        show(&v1)
    );
    match (v2.is_ok(), v1.is_ok()) {
        (true, true) => check("compose", Status::Ok, found, ""),
        (true, false) => check(
            "compose",
            Status::Warn,
            found,
            "only needed for projects run with --compose v1: apt-get install docker-compose",
        ),
        (false, true) => check(
            "compose",
            Status::Warn,
            found,
            "Compose v1 works; for v2 install the plugin: copy the static docker-compose v2 binary to ~/.docker/cli-plugins/docker-compose (or /usr/local/lib/docker/cli-plugins/)",
        ),
        (false, false) => check(
            "compose",
            Status::Fail,
            found,
            "`dso up` needs Compose: install the v2 plugin (~/.docker/cli-plugins/docker-compose) or v1 (apt-get install docker-compose)",
        ),
    }
}

/// The first line of `program args...` when it succeeds.
async fn command_version(program: &str, args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(COMMAND_TIMEOUT, run)
        .await
        .map_err(|_| format!("`{program} {}` gave no answer within 15 s", args.join(" ")))?
        .map_err(|e| format!("{program}: {e}"))?;
    let first = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    if out.status.success() {
        Ok(first(&out.stdout))
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            first(&out.stderr)
        ))
    }
}

// ---- the agent's socket ----

async fn socket_checks(ctx: &Context) -> Vec<Check> {
    let path = &ctx.socket;
    let shown = path.display();
    let local_mode = ctx
        .config
        .as_ref()
        .is_ok_and(|c| c.secrets.mode == dso_secrets::config::Mode::Local);
    let start_fix = format!(
        "start the agent: systemctl start dso-agent (after `dso setup`), or `dso agent --config {}`; \
         or point to its socket with --socket / DSO_SOCKET",
        ctx.config_path.display()
    );
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && local_mode => {
            return vec![
                check(
                    "agent socket",
                    Status::Skipped,
                    format!("no socket at {shown}; mode: local needs no agent"),
                    "",
                ),
                check("agent", Status::Skipped, "mode: local: no agent expected", ""),
            ];
        }
        Err(e) => {
            return vec![
                check("agent socket", Status::Fail, format!("{shown}: {e}"), start_fix),
                check("agent", Status::Skipped, "no socket (see agent socket)", ""),
            ];
        }
    };
    let mut out = Vec::new();
    if !meta.file_type().is_socket() {
        out.push(check(
            "agent socket",
            Status::Fail,
            format!("{shown} is not a socket"),
            format!("remove it and start the agent, or choose another --socket; {start_fix}"),
        ));
    } else {
        out.push(socket_mode_check(ctx, path, &meta));
    }
    let agent = agent_check(path, &start_fix).await;
    let docker_ready = agent.status == Status::Ok && agent.found.contains("docker: ready");
    out.push(agent);
    if docker_ready {
        out.push(compose_services_check(path).await);
    }
    out
}

/// The `dso up` services the agent follows: any that a plain `docker compose up` recreated
/// without dso's override (so without its secrets) fails, with the fix the agent gives.
async fn compose_services_check(path: &Path) -> Check {
    const NAME: &str = "compose services";
    let answer = match tokio::net::UnixStream::connect(path).await {
        Ok(stream) => http_get(stream, "/v1/compose/services").await,
        Err(e) => Err(e.to_string()),
    };
    let list = match answer {
        Ok((s, body)) if s.is_success() => {
            match serde_json::from_slice::<serde_json::Value>(&body)
                .map(|v| v["services"].as_array().cloned())
            {
                Ok(Some(l)) => l,
                Ok(None) => {
                    return check(
                        NAME,
                        Status::Warn,
                        "GET /v1/compose/services: no services list",
                        "",
                    );
                }
                Err(e) => {
                    return check(
                        NAME,
                        Status::Warn,
                        format!("GET /v1/compose/services: not JSON: {e}"),
                        "",
                    );
                }
            }
        }
        Ok((s, _)) => {
            return check(
                NAME,
                Status::Warn,
                format!("GET /v1/compose/services: HTTP {s}"),
                "",
            );
        }
        Err(e) => return check(NAME, Status::Warn, format!("GET /v1/compose/services: {e}"), ""),
    };
    let broken: Vec<&serde_json::Value> = list
        .iter()
        .filter(|s| s["state"] == "recreated_without_override")
        .collect();
    if broken.is_empty() {
        return check(
            NAME,
            Status::Ok,
            format!(
                "{} service(s) started by `dso up`, each with dso's override",
                list.len()
            ),
            "",
        );
    }
    let names: Vec<&str> = broken.iter().filter_map(|s| s["service"].as_str()).collect();
    let fixes: Vec<&str> = broken.iter().filter_map(|s| s["message"].as_str()).collect();
    check(
        NAME,
        Status::Fail,
        format!(
            "recreated by a plain `docker compose up`, without their secrets: {}",
            names.join(", ")
        ),
        fixes.join("; "),
    )
}

fn socket_mode_check(ctx: &Context, path: &Path, meta: &std::fs::Metadata) -> Check {
    let mode = meta.permissions().mode() & 0o7777;
    let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
    let found = format!(
        "{} mode {mode:04o}, owner uid {}, group {group}",
        path.display(),
        meta.uid()
    );
    let wanted = ctx
        .config
        .as_ref()
        .ok()
        .and_then(|c| c.agent.socket_group.clone())
        .unwrap_or_else(|| "dso".to_owned());
    if mode & 0o007 != 0 {
        return check(
            "agent socket",
            Status::Fail,
            format!("{found}: other users can reach the agent (it acts as root on Docker)"),
            format!(
                "chmod 0660 {} (the agent sets 0660 when it creates the socket: restart it)",
                path.display()
            ),
        );
    }
    if mode != 0o660 {
        return check(
            "agent socket",
            Status::Warn,
            format!("{found}; the agent creates it 0660"),
            format!(
                "chmod 0660 {} or restart the agent, so members of group {wanted} can use it",
                path.display()
            ),
        );
    }
    if group != wanted {
        let exists = group_id(&wanted).is_some();
        let fix = if exists {
            format!("restart the agent (it sets group {wanted}), or set agent.api.socket_group")
        } else {
            format!(
                "groupadd --system {wanted} (dso setup does it) and restart the agent, so non-root users in {wanted} can use dso"
            )
        };
        let why = if exists {
            format!("; expected group {wanted}")
        } else {
            format!("; group {wanted} does not exist on this host: only root can use the agent")
        };
        return check("agent socket", Status::Warn, format!("{found}{why}"), fix);
    }
    check("agent socket", Status::Ok, found, "")
}

async fn agent_check(path: &Path, start_fix: &str) -> Check {
    let stream = match tokio::net::UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return check(
                "agent",
                Status::Fail,
                format!("cannot connect to {}: {e}", path.display()),
                "join the socket's group (usermod -aG dso $USER, then log in again) or run as root",
            );
        }
        Err(e) => {
            return check(
                "agent",
                Status::Fail,
                format!(
                    "no agent answers at {}: {e} (a socket left by an agent that is gone?)",
                    path.display()
                ),
                start_fix,
            );
        }
    };
    let health = match http_get(stream, "/v1/health").await {
        Ok((s, body)) if s.is_success() => serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| format!("GET /v1/health: not JSON: {e}")),
        Ok((s, _)) => Err(format!("GET /v1/health: HTTP {s}")),
        Err(e) => Err(e),
    };
    let h = match health {
        Ok(h) => h,
        Err(e) => {
            return check(
                "agent",
                Status::Fail,
                format!("{}: {e}", path.display()),
                "restart the agent (systemctl restart dso-agent); its log says more (journalctl -u dso-agent)",
            );
        }
    };
    let found = format!(
        "dso {} pid {}, up {} s, {} listener(s)",
        h["version"].as_str().unwrap_or("?"),
        h["pid"],
        h["uptime_ms"].as_u64().unwrap_or(0) / 1000,
        h["listeners"]
    );
    let docker = &h["docker"];
    match docker["state"].as_str() {
        Some("ready") => check(
            "agent",
            Status::Ok,
            format!(
                "{found}; docker: ready (API {})",
                docker["api"].as_str().unwrap_or("?")
            ),
            "",
        ),
        Some("off") => check(
            "agent",
            Status::Ok,
            format!("{found}; docker: off (--no-docker)"),
            "",
        ),
        Some(_) => check(
            "agent",
            Status::Warn,
            format!(
                "{found}; docker: {}",
                docker["message"].as_str().unwrap_or("not started")
            ),
            "start the engine or fix DOCKER_HOST in the agent's environment; the agent retries on its own",
        ),
        None => check("agent", Status::Ok, found, ""),
    }
}

/// `/etc/group` lookups (the socket's group by id, and whether a group exists).
fn group_lines() -> Vec<(String, u32)> {
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_owned();
            let gid = f.nth(1)?.parse().ok()?;
            Some((name, gid))
        })
        .collect()
}

fn group_name(gid: u32) -> Option<String> {
    group_lines().into_iter().find(|(_, g)| *g == gid).map(|(n, _)| n)
}

fn group_id(name: &str) -> Option<u32> {
    group_lines().into_iter().find(|(n, _)| n == name).map(|(_, g)| g)
}

// ---- delivery: the tmpfs and the launcher ----

/// The ramfs magic number (`statfs(2)`; nix names tmpfs's but not this one).
const RAMFS_MAGIC: i64 = 0x8584_58f6;

fn tmpfs_check(ctx: &Context) -> Check {
    const NAME: &str = "delivery tmpfs";
    let Ok(cfg) = &ctx.config else {
        return skipped_without_config(NAME);
    };
    let d = &cfg.agent.delivery;
    let root = d.root.display();
    if cfg.secrets.secrets.is_empty() {
        return check(
            NAME,
            Status::Skipped,
            format!("no `secrets:` in the config; nothing is delivered (agent.delivery.root {root})"),
            "",
        );
    }
    let agent_runs = std::os::unix::net::UnixStream::connect(&ctx.socket).is_ok();
    let mount_fix = format!(
        "mount one: mount -t tmpfs -o mode=0700,size={}m tmpfs {root} (or let the agent do it: agent.delivery.mount_tmpfs: true); never point agent.delivery.root at a disk directory",
        d.size_bytes >> 20
    );
    use nix::sys::statfs::{self, FsType};
    match statfs::statfs(&d.root) {
        Ok(st) => {
            let kind = st.filesystem_type();
            let ramfs = kind == FsType(RAMFS_MAGIC as _);
            let raw = kind.0;
            if kind == statfs::TMPFS_MAGIC || ramfs {
                let size = st.blocks() * st.block_size() as u64;
                check(
                    NAME,
                    Status::Ok,
                    format!(
                        "agent.delivery.root {root} is a {} ({} MiB)",
                        if ramfs { "ramfs" } else { "tmpfs" },
                        size >> 20
                    ),
                    "",
                )
            } else {
                let found = format!(
                    "agent.delivery.root {root} is not a tmpfs (file system type {raw:#x}): values would be written to a disk"
                );
                if d.mount_tmpfs && !agent_runs {
                    check(
                        NAME,
                        Status::Warn,
                        format!("{found}; the agent mounts a tmpfs there when it starts (mount_tmpfs: true)"),
                        "start the agent and run the doctor again",
                    )
                } else {
                    check(NAME, Status::Fail, found, mount_fix)
                }
            }
        }
        Err(nix::errno::Errno::ENOENT) if d.mount_tmpfs => check(
            NAME,
            Status::Warn,
            format!(
                "agent.delivery.root {root} does not exist; the agent creates it and mounts a tmpfs there when it starts"
            ),
            if agent_runs {
                "the agent runs but has not created it: it does when it manages Docker and delivers secrets (not with --no-docker)"
            } else {
                ""
            },
        ),
        Err(e) => check(
            NAME,
            Status::Fail,
            format!("agent.delivery.root {root}: {e}"),
            mount_fix,
        ),
    }
}

fn launcher_check(ctx: &Context) -> Check {
    const NAME: &str = "launcher";
    let Ok(cfg) = &ctx.config else {
        return skipped_without_config(NAME);
    };
    let d = &cfg.agent.delivery;
    let needed = !cfg.secrets.secrets.is_empty();
    if !needed && d.launcher.is_none() {
        return check(
            NAME,
            Status::Skipped,
            "no `secrets:` in the config; the launcher (dso-init) is not used",
            "",
        );
    }
    let broken = if needed { Status::Fail } else { Status::Warn };
    let build_fix = "install the static launcher: `dso setup` copies it to /usr/lib/dso/dso-init \
                     (or build it: .ci/build-static-init.sh) and set agent.delivery.launcher to its path";
    let Some(path) = d.launcher_path() else {
        return check(
            NAME,
            broken,
            "agent.delivery.launcher is not set and no dso-init is next to dso or at /usr/lib/dso/dso-init",
            build_fix,
        );
    };
    let shown = path.display();
    let key = if d.launcher.is_some() {
        "agent.delivery.launcher"
    } else {
        "launcher (default path)"
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return check(NAME, broken, format!("{key} {shown}: {e}"), build_fix),
    };
    if !meta.is_file() {
        return check(NAME, broken, format!("{key} {shown} is not a file"), build_fix);
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return check(
            NAME,
            broken,
            format!(
                "{key} {shown} is not executable (mode {:04o})",
                meta.permissions().mode() & 0o7777
            ),
            format!("chmod 0755 {shown}"),
        );
    }
    match elf_interpreter(&path) {
        Ok(None) => check(
            NAME,
            Status::Ok,
            format!("{key} {shown}: static ELF executable, {} bytes", meta.len()),
            "",
        ),
        Ok(Some(interp)) => check(
            NAME,
            broken,
            format!(
                "{key} {shown} is dynamically linked (interpreter {interp}): it cannot run in an image without that loader (FROM scratch, alpine)"
            ),
            build_fix,
        ),
        Err(e) => check(NAME, broken, format!("{key} {shown}: {e}"), build_fix),
    }
}

/// The ELF program interpreter (`PT_INTERP`) of `path`: `None` for a static executable.
fn elf_interpreter(path: &Path) -> Result<Option<String>, String> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h[..52])
        .map_err(|_| "not an ELF file (too short)".to_owned())?;
    if &h[..4] != b"\x7fELF" {
        return Err("not an ELF executable".to_owned());
    }
    let is64 = match h[4] {
        1 => false,
        2 => true,
        c => return Err(format!("unknown ELF class {c}")),
    };
    let le = h[5] == 1;
    if is64 {
        f.read_exact(&mut h[52..64]).map_err(|e| e.to_string())?;
    }
    let u16_at = |b: &[u8], o: usize| {
        let v = [b[o], b[o + 1]];
        if le {
            u16::from_le_bytes(v)
        } else {
            u16::from_be_bytes(v)
        }
    };
    let u32_at = |b: &[u8], o: usize| {
        let v = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        if le {
            u64::from_le_bytes(v)
        } else {
            u64::from_be_bytes(v)
        }
    };
    let (phoff, phentsize, phnum) = if is64 {
        (u64_at(&h, 0x20), u16_at(&h, 0x36), u16_at(&h, 0x38))
    } else {
        (u64::from(u32_at(&h, 0x1c)), u16_at(&h, 0x2a), u16_at(&h, 0x2c))
    };
    let entsize = usize::from(phentsize);
    if entsize < if is64 { 56 } else { 32 } {
        return Err("ELF program header entries too short".to_owned());
    }
    f.seek(SeekFrom::Start(phoff)).map_err(|e| e.to_string())?;
    let mut table = vec![0u8; entsize * usize::from(phnum)];
    f.read_exact(&mut table)
        .map_err(|_| "ELF program headers cut short".to_owned())?;
    for ph in table.chunks(entsize) {
        if u32_at(ph, 0) != PT_INTERP {
            continue;
        }
        let (offset, size) = if is64 {
            (u64_at(ph, 0x08), u64_at(ph, 0x20))
        } else {
            (u64::from(u32_at(ph, 0x04)), u64::from(u32_at(ph, 0x10)))
        };
        let mut name = vec![0u8; usize::try_from(size.min(4096)).unwrap_or(4096)];
        f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        f.read_exact(&mut name).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&name).trim_end_matches('\0').to_owned();
        return Ok(Some(text));
    }
    Ok(None)
}

// ---- the state directory ----

fn state_dir_check(ctx: &Context) -> Check {
    const NAME: &str = "state directory";
    let dir = &ctx.state_dir;
    let shown = dir.display();
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check(
                NAME,
                Status::Warn,
                format!("{shown} does not exist; the agent creates it (mode 0700) at its first start"),
                "",
            );
        }
        Err(e) => {
            return check(
                NAME,
                Status::Fail,
                format!("{shown}: {e}"),
                "fix the path or its parent's permissions, or choose another --state-dir",
            );
        }
    };
    let found = format!(
        "{shown}: owner uid {}, mode {:04o}",
        meta.uid(),
        meta.permissions().mode() & 0o7777
    );
    // The directory exists, so the check creates nothing; it refuses what the agent refuses.
    match dso_rotator::journal::check_state_dir(dir) {
        Ok(()) => check(NAME, Status::Ok, format!("{found}; journal checks pass"), ""),
        Err(e) => check(
            NAME,
            Status::Fail,
            format!("{found}: {e}"),
            "the agent refuses to start on it; apply the fix named",
        ),
    }
}

// ---- providers ----

async fn provider_checks(ctx: &Context) -> Vec<Check> {
    use dso_secrets::ProviderKind;
    let Ok(cfg) = &ctx.config else {
        return vec![skipped_without_config("providers")];
    };
    let used = config::used_providers(&cfg.secrets);
    if cfg.secrets.providers.is_empty() {
        return vec![check(
            "providers",
            Status::Skipped,
            "no `providers:` in the config",
            "",
        )];
    }
    let mut out = Vec::new();
    // The basic level stays on this host: the local vault. Everything else leaves it or
    // runs a program, so it waits for --level full.
    let mut scoped = cfg.secrets.clone();
    scoped
        .providers
        .retain(|p| ctx.level == Level::Full || p.kind() == ProviderKind::Local);
    let outcomes = super::config::check(&scoped).await;
    for p in &cfg.secrets.providers {
        let name = format!("provider {}", p.name);
        let kind = p.kind();
        if !used.contains(&p.name.as_str()) {
            out.push(check(
                &name,
                Status::Skipped,
                format!("type {kind}: no secret uses it"),
                "",
            ));
            continue;
        }
        if !scoped.providers.iter().any(|s| s.name == p.name) {
            out.push(check(
                &name,
                Status::Skipped,
                format!("type {kind}: remote; checked with --level full (metadata calls only)"),
                "",
            ));
            continue;
        }
        let mine: Vec<_> = outcomes.iter().filter(|o| o.provider() == p.name).collect();
        let failed: Vec<_> = mine.iter().filter(|o| !o.ok()).collect();
        if failed.is_empty() {
            out.push(check(
                &name,
                Status::Ok,
                format!(
                    "type {kind}: reachable and authorized; {} reference(s) have a version (metadata only)",
                    mine.len()
                ),
                "",
            ));
            continue;
        }
        let first = failed[0];
        let fix = match first.failure() {
            Some(super::config::Failure::Missing(_)) => {
                "create the value (`dso secret set NAME` for the local vault) or fix the reference in `secrets:`"
            }
            Some(super::config::Failure::Forbidden(_)) => {
                "give the provider's credentials read access to the secrets' metadata (AWS: secretsmanager:DescribeSecret; Vault: read on the KV metadata path; Azure: secrets/get)"
            }
            Some(super::config::Failure::Unreachable(_)) => {
                "check the provider's address in the config, the network and that the provider runs; `dso config validate --check-providers FILE` repeats the check"
            }
            _ => {
                "fix the provider's settings in the config (docs/secrets.md); `dso config validate --check-providers FILE` repeats the check"
            }
        };
        out.push(check(
            &name,
            Status::Fail,
            format!(
                "type {kind}: {} of {} reference(s) failed; first: {first}",
                failed.len(),
                mine.len()
            ),
            fix,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_epoch_seconds() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339("2026-12-01T22:40:00Z"), Some(1_796_164_800.0));
        let nanos = parse_rfc3339("2026-12-01T22:40:00.5Z").unwrap();
        assert!((nanos - 1_796_164_800.5).abs() < 1e-6);
        assert_eq!(
            parse_rfc3339("2026-12-01T23:40:00+01:00"),
            parse_rfc3339("2026-12-01T22:40:00Z")
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
    }

    #[test]
    fn api_versions_compare_numerically() {
        assert!(parse_api("1.41").unwrap() >= MIN_API);
        assert!(parse_api("1.9").unwrap() < MIN_API);
        assert!(parse_api("1.100").unwrap() > MIN_API);
        assert_eq!(parse_api("x"), None);
    }

    /// The test binary itself is dynamically linked (its PT_INTERP names the loader);
    /// a file that is not ELF is an error, not "static".
    #[test]
    fn the_elf_interpreter_is_found() {
        let me = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&me).unwrap();
        assert!(interp.as_deref().is_some_and(|i| i.contains("ld-")), "{interp:?}");
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
        assert!(elf_interpreter(&text).unwrap_err().contains("not an ELF"));
    }
}
