//! Forwarding: half-close both ways, idle timeout, connection limits, byte counts.

use std::time::Duration;

use dso_proxy::{Backend, ListenerConfig, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Client, EchoBackend, config, eventually, payload, start};

#[tokio::test]
async fn client_half_close_reaches_the_backend_and_the_reply_still_arrives() {
    // Backend: read until EOF, then answer with the byte count, then close.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        s.write_all(format!("got {}", all.len()).as_bytes())
            .await
            .unwrap();
    });
    let (_proxy, listener) = start(config("app", &[Backend::new(baddr)]));
    let mut c = TcpStream::connect(listener.local_addr()).await.unwrap();
    let data = payload(1, 300_000);
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 300000");
    let snap = listener.snapshot();
    assert!(
        eventually(Duration::from_secs(2), || listener.snapshot().counters.active
            == 0)
        .await
    );
    assert_eq!(snap.counters.bytes_in, 300_000);
    assert_eq!(snap.counters.bytes_out, 10);
}

#[tokio::test]
async fn backend_half_close_reaches_the_client_and_the_client_can_still_send() {
    // Backend: send a banner, close its write side, then read what the client sends.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let received = tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        all
    });
    let (_proxy, listener) = start(config("app", &[Backend::new(baddr)]));
    let mut c = TcpStream::connect(listener.local_addr()).await.unwrap();
    let mut banner = Vec::new();
    c.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");
    c.write_all(b"after your fin").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(received.await.unwrap(), b"after your fin");
}

#[tokio::test]
async fn idle_timeout_closes_quiet_connections_only_when_set() {
    let live = EchoBackend::start("live").await;
    let mut cfg = config("app", &[live.backend()]);
    cfg.idle_timeout = Some(Duration::from_secs(1));
    let (_proxy, listener) = start(cfg);
    let mut c = Client::connect(listener.local_addr()).await.unwrap();
    // Traffic keeps it open past the timeout.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.echo(b"tick").await.unwrap();
    }
    assert!(c.closed_within(Duration::from_secs(5)).await);
    assert_eq!(listener.snapshot().counters.idle_timeouts, 1);

    // Default: no idle timeout.
    let (_p2, quiet) = start(config("quiet", &[live.backend()]));
    let mut c = Client::connect(quiet.local_addr()).await.unwrap();
    assert!(!c.closed_within(Duration::from_millis(700)).await);
    c.echo(b"still open").await.unwrap();
}

#[tokio::test]
async fn past_the_listener_limit_connections_wait_instead_of_failing() {
    let live = EchoBackend::start("live").await;
    let mut cfg = config("app", &[live.backend()]);
    cfg.max_connections = Some(2);
    let (_proxy, listener) = start(cfg);
    let addr = listener.local_addr();
    let first = Client::connect(addr).await.unwrap();
    let _second = Client::connect(addr).await.unwrap();
    let third = tokio::spawn(async move {
        let mut c = Client::connect(addr).await.unwrap();
        c.echo(b"third").await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "third connection was served past the limit");
    assert_eq!(listener.snapshot().counters.accepted, 2);
    drop(first);
    tokio::time::timeout(Duration::from_secs(3), third)
        .await
        .expect("third connection not served after a slot freed")
        .unwrap();
}

#[tokio::test]
async fn the_global_limit_spans_listeners() {
    let live = EchoBackend::start("live").await;
    let proxy = Proxy::new(ProxyConfig {
        max_connections: Some(1),
    });
    let a = proxy.add_listener(config("a", &[live.backend()])).unwrap();
    let b = proxy.add_listener(config("b", &[live.backend()])).unwrap();
    let first = Client::connect(a.local_addr()).await.unwrap();
    let baddr = b.local_addr();
    let waiting = tokio::spawn(async move { Client::connect(baddr).await.unwrap().tag });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    drop(first);
    assert_eq!(waiting.await.unwrap(), "live");
}

#[tokio::test]
async fn ipv6_listener_forwards_to_ipv4_backend() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        panic!("this machine has no ::1; the proxy's IPv6 path cannot be tested");
    }
    let live = EchoBackend::start("live").await;
    let cfg = ListenerConfig::new("v6", "[::1]:0".parse().unwrap(), vec![live.backend()]);
    let (_proxy, listener) = start(cfg);
    assert!(listener.local_addr().is_ipv6());
    let mut c = Client::connect(listener.local_addr()).await.unwrap();
    c.echo(b"over v6").await.unwrap();
}

#[tokio::test]
async fn a_bound_address_stays_exactly_as_given() {
    let live = EchoBackend::start("live").await;
    let (_proxy, listener) = start(config("lo", &[live.backend()]));
    assert_eq!(listener.local_addr().ip().to_string(), "127.0.0.1");
    // Another loopback address of 127/8 does not reach it.
    let other = std::net::SocketAddr::from(([127, 0, 0, 2], listener.local_addr().port()));
    assert!(TcpStream::connect(other).await.is_err());
}
