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
    /// Environment value for the new container (repeatable). Visible in `docker inspect`.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
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
    if !args.env.is_empty() {
        eprintln!(
            "note: --env values become environment variables of the new container, visible to \
             anyone who can run `docker inspect` on this host (see docs/rotation.md)"
        );
    }
    super::runtime()?.block_on(async move {
        let body = json!({ "target": args.target, "strategy": args.strategy, "env": args.env });
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

/// Runs `dso status`.
pub fn status(args: StatusArgs, socket: PathBuf) -> anyhow::Result<()> {
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
        Ok(())
    })
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
