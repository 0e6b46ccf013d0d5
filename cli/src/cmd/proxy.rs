//! `dso proxy status|swap|pause|resume`: thin calls to the agent's control API.

use std::path::PathBuf;

use dso_proxy::{DrainStatus, ProxySnapshot};
use serde::Deserialize;
use serde_json::json;

use crate::args::{BackendArg, ProxyCommand};
use crate::client::Client;
use crate::duration::{HumanDuration, format_ms};

/// Answer of swap and resume, as the agent sends it.
#[derive(Debug, Deserialize)]
struct SwapReply {
    generation: u64,
    previous: u64,
    drain: Option<DrainStatus>,
}

/// Runs a `dso proxy` command against the agent at `socket`.
pub fn run(cmd: ProxyCommand, socket: PathBuf) -> anyhow::Result<()> {
    let client = Client::new(&socket);
    super::runtime()?.block_on(async move {
        match cmd {
            ProxyCommand::Status { json } => status(&client, json).await,
            ProxyCommand::Swap {
                listener,
                addrs,
                drain,
                wait,
            } => swap(&client, &listener, &addrs, drain, wait).await,
            ProxyCommand::Pause { listener, max } => pause(&client, &listener, max).await,
            ProxyCommand::Resume { listener, addrs } => resume(&client, &listener, &addrs).await,
        }
    })
}

async fn status(client: &Client, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        let v: serde_json::Value = client.get("/v1/proxy").await?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let snap: ProxySnapshot = client.get("/v1/proxy").await?;
        print!("{}", super::table::render(&snap));
    }
    Ok(())
}

async fn swap(
    client: &Client,
    listener: &str,
    addrs: &[BackendArg],
    drain: Option<HumanDuration>,
    wait: bool,
) -> anyhow::Result<()> {
    let mut body = json!({ "backends": backends(addrs), "wait": wait });
    if let Some(d) = drain {
        body["drain"] = json!(d.to_string());
    }
    let r: SwapReply = client.post(&listener_path(listener, "swap"), &body).await?;
    println!(
        "{listener}: generation {} now serves {}; generation {} draining",
        r.generation,
        list(addrs),
        r.previous
    );
    match r.drain {
        Some(DrainStatus::Drained(d)) => println!(
            "{listener}: generation {} drained in {}, {} connection(s) forced",
            d.generation,
            format_ms(d.took_ms),
            d.forced
        ),
        Some(DrainStatus::Pending {
            generation,
            active,
            remaining_ms,
        }) => anyhow::bail!(
            "{listener}: generation {generation} has not drained yet: {active} connection(s) open, \
             {} until its deadline",
            format_ms(remaining_ms)
        ),
        Some(DrainStatus::Current { generation }) => {
            anyhow::bail!("{listener}: generation {generation} is unexpectedly current again")
        }
        None => {}
    }
    Ok(())
}

async fn pause(client: &Client, listener: &str, max: Option<HumanDuration>) -> anyhow::Result<()> {
    let body = match max {
        Some(m) => json!({ "max": m.to_string() }),
        None => json!({}),
    };
    let r: serde_json::Value = client.post(&listener_path(listener, "pause"), &body).await?;
    let max_ms = r["max_ms"].as_u64().unwrap_or_default();
    println!(
        "{listener}: paused; new connections are held for up to {} (resume with `dso proxy resume {listener}`)",
        format_ms(max_ms)
    );
    Ok(())
}

async fn resume(client: &Client, listener: &str, addrs: &[BackendArg]) -> anyhow::Result<()> {
    let body = if addrs.is_empty() {
        json!({})
    } else {
        json!({ "backends": backends(addrs) })
    };
    let r: SwapReply = client.post(&listener_path(listener, "resume"), &body).await?;
    if r.generation == r.previous {
        println!("{listener}: forwarding (generation {})", r.generation);
    } else {
        println!(
            "{listener}: forwarding to {} (generation {}; generation {} draining)",
            list(addrs),
            r.generation,
            r.previous
        );
    }
    Ok(())
}

fn listener_path(listener: &str, op: &str) -> String {
    format!(
        "/v1/proxy/listeners/{}/{op}",
        crate::client::path_segment(listener)
    )
}

fn backends(addrs: &[BackendArg]) -> serde_json::Value {
    addrs
        .iter()
        .map(|b| match &b.label {
            Some(l) => json!({ "addr": b.addr, "label": l }),
            None => json!(b.addr),
        })
        .collect()
}

fn list(addrs: &[BackendArg]) -> String {
    addrs
        .iter()
        .map(|b| b.addr.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
