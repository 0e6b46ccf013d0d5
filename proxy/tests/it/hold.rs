//! Hold: a paused listener accepts, dials nothing, and serves the connection after resume.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::support::{Client, EchoBackend, config, eventually, start};

#[tokio::test]
async fn connections_made_during_a_pause_complete_after_resume() {
    let blue = EchoBackend::start("blue").await;
    let green = EchoBackend::start("green").await;
    let (_proxy, listener) = start(config("db", &[blue.backend()]));
    let addr = listener.local_addr();

    listener.pause(Some(Duration::from_secs(10)));
    assert!(listener.is_paused());
    let clients: Vec<_> = (0..5)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                c.echo(format!("held {i}").as_bytes()).await.unwrap();
                c.tag
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(2), || listener.snapshot().counters.held == 5).await);
    assert_eq!(
        blue.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "dialed while paused"
    );

    // Resume onto a new backend, as a restart rotation does.
    listener.resume(Some(vec![green.backend()]), None).unwrap();
    for c in clients {
        assert_eq!(c.await.unwrap(), "green");
    }
    let snap = listener.snapshot();
    assert_eq!(snap.mode, "forward");
    assert_eq!(snap.counters.held, 0);
    assert_eq!(snap.counters.failed, 0);
    assert_eq!(snap.counters.hold_timeouts, 0);
}

#[tokio::test]
async fn resume_without_backends_goes_back_to_the_same_route() {
    let blue = EchoBackend::start("blue").await;
    let (_proxy, listener) = start(config("db", &[blue.backend()]));
    listener.pause(None);
    let addr = listener.local_addr();
    let held = tokio::spawn(async move { Client::connect(addr).await.unwrap().tag });
    assert!(eventually(Duration::from_secs(2), || listener.snapshot().counters.held == 1).await);
    let r = listener.resume(None, None).unwrap();
    assert_eq!((r.previous, r.generation), (1, 1));
    assert_eq!(held.await.unwrap(), "blue");
}

#[tokio::test]
async fn a_hold_past_its_maximum_closes_held_connections_and_forwards_again() {
    let blue = EchoBackend::start("blue").await;
    let (_proxy, listener) = start(config("db", &[blue.backend()]));
    let addr = listener.local_addr();
    listener.pause(Some(Duration::from_millis(300)));

    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"waiting").await.unwrap();
    let mut held = tokio::io::BufReader::new(raw);
    let mut buf = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read_to_end(&mut held, &mut buf),
    )
    .await
    .expect("held connection was not closed at the hold maximum");
    assert!(
        matches!(n, Ok(0)),
        "held connection should end cleanly: {n:?} {buf:?}"
    );

    let snap = listener.snapshot();
    assert_eq!(snap.counters.hold_timeouts, 1);
    assert_eq!(snap.mode, "forward");
    assert_eq!(blue.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // After the hold ran out the listener serves its previous route again.
    let c = Client::connect(addr).await.unwrap();
    assert_eq!(c.tag, "blue");
}

#[tokio::test]
async fn pausing_again_extends_the_hold() {
    let blue = EchoBackend::start("blue").await;
    let (_proxy, listener) = start(config("db", &[blue.backend()]));
    listener.pause(Some(Duration::from_millis(200)));
    listener.pause(Some(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        listener.is_paused(),
        "the first, shorter hold must not end the second"
    );
    let h = listener.snapshot().hold_remaining_ms.unwrap();
    assert!(h > 9_000, "{h}");
}
