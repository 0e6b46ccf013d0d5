//! The remote-engine delivery path (the tar streamer) against the real engine reached over a
//! loopback TCP socket: a tmpfs-backed volume at the target path, an in-memory archive
//! uploaded with CopyToContainer while the container runs, and no byte of the value in the
//! overlay upper directories, the container's directory or the volume's directory on disk.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dso_rotator::delivery::archive::{self, FileEntry, READY_MARKER};
use dso_rotator::{DockerEngine, Engine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{RUN_LABEL, Svc, World};

/// Forwards every TCP connection accepted on `127.0.0.1:0` to the engine's unix socket, as
/// `socat TCP-LISTEN:...,fork UNIX-CONNECT:/var/run/docker.sock` would. Returns the bound
/// address and a count of connections forwarded.
async fn forwarder() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    (addr, count)
}

/// `docker cp - DEST` with `archive` on stdin: the engine's CopyToContainer without dso's
/// checks.
fn docker_cp(archive: &[u8], dest: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("docker")
        .args(["cp", "-", dest])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(archive).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A value nobody else has: 16 bytes from the kernel's generator, hex.
fn unique_value(tag: &str) -> String {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("dso-remote-{tag}-{hex}")
}

/// One GET to the test server's control port: (status, headers lowercased, body).
async fn get(ip: IpAddr, path: &str) -> Result<(u16, BTreeMap<String, String>, Vec<u8>), String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect((ip, 8081)))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of head")?;
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("bad status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, out[split + 4..].to_vec()))
}

/// Waits (bounded) until the test server in the container answers.
async fn wait_http(ip: IpAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(ip, "/id").await.map(|r| r.0) != Ok(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "test server at {ip} did not answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The file system type mounted exactly at `path` in this (the host's) mount namespace.
fn mounted_at(path: &str) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // Fields: id parent major:minor root mountpoint options ... - fstype source super.
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        (f.get(4) == Some(&path)).then(|| f[dash + 1].to_owned())
    })
}

/// How many times `needle` occurs in the regular files under `roots` (symlinks not
/// followed, FIFOs and sockets not opened), and the files it occurs in.
fn occurrences(roots: &[PathBuf], needle: &[u8]) -> (usize, Vec<PathBuf>) {
    let (mut n, mut files, mut stack) = (0, Vec::new(), roots.to_vec());
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if meta.is_file() {
            let Ok(bytes) = std::fs::read(&p) else { continue };
            let k = bytes.windows(needle.len()).filter(|w| *w == needle).count();
            if k > 0 {
                n += k;
                files.push(p);
            }
        }
    }
    (n, files)
}

/// Every overlay upper directory of the engine, and the container's own directory.
fn disk_roots(container: &str) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::fs::read_dir("/var/lib/docker/overlay2")
        .expect("this test reads /var/lib/docker (run it as root, with the overlay2 driver)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("diff"))
        .filter(|p| p.is_dir())
        .collect();
    roots.push(Path::new("/var/lib/docker/containers").join(container));
    roots
}

#[tokio::test]
async fn tar_streamer_over_tcp_delivers_into_the_volume_tmpfs_and_nothing_reaches_disk() {
    let w = World::new();
    let (addr, forwarded) = forwarder().await;
    let engine = DockerEngine::connect_to(&format!("tcp://{addr}"))
        .await
        .expect("connect over the loopback forwarder");
    assert!(!engine.is_local(), "an engine over TCP is remote");
    if std::env::var("DOCKER_HOST").map_or(true, |h| h.is_empty() || h.starts_with("unix://")) {
        let local = DockerEngine::connect()
            .await
            .expect("connect to the local socket");
        assert!(local.is_local(), "the engine on this host's socket is local");
    }

    // The volume, over TCP.
    let volume = format!("{}-secrets", w.run);
    let labels = vec![
        (RUN_LABEL.to_owned(), w.run.clone()),
        ("dso.delivery.instance".to_owned(), w.run.clone()),
    ];
    engine
        .create_tmpfs_volume(&volume, 1 << 20, &labels)
        .await
        .expect("create the tmpfs volume");
    // The same request again finds the same volume.
    engine
        .create_tmpfs_volume(&volume, 1 << 20, &labels)
        .await
        .unwrap();
    let opts = w
        .docker(&[
            "volume",
            "inspect",
            "-f",
            "{{.Driver}} {{json .Options}} {{json .Labels}}",
            &volume,
        ])
        .unwrap();
    assert!(opts.starts_with("local "), "{opts}");
    assert!(
        opts.contains(r#""o":"size=1048576,mode=0711,nosuid,nodev,noexec""#),
        "{opts}"
    );
    assert!(
        opts.contains(r#""type":"tmpfs""#) && opts.contains(r#""device":"tmpfs""#),
        "{opts}"
    );
    assert!(opts.contains(r#""dso.delivery.instance""#), "{opts}");
    let mountpoint = w
        .docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume])
        .unwrap();
    assert_eq!(
        mounted_at(&mountpoint),
        None,
        "a tmpfs volume is not mounted before a container starts"
    );

    // A container with the volume at the target path.
    let mut svc = Svc::new("app");
    svc.health_interval = None;
    svc.run_args = vec![
        "-v".into(),
        format!("{volume}:/run/secrets"),
        "--tmpfs".into(),
        "/run:size=64k".into(),
    ];
    let id = w.start(&svc);
    assert_eq!(
        mounted_at(&mountpoint).as_deref(),
        Some("tmpfs"),
        "mounted as a tmpfs while the container runs"
    );
    let c = engine.inspect(&id).await.unwrap().expect("inspect over TCP");
    let ip = c.networks[&w.network].expect("an address on the test network");
    wait_http(ip).await;

    // The archive: a root-only file, a file for uid 1000, the marker last.
    let password = unique_value("pw");
    let token = unique_value("tok");
    let files = [
        FileEntry {
            name: "db_password",
            value: password.as_bytes(),
            mode: 0o400,
            uid: 0,
            gid: 0,
        },
        FileEntry {
            name: "app_token",
            value: token.as_bytes(),
            mode: 0o440,
            uid: 1000,
            gid: 1000,
        },
    ];
    let tar = archive::build(&files, true).unwrap();
    let before = forwarded.load(Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    engine
        .put_archive(&id, "/run/secrets", &tar)
        .await
        .expect("upload over TCP");
    let upload = t0.elapsed();
    assert!(
        forwarded.load(Ordering::SeqCst) > before,
        "the upload went through the TCP forwarder"
    );
    eprintln!(
        "put_archive of {} bytes over the TCP forwarder: {upload:?}",
        tar.len()
    );

    // Inside the container: the exact bytes, modes and owners, and the marker.
    let (status, h, body) = get(ip, "/file?path=/run/secrets/db_password").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, password.as_bytes());
    assert_eq!(
        (
            h["x-file-mode"].as_str(),
            h["x-file-uid"].as_str(),
            h["x-file-gid"].as_str()
        ),
        ("0400", "0", "0")
    );
    let (status, h, body) = get(ip, "/file?path=/run/secrets/app_token").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, token.as_bytes());
    assert_eq!(
        (
            h["x-file-mode"].as_str(),
            h["x-file-uid"].as_str(),
            h["x-file-gid"].as_str()
        ),
        ("0440", "1000", "1000")
    );
    let (status, h, _) = get(ip, &format!("/file?path=/run/secrets/{READY_MARKER}"))
        .await
        .unwrap();
    assert_eq!(
        (status, h["x-file-size"].as_str()),
        (200, "0"),
        "the marker is there, empty"
    );

    // On the host the bytes are in the volume's tmpfs (the search finds them there, so it
    // can find them), and nowhere in the overlay upper dirs or the container's directory.
    let (in_tmpfs, _) = occurrences(&[PathBuf::from(&mountpoint)], password.as_bytes());
    assert_eq!(in_tmpfs, 1, "the value is in the volume's tmpfs once");
    let roots = disk_roots(&id);
    for v in [&password, &token] {
        let (n, where_) = occurrences(&roots, v.as_bytes());
        assert_eq!(n, 0, "value found on disk in {where_:?}");
    }
    // Neither the container's configuration nor the engine's log holds it.
    let inspect = w.docker(&["inspect", &id]).unwrap();
    assert!(
        !inspect.contains(&password) && !inspect.contains(&token),
        "docker inspect shows a value"
    );
    // (The log of the engine .ci/services.sh starts; absent elsewhere, then nothing is read.)
    let engine_log = PathBuf::from("/var/log/dso-dockerd.log");
    assert_eq!(
        occurrences(&[engine_log], password.as_bytes()).0,
        0,
        "the value is in the engine's log"
    );
    // The control: the same kind of upload into the writable layer (a path with no volume;
    // raw CopyToContainer through the CLI, since dso's call refuses it) lands in the
    // container's overlay upper dir, and the search finds it there.
    let canary = unique_value("canary");
    let f = [FileEntry {
        name: "canary",
        value: canary.as_bytes(),
        mode: 0o400,
        uid: 0,
        gid: 0,
    }];
    let canary_tar = archive::build(&f, false).unwrap();
    let e = engine.put_archive(&id, "/", &canary_tar).await.unwrap_err();
    assert!(e.to_string().contains("writable layer"), "{e}");
    docker_cp(&canary_tar, &format!("{id}:/"));
    let upper = w
        .docker(&["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", &id])
        .unwrap();
    let (n, where_) = occurrences(&roots, canary.as_bytes());
    assert_eq!(
        (n, where_),
        (1, vec![Path::new(&upper).join("canary")]),
        "the search finds a leak"
    );
    // A `--tmpfs` mount is not a volume either: refused.
    let e = engine.put_archive(&id, "/run", &canary_tar).await.unwrap_err();
    assert!(e.to_string().contains("no volume"), "{e}");

    // Stopped: the tmpfs is unmounted and the files are gone with it; the directory under
    // it on disk never held them.
    w.docker(&["stop", "-t", "1", &id]).unwrap();
    assert_eq!(
        mounted_at(&mountpoint),
        None,
        "unmounted when no running container uses it"
    );
    let mut after = roots.clone();
    after.push(PathBuf::from(&mountpoint));
    for v in [&password, &token] {
        let (n, where_) = occurrences(&after, v.as_bytes());
        assert_eq!(n, 0, "value found on disk after stop in {where_:?}");
    }

    // Removal over TCP; a second removal is not an error; the volume is gone.
    w.docker(&["rm", "-f", &id]).unwrap();
    engine.remove_volume(&volume).await.expect("remove the volume");
    engine
        .remove_volume(&volume)
        .await
        .expect("a missing volume is not an error");
    assert!(
        w.docker(&["volume", "inspect", &volume]).is_err(),
        "the volume is gone"
    );
}

#[tokio::test]
async fn an_upload_before_start_is_refused_a_raw_one_is_lost_and_a_plain_volume_is_refused() {
    let w = World::new();
    let (addr, _) = forwarder().await;
    let engine = DockerEngine::connect_to(&format!("tcp://{addr}")).await.unwrap();
    let labels = vec![(RUN_LABEL.to_owned(), w.run.clone())];

    // A volume of that name that is not a tmpfs: never used for a secret.
    let plain = format!("{}-plain", w.run);
    w.docker(&[
        "volume",
        "create",
        "--label",
        &format!("{RUN_LABEL}={}", w.run),
        &plain,
    ])
    .unwrap();
    let e = engine
        .create_tmpfs_volume(&plain, 1 << 20, &labels)
        .await
        .expect_err("an existing disk volume of that name is refused");
    assert!(e.to_string().contains("already exists"), "{e}");
    // Another size is other options too.
    let volume = format!("{}-secrets", w.run);
    engine
        .create_tmpfs_volume(&volume, 1 << 20, &labels)
        .await
        .unwrap();
    let e = engine
        .create_tmpfs_volume(&volume, 2 << 20, &labels)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(
        engine.create_tmpfs_volume("x", 0, &labels).await.is_err(),
        "size 0 is refused"
    );

    // Created, not started: the upload's answer does not matter, the files do not survive.
    let name = format!("{}-app-1", w.run);
    let id = w
        .docker(&[
            "create",
            "--name",
            &name,
            "--network",
            &w.network,
            "--label",
            &format!("{RUN_LABEL}={}", w.run),
            "-v",
            &format!("{volume}:/run/secrets"),
            &crate::support::image(),
        ])
        .unwrap();
    let value = unique_value("early");
    let f = [FileEntry {
        name: "early",
        value: value.as_bytes(),
        mode: 0o400,
        uid: 0,
        gid: 0,
    }];
    let tar = archive::build(&f, true).unwrap();
    // dso's call refuses it, with nothing sent.
    let e = engine.put_archive(&id, "/run/secrets", &tar).await.unwrap_err();
    assert!(e.to_string().contains("not running"), "{e}");
    // The raw CopyToContainer is accepted by the engine and the files do not survive.
    docker_cp(&tar, &format!("{id}:/run/secrets"));
    w.docker(&["start", &id]).unwrap();
    let c = engine.inspect(&id).await.unwrap().unwrap();
    let ip = c.networks[&w.network].unwrap();
    wait_http(ip).await;
    let (status, _, _) = get(ip, "/stat?path=/run/secrets/early").await.unwrap();
    assert_eq!(status, 404, "an upload before start is lost");
    let mut roots = disk_roots(&id);
    roots.push(PathBuf::from(
        w.docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume])
            .unwrap(),
    ));
    let (n, where_) = occurrences(&roots, value.as_bytes());
    assert_eq!(n, 0, "the lost upload is not on disk either: {where_:?}");
    // Once it runs, dso's upload goes in.
    engine.put_archive(&id, "/run/secrets", &tar).await.unwrap();
    let (status, _, body) = get(ip, "/file?path=/run/secrets/early").await.unwrap();
    assert_eq!((status, body), (200, value.as_bytes().to_vec()));

    // A relative path is refused before anything is sent.
    let e = engine.put_archive(&id, "run/secrets", &tar).await.unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");

    // A volume in use cannot be removed; after the container it can.
    assert!(
        engine.remove_volume(&volume).await.is_err(),
        "a volume in use is not removed"
    );
    w.docker(&["rm", "-f", &id]).unwrap();
    engine.remove_volume(&volume).await.unwrap();
}

/// The agent's tmpfs store unmounted on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

/// Delivery on the remote path with one secret `name` (one file mapping `key`), its store on
/// a tmpfs under the world's state dir; the launcher from `DSO_INIT_BIN`.
fn remote_delivery(w: &World, name: &str, key: &str) -> (Arc<dso_rotator::delivery::Delivery>, Unmount) {
    use dso_rotator::delivery::store::StoreOptions;
    use dso_rotator::delivery::{Delivery, DeliveryConfig};
    use dso_secrets::config::{InjectSpec, RotationSpec, SecretSpec, Targets};
    use dso_secrets::{ProviderKind, Reference};

    let launcher = std::env::var("DSO_INIT_BIN")
        .expect("DSO_INIT_BIN: the static launcher (bash .ci/build-test-image.sh --init-path)");
    let root = w.state.path().join("secrets-tmpfs");
    let delivery = Delivery::new(DeliveryConfig {
        root: root.clone(),
        store: StoreOptions {
            mount: true,
            size_bytes: 8 << 20,
        },
        launcher: Some(launcher.into()),
        secrets: vec![SecretSpec {
            name: name.into(),
            provider: "local".into(),
            mappings: vec![(
                key.into(),
                Reference::parse(ProviderKind::Local, "local", &format!("app/{key}")).unwrap(),
            )],
            targets: Targets::default(),
            inject: InjectSpec::default_file(),
            rotation: RotationSpec::default(),
        }],
        providers: [("local".to_string(), ProviderKind::Local)].into(),
    })
    .unwrap();
    delivery.set_remote(true);
    (Arc::new(delivery), Unmount(root))
}

/// A rolling rotation through the rotator against the engine over TCP, with delivery on the
/// remote path: the tmpfs volumes are created before green, the launcher is copied into the
/// created green and holds its entrypoint, the archive is uploaded once green runs; green
/// serves the value from the volume's tmpfs, nothing of it reaches the disk, and blue's
/// volumes go with blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_a_remote_engine_delivers_through_volumes_and_the_launcher() {
    use dso_rotator::delivery::{Bundle, LABEL_INSTANCE, volume_name};
    use dso_secrets::SecretValue;

    let w = World::new();
    let (addr, _) = forwarder().await;
    let engine = DockerEngine::connect_to(&format!("tcp://{addr}")).await.unwrap();
    assert!(!engine.is_local());
    let (delivery, _unmount) = remote_delivery(&w, "db", "db_password");

    let mut svc = Svc::new("web");
    svc.extra_labels.push(("dso.secrets", "db".to_owned()));
    w.start(&svc);
    let proxy = dso_proxy::Proxy::new(dso_proxy::ProxyConfig::default());
    let mut cfg = dso_rotator::Config::new(w.state_dir());
    cfg.scope = Some((RUN_LABEL.to_owned(), w.run.clone()));
    cfg.delivery = Some(Arc::clone(&delivery));
    let (rotator, _) = dso_rotator::Rotator::start(engine, proxy, cfg).await.unwrap();

    let mut instances = Vec::new();
    let mut last_value = String::new();
    for value in [unique_value("rot1"), unique_value("rot2")] {
        last_value.clone_from(&value);
        let bundle = Bundle::new(
            vec![(
                "db".into(),
                "db_password".into(),
                SecretValue::from_slice(value.as_bytes()),
            )],
            Vec::new(),
        );
        let report = rotator
            .rotate(dso_rotator::RotateRequest {
                target: format!("{}/web", w.run),
                secrets: Some(Arc::new(bundle)),
                ..Default::default()
            })
            .await
            .expect("rotation on the remote path");
        let green = report.containers[0].new_id.clone();
        let inst = w
            .docker(&[
                "inspect",
                "-f",
                &format!("{{{{index .Config.Labels \"{LABEL_INSTANCE}\"}}}}"),
                &green,
            ])
            .unwrap();
        let entry = w
            .docker(&["inspect", "-f", "{{json .Config.Entrypoint}}", &green])
            .unwrap();
        assert!(
            entry.contains("/run/dso/init") && entry.contains("--wait-for"),
            "{entry}"
        );
        let ip: IpAddr = w
            .docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &green,
            ])
            .unwrap()
            .parse()
            .unwrap();
        wait_http(ip).await;
        let (code, _, body) = get(ip, "/file?path=/run/secrets/db_password").await.unwrap();
        assert_eq!((code, body), (200, value.clone().into_bytes()));
        assert_eq!(
            mounted_at(&format!(
                "/var/lib/docker/volumes/{}/_data",
                volume_name(&inst, "f0")
            ))
            .as_deref(),
            Some("tmpfs"),
            "green's group volume is a mounted tmpfs"
        );
        let (n, files) = occurrences(&disk_roots(&green), value.as_bytes());
        assert_eq!(n, 0, "the value reached the disk: {files:?}");
        instances.push(inst);
    }
    // A restart outside any rotation empties green's volumes; following Docker's events,
    // the rotator uploads the files again and the launcher lets the application start.
    let stop = tokio_util::sync::CancellationToken::new();
    let follow = rotator.clone();
    let token = stop.clone();
    tokio::spawn(async move { follow.watch(token).await });
    let green = w
        .docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label={RUN_LABEL}={}", w.run),
        ])
        .unwrap();
    w.docker(&["restart", "-t", "1", &green]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ip: Option<IpAddr> = w
            .docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &green,
            ])
            .ok()
            .and_then(|s| s.parse().ok());
        let served = match ip {
            Some(ip)
                if w.docker(&["inspect", "-f", "{{.State.Running}}", &green])
                    .unwrap()
                    == "true" =>
            {
                get(ip, "/file?path=/run/secrets/db_password").await.ok()
            }
            _ => None,
        };
        if let Some((200, _, body)) = served {
            assert_eq!(
                body,
                last_value.as_bytes(),
                "the restarted container has its file again"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted container did not get its files back within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    // The first green (blue of the second rotation) is gone, and so are its volumes.
    let vols = w.docker(&["volume", "ls", "-q"]).unwrap();
    for g in ["f0", "env"] {
        assert!(
            !vols.lines().any(|v| v == volume_name(&instances[0], g)),
            "blue's volume {g} left: {vols}"
        );
        assert!(
            vols.lines().any(|v| v == volume_name(&instances[1], g)),
            "green's volume {g} missing: {vols}"
        );
    }
    // Clean up green and its volumes (World removes the containers of the run).
    for id in w
        .docker(&["ps", "-aq", "--filter", &format!("label={RUN_LABEL}={}", w.run)])
        .unwrap()
        .lines()
    {
        let _ = w.docker(&["rm", "-f", id]);
    }
    for g in ["f0", "env"] {
        let _ = w.docker(&["volume", "rm", &volume_name(&instances[1], g)]);
    }
}

/// On a remote engine a restart rotation whose green never gets healthy rolls back: blue
/// is started again, its volumes (emptied when it stopped) get its files again, and it
/// serves the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rollback_on_a_remote_engine_gives_blue_its_files_again() {
    use dso_rotator::delivery::{Bundle, volume_name};
    use dso_secrets::SecretValue;

    let w = World::new();
    let (addr, _) = forwarder().await;
    let engine = DockerEngine::connect_to(&format!("tcp://{addr}")).await.unwrap();
    let (delivery, _unmount) = remote_delivery(&w, "pw", "pw");
    let mut svc = Svc::new("db");
    svc.strategy = "restart";
    svc.extra_labels = vec![
        ("dso.secrets", "pw".to_owned()),
        ("dso.health.timeout", "4s".to_owned()),
        ("dso.drain.timeout", "1s".to_owned()),
    ];
    svc.run_args = ["-e", "HEALTH_FILE=/run/secrets/pw", "-e", "UNHEALTHY_IF=bad"]
        .map(str::to_owned)
        .to_vec();
    w.start(&svc);
    let proxy = dso_proxy::Proxy::new(dso_proxy::ProxyConfig::default());
    let mut cfg = dso_rotator::Config::new(w.state_dir());
    cfg.scope = Some((RUN_LABEL.to_owned(), w.run.clone()));
    cfg.delivery = Some(Arc::clone(&delivery));
    cfg.stop_grace = Duration::from_secs(2);
    let (rotator, _) = dso_rotator::Rotator::start(engine, proxy, cfg).await.unwrap();
    let rotate = |value: &str| {
        let bundle = Bundle::new(
            vec![(
                "pw".into(),
                "pw".into(),
                SecretValue::from_slice(value.as_bytes()),
            )],
            Vec::new(),
        );
        rotator.rotate(dso_rotator::RotateRequest {
            target: format!("{}/db", w.run),
            secrets: Some(Arc::new(bundle)),
            ..Default::default()
        })
    };
    // First delivery (a restart), then a value that makes the replacement unhealthy.
    let good = unique_value("good");
    let blue = rotate(&good).await.expect("first delivery").containers[0]
        .new_id
        .clone();
    let e = rotate("bad").await.expect_err("green never healthy");
    assert!(e.to_string().contains("not healthy"), "{e}");
    let running = w.docker(&["inspect", "-f", "{{.State.Running}}", &blue]).unwrap();
    assert_eq!(running, "true", "blue started again after the rollback");
    let ip: IpAddr = w
        .docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &blue,
        ])
        .unwrap()
        .parse()
        .unwrap();
    wait_http(ip).await;
    let (code, _, body) = get(ip, "/file?path=/run/secrets/pw").await.unwrap();
    assert_eq!(
        (code, body),
        (200, good.into_bytes()),
        "blue serves its old value again"
    );
    let inst = w
        .docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"dso.delivery.instance\"}}",
            &blue,
        ])
        .unwrap();
    for id in w
        .docker(&["ps", "-aq", "--filter", &format!("label={RUN_LABEL}={}", w.run)])
        .unwrap()
        .lines()
    {
        let _ = w.docker(&["rm", "-f", id]);
    }
    for g in ["f0", "env"] {
        let _ = w.docker(&["volume", "rm", &volume_name(&inst, g)]);
    }
}
