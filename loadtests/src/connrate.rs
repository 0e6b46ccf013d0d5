//! Connection rate: each worker connects, sends one byte, waits for it to come back,
//! closes, and starts over, until the time is up.

use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    connect: Option<Histogram<u64>>,
    first_byte: Option<Histogram<u64>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

pub async fn run(target: SocketAddr, seconds: u64, concurrency: usize, label: &str) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(target, end)))
        .collect();
    let mut connect = hist();
    let mut first = hist();
    let (mut ok, mut errors) = (0, 0);
    for w in workers {
        let t = w.await?;
        ok += t.ok;
        errors += t.errors;
        connect.add(t.connect.expect("set"))?;
        first.add(t.first_byte.expect("set"))?;
    }
    let secs = started.elapsed().as_secs_f64();
    // One CSV line: label,conns,errors,seconds,conns_per_s,connect_p50_us,connect_p99_us,
    // ping_p50_us,ping_p99_us
    println!(
        "{label},{ok},{errors},{secs:.2},{:.0},{},{},{},{}",
        ok as f64 / secs,
        connect.value_at_quantile(0.5),
        connect.value_at_quantile(0.99),
        first.value_at_quantile(0.5),
        first.value_at_quantile(0.99),
    );
    Ok(())
}

async fn worker(target: SocketAddr, end: Instant) -> Tally {
    let mut t = Tally {
        connect: Some(hist()),
        first_byte: Some(hist()),
        ..Tally::default()
    };
    while Instant::now() < end {
        let start = Instant::now();
        match once(target, &mut t, start).await {
            Ok(()) => t.ok += 1,
            Err(_) => {
                t.errors += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    t
}

async fn once(target: SocketAddr, t: &mut Tally, start: Instant) -> std::io::Result<()> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await??;
    let connected = start.elapsed();
    s.set_nodelay(true)?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await??;
    let pinged = start.elapsed();
    if &b != b"x" {
        return Err(std::io::Error::other("wrong echo"));
    }
    record(t.connect.as_mut(), connected);
    record(t.first_byte.as_mut(), pinged);
    Ok(())
}

fn record(h: Option<&mut Histogram<u64>>, d: Duration) {
    if let Some(h) = h {
        h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
    }
}
