//! Swaps under load: nothing fails, bytes are intact, connections follow their generation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{Client, EchoBackend, config, eventually, payload, start};

/// One finished client exchange.
struct Exchange {
    started: Instant,
    greeted: Instant,
    tag: String,
}

/// When a swap was called and when it returned, and which backend it installed.
struct SwapMark {
    called: Instant,
    returned: Instant,
    tag: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_fifty_swaps_no_failure() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let (proxy, listener) = start(config("app", &[blue.backend()]));
    let addr = listener.local_addr();

    let stop = CancellationToken::new();
    let exchanges = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for id in 0..200u64 {
        let stop = stop.clone();
        let exchanges = Arc::clone(&exchanges);
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let started = Instant::now();
                let mut c = Client::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: connect {n} failed: {e}"));
                let greeted = Instant::now();
                let data = payload(
                    id * 1_000_003 + n,
                    1 + (id as usize * 131 + n as usize * 17) % 8192,
                );
                c.echo(&data)
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: exchange {n} failed: {e}"));
                exchanges.lock().unwrap().push(Exchange {
                    started,
                    greeted,
                    tag: c.tag,
                });
                n += 1;
            }
            n
        }));
    }

    let mut marks = vec![SwapMark {
        called: Instant::now(),
        returned: Instant::now(),
        tag: "blue".into(),
    }];
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..50 {
        let to = if i % 2 == 0 { &green } else { &blue };
        let called = Instant::now();
        listener
            .swap(vec![to.backend()], Some(Duration::from_secs(30)))
            .unwrap();
        let returned = Instant::now();
        marks.push(SwapMark {
            called,
            returned,
            tag: to.tag.clone(),
        });
        // Let at least ten connections start and finish inside this generation before
        // the next swap, however slow the machine is, so the check below has material.
        let inside = || {
            exchanges
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.started >= returned)
                .count()
        };
        let enough = eventually(Duration::from_secs(10), || inside() >= 10).await;
        assert!(enough, "clients made no progress after swap {i}");
    }
    stop.cancel();
    let mut total = 0;
    for c in clients {
        total += c.await.expect("a client panicked");
    }

    let exchanges = exchanges.lock().unwrap();
    assert_eq!(exchanges.len() as u64, total);
    assert!(total > 1000, "load too light to mean anything: {total} exchanges");
    // A connection started after swap k returned and greeted before swap k+1 was called
    // was accepted under generation k, so it must have been served by k's backend.
    let mut checked = 0;
    for e in exchanges.iter() {
        for k in 0..marks.len() {
            let after = e.started >= marks[k].returned;
            let before_next = marks.get(k + 1).is_none_or(|m| e.greeted <= m.called);
            if after && before_next {
                assert_eq!(e.tag, marks[k].tag, "connection routed to the wrong generation");
                checked += 1;
            }
        }
    }
    assert!(
        checked > 500,
        "too few exchanges inside one generation: {checked}/{total}"
    );
    assert!(blue.accepted.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(green.accepted.load(std::sync::atomic::Ordering::SeqCst) > 0);

    let snap = listener.snapshot();
    assert_eq!(snap.generation, 51);
    assert_eq!(snap.counters.failed, 0);
    assert_eq!(snap.counters.dial_errors, 0);
    assert_eq!(snap.counters.forced_closes, 0);
    assert_eq!(snap.counters.accepted, total);
    drop(proxy);
}

#[tokio::test]
async fn swap_rejects_an_empty_route_and_keeps_the_old_one() {
    let blue = EchoBackend::start("blue").await;
    let (_proxy, listener) = start(config("app", &[blue.backend()]));
    let err = listener.swap(vec![], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "listener app: a route needs at least one backend"
    );
    assert_eq!(listener.generation(), 1);
    let c = Client::connect(listener.local_addr()).await.unwrap();
    assert_eq!(c.tag, "blue");
}

#[tokio::test]
async fn swap_keeps_counters_of_a_backend_that_stays() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let (_proxy, listener) = start(config("app", &[blue.backend()]));
    let mut c = Client::connect(listener.local_addr()).await.unwrap();
    c.echo(b"hello").await.unwrap();
    listener
        .swap(vec![blue.backend(), green.backend()], None)
        .unwrap();
    let snap = listener.snapshot();
    let b = snap.backends.iter().find(|b| b.addr == blue.addr).unwrap();
    assert_eq!(b.counters.accepted, 1);
    assert_eq!(b.counters.bytes_in, 5);
    let g = snap.backends.iter().find(|b| b.addr == green.addr).unwrap();
    assert_eq!(g.counters.accepted, 0);
}

#[tokio::test]
async fn round_robin_over_several_backends() {
    let a = EchoBackend::start("a").await;
    let b = EchoBackend::start("b").await;
    let (_proxy, listener) = start(config("app", &[a.backend(), b.backend()]));
    let mut tags = Vec::new();
    for _ in 0..6 {
        tags.push(Client::connect(listener.local_addr()).await.unwrap().tag);
    }
    assert_eq!(tags.iter().filter(|t| *t == "a").count(), 3, "{tags:?}");
    assert_eq!(tags.iter().filter(|t| *t == "b").count(), 3, "{tags:?}");
}

#[tokio::test]
async fn a_backend_that_comes_back_keeps_its_counters() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let (_proxy, listener) = start(config("app", &[blue.backend()]));
    // An open connection keeps generation 1 (and so blue's state) alive.
    let _held_open = Client::connect(listener.local_addr()).await.unwrap();
    listener.swap(vec![green.backend()], None).unwrap();
    Client::connect(listener.local_addr()).await.unwrap();
    listener.swap(vec![blue.backend()], None).unwrap();
    let snap = listener.snapshot();
    let b = snap.backends.iter().find(|b| b.addr == blue.addr).unwrap();
    assert_eq!(
        b.counters.accepted, 1,
        "blue's counters restarted after blue, green, blue"
    );
    assert_eq!(b.counters.active, 1, "blue's draining connection is not counted");
}
