//! Route load on the accept path: what each accepted connection pays to read its route.
//!
//! `listener_generation` reads the current route through the public API (`ArcSwap::load`
//! and one field). `arc_swap_load_full` is what the connection path does once per
//! connection (`load_full`: an `Arc` it may keep across `.await`s); `arc_swap_load` is the
//! guard-only read for comparison.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use dso_proxy::Backend;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_load");
    let rt = dso_benches::runtime();
    let _enter = rt.enter();
    let (_proxy, listener) = dso_benches::proxy(vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)))]);
    g.bench_function("listener_generation", |b| {
        b.iter(|| black_box(listener.generation()))
    });

    let cell = ArcSwap::from_pointee(vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)))]);
    g.bench_function("arc_swap_load", |b| b.iter(|| black_box(cell.load().len())));
    g.bench_function("arc_swap_load_full", |b| {
        b.iter(|| {
            let route: Arc<Vec<Backend>> = cell.load_full();
            black_box(route.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
