//! Draining: replaced connections keep flowing until the deadline, then close and count.

use std::time::Duration;

use dso_proxy::{DrainStatus, GenerationPhase};

use crate::support::{Client, EchoBackend, config, eventually, start};

#[tokio::test]
async fn old_connections_flow_until_the_deadline_then_close() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let (_proxy, listener) = start(config("app", &[blue.backend()]));
    let addr = listener.local_addr();

    let mut old = Client::connect(addr).await.unwrap();
    assert_eq!(old.tag, "blue");
    let swap = listener
        .swap(vec![green.backend()], Some(Duration::from_millis(400)))
        .unwrap();
    assert_eq!((swap.previous, swap.generation), (1, 2));

    // The old connection still works after the swap; new ones go to green.
    old.echo(b"still here").await.unwrap();
    let new = Client::connect(addr).await.unwrap();
    assert_eq!(new.tag, "green");

    let snap = listener.snapshot();
    assert_eq!(snap.draining, 1);
    let g1 = snap.generations.iter().find(|g| g.generation == 1).unwrap();
    assert_eq!(g1.phase, GenerationPhase::Draining);
    assert_eq!(g1.active, 1);

    // At the deadline the proxy closes it and counts it.
    assert!(
        old.closed_within(Duration::from_secs(3)).await,
        "old connection was not closed"
    );
    match listener.wait_drained(1, Duration::from_secs(3)).await.unwrap() {
        DrainStatus::Drained(r) => {
            assert_eq!(r.forced, 1);
            assert!(r.took_ms >= 400, "drained before the deadline: {r:?}");
        }
        other => panic!("generation 1 should have drained: {other:?}"),
    }
    let snap = listener.snapshot();
    assert_eq!(snap.counters.forced_closes, 1);
    assert_eq!(snap.draining, 0);
    // The new generation's connection is untouched.
    let mut new = new;
    new.echo(b"green lives").await.unwrap();
}

#[tokio::test]
async fn a_generation_drains_as_soon_as_its_last_connection_closes() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let (_proxy, listener) = start(config("app", &[blue.backend()]));
    let old = Client::connect(listener.local_addr()).await.unwrap();
    listener
        .swap(vec![green.backend()], Some(Duration::from_secs(30)))
        .unwrap();

    match listener.wait_drained(1, Duration::from_millis(50)).await.unwrap() {
        DrainStatus::Pending {
            active, remaining_ms, ..
        } => {
            assert_eq!(active, 1);
            assert!(remaining_ms > 29_000);
        }
        other => panic!("expected pending: {other:?}"),
    }
    drop(old);
    match listener.wait_drained(1, Duration::from_secs(5)).await.unwrap() {
        DrainStatus::Drained(r) => assert_eq!(r.forced, 0),
        other => panic!("expected drained: {other:?}"),
    }
    assert_eq!(listener.snapshot().counters.forced_closes, 0);
}

#[tokio::test]
async fn waiting_on_the_current_or_an_unknown_generation() {
    let blue = EchoBackend::start("blue").await;
    let (_proxy, listener) = start(config("app", &[blue.backend()]));
    assert_eq!(
        listener.wait_drained(1, Duration::ZERO).await.unwrap(),
        DrainStatus::Current { generation: 1 }
    );
    let err = listener.wait_drained(7, Duration::ZERO).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "listener app: generation 7 is unknown (current is 1)"
    );
}

#[tokio::test]
async fn forced_closes_are_spread_over_the_window() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let mut cfg = config("app", &[blue.backend()]);
    cfg.close_window = Duration::from_millis(600);
    let (_proxy, listener) = start(cfg);
    let mut old = Vec::new();
    for _ in 0..40 {
        old.push(Client::connect(listener.local_addr()).await.unwrap());
    }
    listener
        .swap(vec![green.backend()], Some(Duration::from_millis(100)))
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut closed_at = Vec::new();
    let waits = old.into_iter().map(|mut c| async move {
        assert!(c.closed_within(Duration::from_secs(5)).await);
        tokio::time::Instant::now()
    });
    for t in futures_join_all(waits).await {
        closed_at.push(t.duration_since(started));
    }
    closed_at.sort();
    let spread = *closed_at.last().unwrap() - closed_at[0];
    // All 40 at one instant would be the reconnect storm the window exists to prevent.
    assert!(
        spread >= Duration::from_millis(200),
        "closes not spread: {spread:?}"
    );
    assert!(
        eventually(Duration::from_secs(2), || listener
            .snapshot()
            .counters
            .forced_closes
            == 40)
        .await
    );
}

async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_dial_still_pending_at_the_drain_deadline_goes_to_the_new_route() {
    // A backend whose accept queue is full: the kernel drops further SYNs, so a dial to it
    // hangs. Listen with backlog 0 and fill the queue without accepting.
    let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stuck
        .bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    stuck.listen(0).unwrap();
    let stuck_addr = stuck.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(stuck_addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let live = EchoBackend::start("live").await;
    let mut cfg = config("app", &[dso_proxy::Backend::new(stuck_addr)]);
    cfg.connect_timeout = Duration::from_secs(30);
    let (_proxy, listener) = start(cfg);
    let addr = listener.local_addr();
    let client = tokio::spawn(async move { Client::connect(addr).await.map(|c| c.tag) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !client.is_finished(),
        "the stuck backend answered; the test premise failed"
    );
    listener
        .swap(vec![live.backend()], Some(Duration::from_millis(200)))
        .unwrap();
    let tag = tokio::time::timeout(Duration::from_secs(5), client)
        .await
        .expect("the pending dial did not move to the new route")
        .unwrap()
        .unwrap();
    assert_eq!(tag, "live");
    match listener.wait_drained(1, Duration::from_secs(5)).await.unwrap() {
        DrainStatus::Drained(r) => assert_eq!(r.forced, 0),
        other => panic!("expected drained: {other:?}"),
    }
    assert_eq!(listener.snapshot().counters.failed, 0);
}
