//! The engine module against the real daemon.

use std::time::Duration;

use dso_rotator::engine::{CloneSpec, DockerHealth};
use dso_rotator::{DockerEngine, Engine};
use futures_util::StreamExt;

use crate::support::{Svc, World, exchange, short};

async fn http_get(ip: std::net::IpAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((ip, 8081)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

async fn until<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn engine_negotiates_inspects_clones_renames_signals_and_execs() {
    let w = World::new();
    let e = DockerEngine::connect().await.expect("connect");
    // Docker 20.10 speaks 1.41; bollard's default is newer, so this proves negotiation.
    let server_api = w
        .docker(&["version", "--format", "{{.Server.APIVersion}}"])
        .unwrap();
    assert_eq!(e.api_version(), server_api, "negotiated API version");

    let mut events = e.events();
    let id = w.start(&Svc::new("web"));
    let ev = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ev = events.next().await.unwrap().unwrap();
            if ev.id == id && ev.action == "start" {
                return ev;
            }
        }
    })
    .await
    .expect("start event");
    assert_eq!(ev.action, "start");

    let managed = e.list_managed().await.unwrap();
    let c = managed
        .iter()
        .find(|c| c.id == id)
        .expect("listed as managed")
        .clone();
    assert_eq!(c.name, format!("{}-web-1", w.run));
    assert!(c.running);
    assert!(c.image_id.starts_with("sha256:"));
    assert!(!c.publishes_ports);
    let ip = c.networks[&w.network].expect("an IP on the project network");
    until("healthy", async || {
        e.inspect(&id).await.unwrap().unwrap().health == DockerHealth::Healthy
    })
    .await;
    assert_eq!(exchange((ip, 8080).into(), "hi").await.unwrap(), short(&id));

    // Clone with a new environment value and an extra label; the copy keeps the network.
    let spec = CloneSpec {
        from: id.clone(),
        name: format!("{}-web-green", w.run),
        env: vec![("DSO_TEST_VALUE".into(), "v2".into())],
        labels: vec![("dso.rotation.id".into(), "t1".into())],
        primary_network: None,
        overrides: Default::default(),
    };
    let green = e.create_clone(&spec).await.unwrap();
    e.start(&green).await.unwrap();
    e.start(&green)
        .await
        .expect("starting a started container is not an error");
    let g = e.inspect(&green).await.unwrap().unwrap();
    assert_eq!(g.image_id, c.image_id, "image pinned by ID");
    assert_eq!(g.labels["dso.rotation.id"], "t1");
    assert_eq!(g.labels["dso.host_ports"], c.labels["dso.host_ports"]);
    let gip = g.networks[&w.network].expect("green on the project network");
    assert_ne!(gip, ip, "static IP dropped");
    until("green http", async || {
        tokio::net::TcpStream::connect((gip, 8081)).await.is_ok()
    })
    .await;
    assert_eq!(http_get(gip, "/env/DSO_TEST_VALUE").await, "v2");
    assert_eq!(
        exchange((gip, 8080).into(), "g").await.unwrap(),
        short(&green),
        "hostname dropped"
    );
    assert_eq!(e.list_labeled("dso.rotation.id", "t1").await.unwrap().len(), 1);

    // Exec waits for the real exit code.
    let ok = vec![
        "/dso-testsrv".into(),
        "probe".into(),
        "127.0.0.1:8081/health".into(),
    ];
    assert_eq!(e.exec(&green, &ok, Duration::from_secs(20)).await.unwrap(), 0);
    let bad = vec![
        "/dso-testsrv".into(),
        "probe".into(),
        "127.0.0.1:8081/nope".into(),
    ];
    assert_eq!(e.exec(&green, &bad, Duration::from_secs(20)).await.unwrap(), 1);

    // Signal: the test server counts SIGHUPs.
    e.signal(&green, "SIGHUP").await.unwrap();
    until("reload counted", async || {
        http_get(gip, "/reloads").await.trim() == "1"
    })
    .await;

    let renamed = format!("{}-web-renamed", w.run);
    e.rename(&green, &renamed).await.unwrap();
    assert_eq!(e.inspect(&green).await.unwrap().unwrap().name, renamed);
    assert!(e.inspect(&renamed).await.unwrap().is_some(), "inspect by name");

    e.stop(&green, Duration::from_secs(5)).await.unwrap();
    assert!(!e.inspect(&green).await.unwrap().unwrap().running);
    e.stop(&green, Duration::from_secs(5))
        .await
        .expect("stopping a stopped container is not an error");
    e.remove(&green).await.unwrap();
    assert!(e.inspect(&green).await.unwrap().is_none());
    let err = e.remove(&green).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("remove"), "{err}");
}

#[tokio::test]
async fn a_clone_mounts_the_same_volumes() {
    let w = World::new();
    let e = DockerEngine::connect().await.expect("connect");
    let name = format!("{}-vol-1", w.run);
    let vol = format!("{}-named", w.run);
    let run_label = format!("{}={}", crate::support::RUN_LABEL, w.run);
    let id = w
        .docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &w.network,
            "--label",
            &run_label,
            "-v",
            "/anon",
            "-v",
            &format!("{vol}:/named"),
            &crate::support::image(),
        ])
        .unwrap();
    let mounts = |id: &str| {
        let out = w
            .docker(&[
                "inspect",
                "-f",
                "{{range .Mounts}}{{.Destination}}={{.Name}} {{end}}",
                id,
            ])
            .unwrap();
        let mut v: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
        v.sort();
        v
    };
    let spec = CloneSpec {
        from: id.clone(),
        name: format!("{}-vol-2", w.run),
        env: vec![],
        labels: vec![],
        primary_network: None,
        overrides: Default::default(),
    };
    let green = e.create_clone(&spec).await.unwrap();
    let before = mounts(&id);
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(mounts(&green), before, "same anonymous and named volumes");
    e.remove(&green).await.unwrap();
    e.remove(&id).await.unwrap();
    let _ = w.docker(&["volume", "rm", &vol]);
    let anon = before
        .iter()
        .find(|m| m.starts_with("/anon="))
        .unwrap()
        .trim_start_matches("/anon=")
        .to_owned();
    let _ = w.docker(&["volume", "rm", &anon]);
}
