//! `dso rotate` and `dso status`: rotations of managed containers through the agent.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use dso_rotator::{RotationReport, ServiceStatus};
use serde::Deserialize;
use serde_json::json;

use crate::client::Client;

/// `dso rotate` options.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Service (`project/service` or `service`) or container name or ID.
    pub target: String,
    /// rolling, restart, signal, none or auto [default: the container's dso.update.strategy].
    #[arg(long, value_name = "STRATEGY")]
    pub strategy: Option<String>,
    /// Refused with a usage error when it carries a value: values on the command line are
    /// visible in /proc/PID/cmdline and shell history. Use --env-file.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", hide = true)]
    pub env: Vec<String>,
    /// Environment values for the new container, `KEY=VALUE` lines (`#` comments and blank
    /// lines skipped); `-` reads them from stdin. Visible in `docker inspect`.
    #[arg(long = "env-file", value_name = "FILE|-")]
    pub env_file: Option<PathBuf>,
    /// Read the service's secrets from their providers now and deliver the current values
    /// (the rotation follows as for a change).
    #[arg(long)]
    pub refresh: bool,
    /// Like --refresh, and also retry versions whose rotation failed before.
    #[arg(long)]
    pub force: bool,
    /// Print the final report as JSON instead of the steps.
    #[arg(long)]
    pub json: bool,
}

/// `dso status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print the status again whenever the agent reports an event (a rotation step, a
    /// secret change, a Docker event...), until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Deserialize)]
struct Accepted {
    id: String,
}

#[derive(Debug, Deserialize)]
struct Step {
    step: String,
    elapsed_ms: u64,
    detail: String,
}

#[derive(Debug, Deserialize)]
struct Tracked {
    state: String,
    steps: Vec<Step>,
    report: Option<RotationReport>,
    error: Option<String>,
}

/// Runs `dso rotate`: starts the rotation, prints each step as the agent reports it, and
/// ends with the total time. Exits non-zero when the rotation failed or was rolled back.
pub fn rotate(args: RotateArgs, socket: PathBuf) -> anyhow::Result<()> {
    let client = Client::new(&socket);
    if let Some(e) = args.env.first() {
        usage(format!(
            "--env {}=...: values on the command line are visible in /proc/PID/cmdline and shell history; put KEY=VALUE lines in a file and pass --env-file FILE (or --env-file - to read them from stdin)",
            e.split('=').next().unwrap_or_default()
        ));
    }
    let env = match &args.env_file {
        None => Vec::new(),
        Some(p) => read_env_file(p)?,
    };
    if args.refresh || args.force {
        if !env.is_empty() || args.strategy.is_some() {
            usage(
                "--refresh/--force deliver the providers' current values with the service's own strategy; leave out --env-file and --strategy"
                    .to_owned(),
            );
        }
        return super::runtime()?.block_on(async move {
            let body = json!({ "target": args.target, "refresh": true, "force": args.force });
            let v: serde_json::Value = client.post("/v1/rotations", &body).await?;
            println!(
                "{}",
                v.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("providers are read now")
            );
            Ok(())
        });
    }
    if !env.is_empty() {
        eprintln!(
            "note: --env values become environment variables of the new container, visible to \
             anyone who can run `docker inspect` on this host (see docs/rotation.md)"
        );
    }
    super::runtime()?.block_on(async move {
        let body = json!({ "target": args.target, "strategy": args.strategy, "env": env });
        let accepted: Accepted = client.post("/v1/rotations", &body).await?;
        let path = format!("/v1/rotations/{}", accepted.id);
        let mut shown = 0;
        loop {
            let t: Tracked = client.get(&path).await?;
            if !args.json {
                for s in &t.steps[shown..] {
                    println!("{:>7} ms  {:<14} {}", s.elapsed_ms, s.step, s.detail);
                }
                shown = t.steps.len();
            }
            match t.state.as_str() {
                "running" => tokio::time::sleep(Duration::from_millis(100)).await,
                "done" => {
                    let r = t.report.expect("a done rotation has a report");
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&r)?);
                    } else {
                        for c in &r.containers {
                            let serving = c.serving_after_ms.map_or(String::new(), |ms| {
                                format!(", new container serving after {ms} ms")
                            });
                            println!(
                                "{} ({}): {} -> {}{serving}",
                                c.name,
                                c.strategy,
                                short(&c.old_id),
                                short(&c.new_id)
                            );
                        }
                        if !r.env.is_empty() {
                            println!("environment set: {}", r.env.join(", "));
                        }
                        if r.requests > 1 {
                            println!("one rotation answered {} merged requests", r.requests);
                        }
                        println!("total {} ms", r.took_ms);
                    }
                    return Ok(());
                }
                _ => anyhow::bail!("rotation failed: {}", t.error.unwrap_or_default()),
            }
        }
    })
}

/// A usage error: printed like clap's own, exit 2.
fn usage(message: String) -> ! {
    clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{message}\n")).exit()
}

/// `KEY=VALUE` lines of an env file (`-`: stdin); `#` comments and blank lines skipped.
/// Errors name the line, never its value.
fn read_env_file(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use std::io::Read;
    let mut text = String::new();
    if path == std::path::Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("--env-file -: reading stdin: {e}"))?;
    } else {
        text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--env-file {}: {e}", path.display()))?;
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let ok = l.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty()
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !k.starts_with(|c: char| c.is_ascii_digit())
        });
        if !ok {
            usage(format!(
                "--env-file {} line {}: expected KEY=VALUE with KEY made of letters, digits and _",
                path.display(),
                i + 1
            ));
        }
        out.push(l.to_owned());
    }
    Ok(out)
}

/// Runs `dso status` (`--watch`: [`status_watch`]).
pub fn status(args: StatusArgs, socket: PathBuf) -> anyhow::Result<()> {
    if args.watch {
        return status_watch(args.json, socket);
    }
    let client = Client::new(&socket);
    super::runtime()?.block_on(async move {
        if args.json {
            let v: serde_json::Value = client.get("/v1/services").await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let services: Vec<ServiceStatus> = client.get("/v1/services").await?;
        println!(
            "{:<28} {:<9} {:<24} {:<36} LAST ROTATION",
            "SERVICE", "STRATEGY", "PORTS", "CONTAINER"
        );
        for s in services {
            let last = s.last.map_or("-".to_owned(), |h| {
                let ago = dso_rotator::journal::now_ms().saturating_sub(h.started_at_ms) / 1000;
                format!("{} {}s ago, took {} ms", h.result, ago, h.took_ms)
            });
            let container = if s.rotating {
                format!("{} (rotating)", s.containers.join(","))
            } else {
                s.containers.join(",")
            };
            println!(
                "{:<28} {:<9} {:<24} {:<36} {last}",
                s.service.to_string(),
                s.strategy.to_string(),
                s.ports.join(","),
                container
            );
            if let Some(e) = &s.error {
                println!("  error: {e}");
            }
        }
        // Secret delivery, when the agent delivers any (an older agent has no endpoint).
        if let Ok(d) = client.get::<DeliveryList>("/v1/delivery").await
            && !d.services.is_empty()
        {
            println!(
                "\n{:<28} {:<24} {:>9} {:>6}  LAST ERROR",
                "SERVICE", "SECRETS", "DELIVERED", "FAILED"
            );
            for s in d.services {
                let held = if s.failed_versions.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (holding: {} failed version(s); `dso rotate {} --force` retries)",
                        s.failed_versions.len(),
                        s.service
                    )
                };
                println!(
                    "{:<28} {:<24} {:>9} {:>6}  {}{held}",
                    super::table::printable(&s.service),
                    super::table::printable(&s.secrets.join(",")),
                    s.delivered,
                    s.failed,
                    super::table::printable(s.last_error.as_deref().unwrap_or("-")),
                );
            }
        }
        Ok(())
    })
}

/// What the event thread of `dso status --watch` tells the printing loop.
enum Tick {
    /// An event arrived.
    Event,
    /// Ctrl-C.
    Quit,
    /// The stream ended or broke.
    Gone(anyhow::Error),
}

/// `dso status --watch`: prints the status, then again after each burst of events (once
/// it has been quiet for 300 ms, at most 2 s after its first event), until Ctrl-C (exit 0)
/// or until the agent stops (exit 1). The events are read on a thread of their own; each
/// print is a plain `dso status`.
fn status_watch(json: bool, socket: PathBuf) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use std::sync::mpsc::RecvTimeoutError;
    const DEBOUNCE: Duration = Duration::from_millis(300);
    const MAX_WAIT: Duration = Duration::from_secs(2);
    // Opened before the first print, so no event between the two is missed.
    let rt = super::runtime()?;
    let mut stream = rt.block_on(super::watch::Stream::open(&socket, &[]))?;
    let mut int = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) })
        .map_err(|e| anyhow::anyhow!("installing the SIGINT handler: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let gone_socket = socket.clone();
    std::thread::spawn(move || {
        rt.block_on(async move {
            loop {
                let tick = tokio::select! {
                    _ = int.recv() => Tick::Quit,
                    m = stream.next() => match m {
                        Ok(Some(_)) => Tick::Event,
                        Ok(None) => Tick::Gone(super::watch::agent_gone(&gone_socket)),
                        Err(e) => Tick::Gone(e),
                    },
                };
                let last = !matches!(tick, Tick::Event);
                if tx.send(tick).is_err() || last {
                    return;
                }
            }
        });
    });
    let tty = std::io::stdout().is_terminal();
    loop {
        if tty {
            // Home and clear: the table replaces the previous one.
            print!("\x1b[H\x1b[2J");
        } else {
            println!("--- {} UTC", super::watch::clock(dso_rotator::journal::now_ms()));
        }
        status(StatusArgs { json, watch: false }, socket.clone())?;
        match rx.recv() {
            Ok(Tick::Event) => {}
            Ok(Tick::Gone(e)) => return Err(e),
            Ok(Tick::Quit) | Err(_) => return Ok(()),
        }
        let deadline = std::time::Instant::now() + MAX_WAIT;
        loop {
            let wait = DEBOUNCE.min(deadline.saturating_duration_since(std::time::Instant::now()));
            if wait.is_zero() {
                break;
            }
            match rx.recv_timeout(wait) {
                Ok(Tick::Event) => {}
                Ok(Tick::Gone(e)) => return Err(e),
                Ok(Tick::Quit) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
    }
}

/// `GET /v1/delivery`.
#[derive(Debug, Deserialize)]
struct DeliveryList {
    services: Vec<DeliveryRow>,
}

#[derive(Debug, Deserialize)]
struct DeliveryRow {
    service: String,
    secrets: Vec<String>,
    delivered: u64,
    failed: u64,
    #[serde(default)]
    failed_versions: std::collections::BTreeMap<String, String>,
    last_error: Option<String>,
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
