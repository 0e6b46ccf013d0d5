//! `dso watch`: the agent's live events (`GET /v1/events`, server-sent events), one line
//! per event, human or `--json`.
//!
//! No reconnect: when the agent goes away the stream ends and the command exits 1 saying
//! so (a restarted agent numbers its events from 1 again, so a silent reconnect would hide
//! the gap); a script that wants to follow across restarts loops on it. SIGINT exits 0.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use crate::client::{ApiFailure, Unreachable};

/// `dso watch` options.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Print each event as one JSON object per line (the event as the agent sent it:
    /// `seq`, `unix_ms`, `kind`, `data`).
    #[arg(long)]
    pub json: bool,
    /// Only these kinds or kind prefixes, comma-separated or repeated (`rotation`,
    /// `secret.changed`, `provider`, `delivery`, `docker`).
    #[arg(long, value_name = "KIND,...", value_delimiter = ',')]
    pub kinds: Vec<String>,
}

/// One message of the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// `id:`, when sent.
    pub id: Option<String>,
    /// `event:` (`message` when absent, as in the SSE specification).
    pub event: String,
    /// The `data:` lines joined by newlines.
    pub data: String,
}

/// Splits a byte stream into SSE messages as it arrives. Comment lines (`:`) and unknown
/// fields are skipped; CRLF line ends are accepted.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// Adds bytes; returns the messages they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let block: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let text = String::from_utf8_lossy(&block);
            let mut m = Message::default();
            let mut data: Vec<&str> = Vec::new();
            let mut any = false;
            for line in text.lines() {
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => m.id = Some(value.to_owned()),
                    "event" => m.event = value.to_owned(),
                    "data" => data.push(value),
                    _ => continue,
                }
                any = true;
            }
            if any {
                m.data = data.join("\n");
                if m.event.is_empty() {
                    m.event = "message".to_owned();
                }
                out.push(m);
            }
        }
        out
    }
}

/// Where the first blank line (`\n\n` or `\r\n\r\n`) starts, and its separator's length.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// An open event stream from the agent.
pub struct Stream {
    body: Incoming,
    parser: Parser,
    ready: std::collections::VecDeque<Message>,
}

impl Stream {
    /// Opens `GET /v1/events[?kinds=...]` on the agent's socket.
    pub async fn open(socket: &Path, kinds: &[String]) -> anyhow::Result<Stream> {
        let stream = UnixStream::connect(socket).await.map_err(|source| Unreachable {
            path: socket.to_owned(),
            source,
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("starting HTTP on the control socket")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut path = "/v1/events".to_owned();
        let kinds: Vec<&str> = kinds.iter().map(|k| k.trim()).filter(|k| !k.is_empty()).collect();
        if !kinds.is_empty() {
            let list = kinds.join(",");
            path = format!("{path}?kinds={}", crate::client::path_segment(&list));
        }
        let req = Request::builder()
            .uri(&path)
            .header("host", "localhost")
            .header("accept", "text/event-stream")
            .body(Empty::<Bytes>::new())
            .context("building request")?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("GET {path} on {}", socket.display()))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| match status {
                    StatusCode::NOT_FOUND => {
                        "this agent has no GET /v1/events (an older version?)".to_owned()
                    }
                    _ => String::from_utf8_lossy(&bytes).trim().to_owned(),
                });
            return Err(ApiFailure { status, message }.into());
        }
        Ok(Stream {
            body: resp.into_body(),
            parser: Parser::default(),
            ready: Default::default(),
        })
    }

    /// The next message; `None` when the agent ended the stream (or the connection broke:
    /// at shutdown the agent may close it before the stream's last chunk).
    pub async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                None => return Ok(None),
                // The agent closing the connection at shutdown may cut the last chunk.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "event stream broke");
                    return Ok(None);
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.ready.extend(self.parser.feed(&data));
                    }
                }
            }
        }
    }
}

/// The error when the agent ends the stream.
pub fn agent_gone(socket: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "the agent at {} ended the event stream (it stopped or restarted); run the command again once it is back",
        socket.display()
    )
}

/// One event as the agent sends it.
#[derive(Debug, Deserialize)]
pub struct Event {
    /// Unix ms.
    pub unix_ms: u64,
    /// Kind.
    pub kind: String,
    /// Fields.
    pub data: serde_json::Value,
}

/// Runs `dso watch`.
pub fn run(args: WatchArgs, socket: PathBuf) -> anyhow::Result<()> {
    super::runtime()?.block_on(async move {
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        let mut stream = Stream::open(&socket, &args.kinds).await?;
        let mut out = std::io::stdout().lock();
        loop {
            let m = tokio::select! {
                _ = int.recv() => return Ok(()),
                m = stream.next() => m?,
            };
            let Some(m) = m else {
                return Err(agent_gone(&socket));
            };
            if m.event == "lagged" {
                let missed = serde_json::from_str::<serde_json::Value>(&m.data)
                    .ok()
                    .and_then(|v| v.get("missed").and_then(serde_json::Value::as_u64));
                match missed {
                    Some(n) => eprintln!("warning: {n} events were missed (this client fell behind)"),
                    None => eprintln!("warning: some events were missed"),
                }
                continue;
            }
            let line = if args.json {
                m.data.clone()
            } else {
                match serde_json::from_str::<Event>(&m.data) {
                    Ok(e) => human(&e),
                    Err(_) => format!("{} {}", m.event, super::table::printable(&m.data)),
                }
            };
            // A closed stdout (`dso watch | head`) ends the command quietly.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
        }
    })
}

/// `HH:MM:SS` (UTC) of Unix milliseconds.
pub fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// One human line: time, kind, then the kind's fields in words.
pub fn human(e: &Event) -> String {
    let d = &e.data;
    let f = |k: &str| -> String {
        match d.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => "-".to_owned(),
            Some(v) => v.to_string(),
        }
    };
    let secs = |k: &str| {
        d.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
    };
    let short = |id: String| id.chars().take(12).collect::<String>();
    let text = match e.kind.as_str() {
        "rotation.started" => {
            let strategy = d
                .get("strategy")
                .and_then(|s| s.as_str())
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            format!(
                "{} #{} {} rotation{strategy}",
                f("service"),
                f("id"),
                f("trigger")
            )
        }
        "rotation.step" => format!(
            "{} {} ({}) {}",
            f("service"),
            f("step").replace('_', " "),
            secs("elapsed_ms").unwrap_or_default(),
            f("detail")
        ),
        "rotation.succeeded" => {
            let containers: Vec<String> = d
                .get("containers")
                .and_then(|c| c.as_array())
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            let g = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
                            format!("{} {} -> {}", g("name"), short(g("old_id")), short(g("new_id")))
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{} #{} in {}: {}",
                f("service"),
                f("id"),
                secs("took_ms").unwrap_or_default(),
                containers.join(", ")
            )
        }
        "rotation.failed" | "rotation.rolled_back" => {
            let rb = if d.get("rolled_back").and_then(|v| v.as_bool()) == Some(true) {
                " (rolled back: the old container serves)"
            } else {
                ""
            };
            format!("{} #{}{rb}: {}", f("service"), f("id"), f("error"))
        }
        "rotation.recovered" => format!(
            "{} rotation {} interrupted at {}: survivor {}",
            f("service"),
            f("rotation"),
            f("interrupted_at"),
            short(f("survivor"))
        ),
        "secret.changed" => format!(
            "{} {} ({}) version {} -> {}",
            f("secret"),
            f("key"),
            f("reference"),
            f("old_version"),
            f("new_version")
        ),
        "provider.down" => format!("{}: {}", f("provider"), f("error")),
        "provider.up" => f("provider"),
        "delivery.failed" => format!("{} #{}: {}", f("service"), f("id"), f("error")),
        "delivery.held" => format!(
            "{} holds versions {} that failed before (`dso rotate {} --force` retries)",
            f("service"),
            f("versions"),
            f("service")
        ),
        "docker.container" => {
            let health = d
                .get("health")
                .and_then(|h| h.as_str())
                .map(|h| format!(" {h}"))
                .unwrap_or_default();
            format!(
                "{} {} {}{health} ({})",
                f("service"),
                f("name"),
                f("action"),
                short(f("container"))
            )
        }
        _ => d.to_string(),
    };
    super::table::printable(&format!("{} {} {text}", clock(e.unix_ms), e.kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_joins_split_reads_and_skips_comments() {
        let mut p = Parser::default();
        assert!(p.feed(b": keep-alive\n\nid: 3\nevent: rota").is_empty());
        let m = p.feed(b"tion.step\ndata: {\"a\":1}\n\nevent: lagged\r\ndata: {}\r\n\r\n");
        assert_eq!(
            m,
            vec![
                Message {
                    id: Some("3".into()),
                    event: "rotation.step".into(),
                    data: "{\"a\":1}".into()
                },
                Message {
                    id: None,
                    event: "lagged".into(),
                    data: "{}".into()
                },
            ]
        );
        assert!(p.feed(b"data: x\n").is_empty());
        assert_eq!(p.feed(b"data: y\n\n")[0].data, "x\ny");
    }

    #[test]
    fn the_parser_reads_what_the_agent_frames() {
        let e = crate::events::Event {
            seq: 9,
            unix_ms: 3_723_000,
            kind: "rotation.step".into(),
            data: serde_json::json!({ "service": "shop/web", "step": "green_started", "elapsed_ms": 1200, "detail": "started" }),
        };
        let bytes = crate::api::events::frame(&e);
        let mut p = Parser::default();
        let m = p.feed(&bytes);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].id.as_deref(), Some("9"));
        let back: Event = serde_json::from_str(&m[0].data).unwrap();
        assert_eq!(
            human(&back),
            "01:02:03 rotation.step shop/web green started (1.2s) started"
        );
    }

    #[test]
    fn human_lines_name_the_fields() {
        let e = Event {
            unix_ms: 0,
            kind: "secret.changed".into(),
            data: serde_json::json!({ "secret": "db", "key": "password", "reference": "local:app/db", "old_version": null, "new_version": "2" }),
        };
        assert_eq!(
            human(&e),
            "00:00:00 secret.changed db password (local:app/db) version - -> 2"
        );
    }
}
