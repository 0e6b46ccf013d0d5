//! Small round trips on persistent connections: each connection writes `size` bytes, waits
//! for all of them to come back (from `dso-load echo`, directly or through a proxy), and
//! repeats `count` times. A fixed amount of work, so the proxy's CPU time divided by the
//! round trips made is its CPU per round trip.

use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Each round trip must finish within this; a stuck one counts as an error and ends its
/// connection.
const STEP: Duration = Duration::from_secs(5);

pub async fn run(
    target: SocketAddr,
    connections: usize,
    count: u64,
    size: usize,
    label: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(worker(target, count, size)))
        .collect();
    let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    for w in workers {
        let (n, e, h) = w.await?;
        ok += n;
        errors += e;
        lat.add(h)?;
    }
    let secs = started.elapsed().as_secs_f64();
    // One CSV line: label,round_trips,errors,seconds,round_trips_per_s,rt_p50_us,rt_p99_us
    println!(
        "{label},{ok},{errors},{secs:.2},{:.0},{},{}",
        ok as f64 / secs,
        lat.value_at_quantile(0.5),
        lat.value_at_quantile(0.99),
    );
    Ok(())
}

async fn worker(target: SocketAddr, count: u64, size: usize) -> (u64, u64, Histogram<u64>) {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
    let mut s = match tokio::time::timeout(STEP, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => return (0, 1, h),
    };
    if s.set_nodelay(true).is_err() {
        return (0, 1, h);
    }
    let out = vec![b'p'; size];
    let mut back = vec![0u8; size];
    let mut ok = 0;
    for _ in 0..count {
        let start = Instant::now();
        let step = async {
            s.write_all(&out).await?;
            s.read_exact(&mut back).await?;
            std::io::Result::Ok(())
        };
        match tokio::time::timeout(STEP, step).await {
            Ok(Ok(())) if back == out => {
                ok += 1;
                let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                h.saturating_record(us.max(1));
            }
            _ => return (ok, 1, h),
        }
    }
    (ok, 0, h)
}
