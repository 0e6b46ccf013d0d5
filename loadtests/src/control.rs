//! The proxy driver: one dso listener plus a line-based control port on loopback.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use dso_proxy::{Backend, Listener, ListenerConfig, Proxy, ProxyConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What `dso-load proxy` was asked to run.
pub struct Options {
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
    pub drain_ms: u64,
    pub hold_max_ms: u64,
    pub control: SocketAddr,
    pub events: PathBuf,
    pub max_seconds: u64,
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    if !o.control.ip().is_loopback() {
        bail!("the control port must be on loopback, not {}", o.control);
    }
    let proxy = Proxy::new(ProxyConfig::default());
    let mut cfg = ListenerConfig::new(
        "load",
        o.listen,
        o.backends.iter().copied().map(Backend::new).collect(),
    );
    cfg.drain_timeout = Duration::from_millis(o.drain_ms);
    cfg.hold_max = Duration::from_millis(o.hold_max_ms);
    let listener = proxy.add_listener(cfg)?;
    let control = TcpListener::bind(o.control)
        .await
        .with_context(|| format!("binding control port {}", o.control))?;
    let mut events =
        std::fs::File::create(&o.events).with_context(|| format!("creating {}", o.events.display()))?;
    writeln!(events, "epoch_us,event,detail")?;
    log(&mut events, "start", &format!("{}", listener.local_addr()))?;
    let deadline = tokio::time::sleep(Duration::from_secs(o.max_seconds));
    tokio::pin!(deadline);
    loop {
        let (stream, _) = tokio::select! {
            r = control.accept() => r?,
            () = &mut deadline => { log(&mut events, "timeout", "")?; break; }
        };
        let (r, mut w) = stream.into_split();
        let mut line = String::new();
        // A peer that connects and leaves (a port probe) is not a command.
        if BufReader::new(r).read_line(&mut line).await.unwrap_or(0) == 0 {
            continue;
        }
        let line = line.trim();
        let (reply, quit) = match handle(&listener, line, &mut events).await {
            Ok(Some(reply)) => (reply, false),
            Ok(None) => ("ok quit".to_owned(), true),
            Err(e) => (format!("error {e:#}"), false),
        };
        // The command ran whether or not its caller is still there to read the reply.
        let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
        let _ = w.shutdown().await;
        if quit {
            break;
        }
    }
    let report = proxy.shutdown(Duration::from_secs(1)).await;
    log(&mut events, "stop", &format!("forced={}", report.forced))?;
    Ok(())
}

/// Runs one control command; `None` means quit.
async fn handle(l: &Listener, line: &str, events: &mut std::fs::File) -> anyhow::Result<Option<String>> {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let reply = match cmd {
        "swap" => {
            let addrs = words.next().context("swap needs ADDR[,ADDR...]")?;
            let backends = addrs
                .split(',')
                .map(|a| a.parse().map(Backend::new))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("bad address list {addrs}"))?;
            let drain = words
                .next()
                .map(|d| d.parse().map(Duration::from_millis))
                .transpose()?;
            let s = l.swap(backends, drain)?;
            log(events, "swap", &format!("{addrs} generation={}", s.generation))?;
            format!("ok generation {}", s.generation)
        }
        "pause" => {
            let max = words
                .next()
                .map(|d| d.parse().map(Duration::from_millis))
                .transpose()?;
            let m = l.pause(max);
            log(events, "pause", &format!("max_ms={}", m.as_millis()))?;
            "ok paused".to_owned()
        }
        "resume" => {
            let s = l.resume(None, None)?;
            log(events, "resume", &format!("generation={}", s.generation))?;
            "ok resumed".to_owned()
        }
        "stats" => serde_json::to_string(&l.snapshot())?,
        "quit" => return Ok(None),
        other => bail!("unknown command {other:?}"),
    };
    Ok(Some(reply))
}

fn log(events: &mut std::fs::File, event: &str, detail: &str) -> anyhow::Result<()> {
    let us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
    writeln!(events, "{us},{event},{detail}")?;
    events.flush()?;
    Ok(())
}
