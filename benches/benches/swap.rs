//! Route swap latency: what installing a new route costs the caller.
//!
//! `arc_swap_store` is the primitive (one `ArcSwap::store` of a route-sized value);
//! `listener_swap` is the whole public operation (`Listener::swap`: build the generation,
//! store, wake held connections, start the drain of the old generation).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use dso_proxy::Backend;

/// Same shape as the proxy's route: a pointer to a generation and a mode.
struct RouteLike {
    _generation: Arc<Vec<Backend>>,
    _hold: Option<Arc<u64>>,
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("swap");
    let backends = Arc::new(vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 5432)))]);
    let cell = ArcSwap::from_pointee(RouteLike {
        _generation: Arc::clone(&backends),
        _hold: None,
    });
    g.bench_function("arc_swap_store", |b| {
        b.iter(|| {
            cell.store(Arc::new(RouteLike {
                _generation: Arc::clone(&backends),
                _hold: None,
            }))
        })
    });

    let rt = dso_benches::runtime();
    let _enter = rt.enter();
    let (_proxy, listener) = dso_benches::proxy(vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)))]);
    let a = vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)))];
    let bb = vec![Backend::new(SocketAddr::from(([127, 0, 0, 1], 2)))];
    let mut flip = false;
    g.bench_function("listener_swap", |b| {
        b.iter(|| {
            flip = !flip;
            let to = if flip { bb.clone() } else { a.clone() };
            black_box(listener.swap(to, None).expect("swap"))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
