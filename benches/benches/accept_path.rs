//! The per-connection accept path without its sockets: what every accepted connection
//! pays in the proxy's own bookkeeping (accept count, route load, generation guard and
//! re-check, backend pick, connect-latency histogram and counters, active gauges), so a
//! regression there shows in `cargo bench` before it shows in a load test.
//!
//! `one_thread`: one caller. `two_threads`: two callers at once on the same listener (the
//! agent's two runtime threads accepting for one port), where shared counters' cache lines
//! move between cores.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use dso_proxy::{Backend, accept_path_once};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("accept_path");
    let rt = dso_benches::runtime();
    let _enter = rt.enter();
    let (_proxy, listener) = dso_benches::proxy(vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)))]);
    let took = Duration::from_micros(120);
    g.bench_function("one_thread", |b| {
        b.iter(|| black_box(accept_path_once(&listener, took)))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (listener, stop) = (listener.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(accept_path_once(&listener, took));
            }
        })
    };
    g.bench_function("two_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(accept_path_once(&listener, took));
            }
            start.elapsed()
        })
    });
    stop.store(true, Ordering::Relaxed);
    other.join().expect("second caller");
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
