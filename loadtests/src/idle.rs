//! Idle connections: open `count`, check each echoes one byte through the proxy, then
//! keep them open and quiet so the proxy's memory per idle connection can be read.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

pub async fn run(target: SocketAddr, count: usize, ready: &Path, hold_seconds: u64) -> anyhow::Result<()> {
    // Open at most 256 at a time, so the accept queues never overflow.
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut s = TcpStream::connect(target).await?;
            s.write_all(b"i").await?;
            let mut b = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
            anyhow::Ok(s)
        }));
    }
    let mut open = Vec::with_capacity(count);
    for t in tasks {
        open.push(t.await?.context("opening an idle connection")?);
    }
    if open.len() != count {
        bail!("opened {} of {count}", open.len());
    }
    std::fs::write(ready, format!("{count}\n"))?;
    println!("ready {count}");
    tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
    drop(open);
    Ok(())
}
