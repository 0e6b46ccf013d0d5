//! Swap while N threads load: the store's latency when the accept path of N other threads
//! is reading the same route in a loop, and a load's latency while another thread swaps.
//!
//! The machine these figures come from has two cores, so N > 1 readers oversubscribe it:
//! that is the point (an agent on a busy host), and it is said beside the figures.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dso_proxy::Backend;

fn bench(c: &mut Criterion) {
    let rt = dso_benches::runtime();
    let _enter = rt.enter();
    let a = vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)))];
    let bb = vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 2)))];
    let (_proxy, listener) = dso_benches::proxy(a.clone());

    let mut g = c.benchmark_group("swap_while_loading");
    for readers in [1usize, 2, 4] {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..readers)
            .map(|_| {
                let l = listener.clone();
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        black_box(l.generation());
                    }
                })
            })
            .collect();
        let mut flip = false;
        g.bench_function(BenchmarkId::from_parameter(readers), |b| {
            b.iter(|| {
                flip = !flip;
                let to = if flip { bb.clone() } else { a.clone() };
                black_box(listener.swap(to, None).expect("swap"))
            })
        });
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("reader thread");
        }
    }
    g.finish();

    let mut g = c.benchmark_group("load_while_swapping");
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let l = listener.clone();
        let stop = Arc::clone(&stop);
        let handle = rt.handle().clone();
        let (a, bb) = (a.clone(), bb.clone());
        thread::spawn(move || {
            let _enter = handle.enter();
            let mut flip = false;
            while !stop.load(Ordering::Relaxed) {
                flip = !flip;
                let to = if flip { bb.clone() } else { a.clone() };
                l.swap(to, None).expect("swap");
            }
        })
    };
    g.bench_function("1_swapper", |b| b.iter(|| black_box(listener.generation())));
    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("swapper thread");
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
