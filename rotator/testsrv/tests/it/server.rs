//! The library's [`Server`] run in-process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dso_testsrv::Server;
use dso_testsrv::config::{ProbeConfig, ServeConfig};
use dso_testsrv::probe::{Verdict, probe};

use crate::http;

fn config(id: &str, healthy_after: Duration) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        healthy_after,
        never_healthy: false,
        instance_id: id.into(),
        reload_file: None,
        health_file: None,
    }
}

/// Starts a server on a runtime of its own thread; returns its echo and HTTP addresses.
fn start(config: ServeConfig) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let server = Server::bind(&config).await.unwrap();
            tx.send((server.echo_addr(), server.http_addr().unwrap()))
                .unwrap();
            server.run(std::future::pending()).await;
        });
    });
    rx.recv().unwrap()
}

#[test]
fn echo_greets_with_instance_id_then_echoes() {
    let (echo, _) = start(config("blue-1", Duration::ZERO));
    let s = TcpStream::connect(echo).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "dso-testsrv blue-1\n");

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut s = s.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || {
            s.write_all(&payload).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    reader.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back, payload, "echo returns exactly the bytes sent");
}

#[test]
fn health_control_and_probe() {
    let (_, addr) = start(config("g", Duration::ZERO));
    let probe_cfg = ProbeConfig {
        addr,
        path: "/health".into(),
        timeout: Duration::from_secs(2),
    };
    assert_eq!(probe(&probe_cfg), Verdict::Status(200));

    assert_eq!(http(addr, "POST", "/health/fail").0, 200);
    assert_eq!(http(addr, "GET", "/health"), (503, "unhealthy\n".into()));
    assert_eq!(probe(&probe_cfg), Verdict::Status(503));
    assert!(!probe(&probe_cfg).is_healthy());

    assert_eq!(http(addr, "POST", "/health/ok").0, 200);
    assert_eq!(http(addr, "GET", "/health"), (200, "ok\n".into()));
    assert_eq!(http(addr, "GET", "/id"), (200, "g\n".into()));
    assert_eq!(http(addr, "GET", "/reloads"), (200, "0\n".into()));
}

#[test]
fn healthy_after_delay() {
    let (_, addr) = start(config("slow", Duration::from_millis(300)));
    assert_eq!(http(addr, "GET", "/health").0, 503);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(http(addr, "GET", "/health").0, 200);
}

#[test]
fn http_ignores_a_request_body() {
    let (_, addr) = start(config("b", Duration::ZERO));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /health/fail HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("X-Instance: b\r\n"), "{out}");
}
