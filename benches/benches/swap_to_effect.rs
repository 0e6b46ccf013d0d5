//! Swap-to-effect on loopback: from the `Listener::swap` call to the first new connection
//! reaching the new backend.
//!
//! - `swap_then_first_connection`: swap to the other backend, connect a client to the
//!   listener, stop the clock when the new backend's `accept` returns. This includes one
//!   full connection setup through the proxy (client connect, proxy accept, route load,
//!   backend dial); `connect_no_swap` measures that setup alone, so the difference is
//!   what the swap itself adds.
//! - `held_connection_dialed_after_swap`: a client is already accepted and held (listener
//!   paused); the clock runs from the swap call to the new backend's `accept`. This is the
//!   restart-with-hold path, without the client's own connect in the figure.
//!
//! The measuring loop runs as a task on the runtime's workers, like the agent's own
//! control calls, so no extra thread hop is counted.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use dso_benches::ReportingBackend;
use dso_proxy::Listener;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

type Backends = Arc<Mutex<(ReportingBackend, ReportingBackend)>>;

#[derive(Clone, Copy)]
enum Mode {
    Swap,
    NoSwap,
    Held,
}

/// Runs `iters` measured rounds of `mode` and returns their total time.
async fn rounds(listener: Listener, backends: Backends, mode: Mode, iters: u64) -> Duration {
    let mut guard = backends.lock().await;
    let (blue, green) = &mut *guard;
    let addr = listener.local_addr();
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let on_green = listener.snapshot().backends[0].addr == green.addr;
        let (current, other) = if on_green {
            (&mut *green, &mut *blue)
        } else {
            (&mut *blue, &mut *green)
        };
        match mode {
            Mode::Swap => {
                let start = Instant::now();
                listener.swap(vec![other.backend()], None).expect("swap");
                let client = TcpStream::connect(addr).await.expect("connect");
                let reached = other.accepts.recv().await.expect("accept on the new backend");
                total += reached - start;
                drop(client);
            }
            Mode::NoSwap => {
                let start = Instant::now();
                let client = TcpStream::connect(addr).await.expect("connect");
                let reached = current.accepts.recv().await.expect("accept");
                total += reached - start;
                drop(client);
            }
            Mode::Held => {
                listener.pause(Some(Duration::from_secs(10)));
                let client = TcpStream::connect(addr).await.expect("connect");
                // Wait until the proxy has accepted it and holds it.
                while listener.snapshot().counters.held == 0 {
                    tokio::task::yield_now().await;
                }
                let start = Instant::now();
                listener.swap(vec![other.backend()], None).expect("swap");
                let reached = other.accepts.recv().await.expect("accept on the new backend");
                total += reached - start;
                drop(client);
            }
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    let rt = dso_benches::runtime();
    let (backends, _proxy, listener) = rt.block_on(async {
        let blue = ReportingBackend::start().await;
        let green = ReportingBackend::start().await;
        let (proxy, listener) = dso_benches::proxy(vec![blue.backend()]);
        (Arc::new(Mutex::new((blue, green))), proxy, listener)
    });
    let mut g = c.benchmark_group("swap_to_effect");
    g.measurement_time(Duration::from_secs(8));
    for (name, mode) in [
        ("swap_then_first_connection", Mode::Swap),
        ("connect_no_swap", Mode::NoSwap),
        ("held_connection_dialed_after_swap", Mode::Held),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let task = rounds(listener.clone(), Arc::clone(&backends), mode, iters);
                rt.block_on(rt.spawn(task)).expect("bench task")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
