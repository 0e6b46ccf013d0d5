//! The proxy as a whole: listener registry, errors, shutdown.

use std::time::Duration;

use dso_proxy::{Error, ListenerConfig, Proxy, ProxyConfig};

use crate::support::{Client, EchoBackend, config};

#[tokio::test]
async fn unknown_and_duplicate_listeners_are_named() {
    let live = EchoBackend::start("live").await;
    let proxy = Proxy::new(ProxyConfig::default());
    proxy.add_listener(config("pg", &[live.backend()])).unwrap();
    proxy.add_listener(config("mysql", &[live.backend()])).unwrap();
    let err = proxy.listener("redis").unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"unknown listener "redis"; listeners: mysql, pg"#
    );
    let err = proxy.add_listener(config("pg", &[live.backend()])).unwrap_err();
    assert_eq!(err.to_string(), "listener pg already exists");
}

#[tokio::test]
async fn a_taken_port_is_reported_with_listener_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let proxy = Proxy::new(ProxyConfig::default());
    let err = proxy
        .add_listener(ListenerConfig::new("pg", addr, vec![]))
        .unwrap_err();
    assert!(matches!(err, Error::Bind { .. }));
    assert!(
        err.to_string()
            .starts_with(&format!("listener pg: cannot listen on {addr}")),
        "{err}"
    );
}

#[tokio::test]
async fn an_empty_route_fails_connections_and_counts_them() {
    let (_proxy, listener) = crate::support::start(config("empty", &[]));
    assert!(Client::connect(listener.local_addr()).await.is_err());
    assert!(
        crate::support::eventually(Duration::from_secs(2), || listener.snapshot().counters.failed
            == 1)
        .await
    );
}

#[tokio::test]
async fn shutdown_waits_for_connections_then_forces_the_rest() {
    let live = EchoBackend::start("live").await;
    let proxy = Proxy::new(ProxyConfig::default());
    let l = proxy.add_listener(config("app", &[live.backend()])).unwrap();
    let addr = l.local_addr();
    let mut open = Client::connect(addr).await.unwrap();
    open.echo(b"x").await.unwrap();

    let report = proxy.shutdown(Duration::from_millis(200)).await;
    assert!(!report.drained);
    assert_eq!(report.forced, 1);
    assert!(open.closed_within(Duration::from_secs(2)).await);
    assert_eq!(l.snapshot().counters.forced_closes, 1);
    assert!(proxy.add_listener(config("late", &[])).is_err());
    // No longer accepting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(Client::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_with_no_connection_is_immediate_and_clean() {
    let live = EchoBackend::start("live").await;
    let proxy = Proxy::new(ProxyConfig::default());
    proxy.add_listener(config("app", &[live.backend()])).unwrap();
    let report = proxy.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    assert_eq!(report.forced, 0);
    assert!(report.took_ms < 1000);
}

#[tokio::test]
async fn a_backend_that_is_the_listener_itself_is_refused() {
    let proxy = Proxy::new(ProxyConfig::default());
    let l = proxy.add_listener(config("loop", &[])).unwrap();
    let own = l.local_addr();
    let err = l.swap(vec![own.into()], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("listener loop: backend {own} is the listener's own address")
    );
    assert_eq!(l.generation(), 1);
    assert!(dso_proxy::routes_to_itself(
        "0.0.0.0:5432".parse().unwrap(),
        "127.0.0.1:5432".parse().unwrap()
    ));
    assert!(!dso_proxy::routes_to_itself(
        "127.0.0.1:5432".parse().unwrap(),
        "127.0.0.2:5432".parse().unwrap()
    ));
}

#[tokio::test]
async fn shutdown_while_paused_closes_held_connections_cleanly_and_counts_them() {
    let live = EchoBackend::start("live").await;
    let proxy = Proxy::new(ProxyConfig::default());
    let l = proxy.add_listener(config("db", &[live.backend()])).unwrap();
    l.pause(Some(Duration::from_secs(60)));
    let mut raw = tokio::net::TcpStream::connect(l.local_addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"startup packet")
        .await
        .unwrap();
    assert!(crate::support::eventually(Duration::from_secs(2), || l.snapshot().counters.held == 1).await);
    let report = proxy.shutdown(Duration::from_secs(5)).await;
    assert!(
        report.drained,
        "held connections end with the shutdown, not at its deadline"
    );
    let mut rest = Vec::new();
    let n = tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest).await;
    assert!(matches!(n, Ok(0)), "expected a clean close (FIN), got {n:?}");
    let snap = l.snapshot();
    assert_eq!(snap.counters.failed, 1);
    assert_eq!(snap.counters.held, 0);
}
