//! `dso debug echo-server`: a backend for trying dso on a machine with nothing else.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::args::DebugCommand;

/// Runs a `dso debug` command.
pub fn run(cmd: DebugCommand) -> anyhow::Result<()> {
    match cmd {
        DebugCommand::EchoServer { addr, name } => super::runtime()?.block_on(echo(addr, name)),
    }
}

/// Greets each client with `hello from NAME\n`, then echoes every byte until EOF.
async fn echo(addr: SocketAddr, name: Option<String>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding echo server on {addr}"))?;
    let bound = listener.local_addr()?;
    let name = name.unwrap_or_else(|| bound.to_string());
    eprintln!("echo server {name} listening on {bound}");
    let greeting = format!("hello from {name}\n");
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let (mut stream, _) = accepted.context("accepting")?;
        let greeting = greeting.clone();
        tokio::spawn(async move {
            if stream.write_all(greeting.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}
