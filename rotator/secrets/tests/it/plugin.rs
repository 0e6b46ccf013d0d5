//! The plugin provider against real child processes: the shipped reference plugin
//! (`examples/plugins/dso-provider-file.py`) and a test plugin that misbehaves on request
//! (`tests/it/plugins/misbehave.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dso_secrets::plugin::{PluginProvider, sha256_file};
use dso_secrets::provider::{Provider, Version};
use dso_secrets::spec::{Limits, PluginSettings, ProviderSettings, ProviderSpec};
use dso_secrets::watcher::{Event, WatchSettings, Watched, Watcher};
use dso_secrets::{Error, Redactor, Reference};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn file_plugin() -> PathBuf {
    manifest()
        .join("../../examples/plugins/dso-provider-file.py")
        .canonicalize()
        .unwrap()
}

fn misbehave() -> PathBuf {
    manifest().join("tests/it/plugins/misbehave.py")
}

fn pinned(command: &Path, config: serde_json::Value) -> PluginSettings {
    PluginSettings {
        command: command.to_path_buf(),
        args: Vec::new(),
        sha256: Some(sha256_file(command).unwrap()),
        pins_file: None,
        config,
        env: Vec::new(),
    }
}

fn limits(timeout: Duration) -> Limits {
    Limits {
        timeout,
        ..Limits::default()
    }
}

fn spec(name: &str, settings: PluginSettings) -> ProviderSpec {
    ProviderSpec {
        name: name.to_string(),
        limits: limits(Duration::from_secs(5)),
        settings: ProviderSettings::Plugin(settings),
    }
}

fn r(raw: &str) -> Reference {
    Reference::parse(dso_secrets::ProviderKind::Plugin, "p", raw).unwrap()
}

fn write_secrets(path: &Path, doc: serde_json::Value) {
    std::fs::write(path, serde_json::to_vec(&doc).unwrap()).unwrap();
}

#[tokio::test]
async fn reference_plugin_serves_versions_and_exact_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    write_secrets(
        &file,
        json!({
            "db": {"value": "{\"user\":\"app\",\"password\":\"ref-plugin-pw-1\"}", "version": "7"},
            "api": "ref-plugin-api-1",
            "bin": {"value_base64": "AAEC/w=="},
        }),
    );
    let p = dso_secrets::connect(&spec("p", pinned(&file_plugin(), json!({"file": file}))))
        .await
        .unwrap();
    assert_eq!(p.version(&r("db")).await.unwrap(), Version::new("7"));
    let v = p.fetch(&r("db"), &Version::new("7")).await.unwrap();
    let field = Reference {
        field: Some("password".into()),
        ..r("db")
    };
    assert_eq!(field.select(&v).unwrap().expose(), b"ref-plugin-pw-1");
    let bin_v = p.version(&r("bin")).await.unwrap();
    assert_eq!(p.fetch(&r("bin"), &bin_v).await.unwrap().expose(), [0, 1, 2, 255]);
    // A version that is gone, and a missing secret: not found, never a value.
    let e = p.fetch(&r("db"), &Version::new("6")).await.err().unwrap();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = p.version(&r("nope")).await.err().unwrap();
    assert!(
        matches!(e, Error::NotFound { ref reference, .. } if reference == "nope"),
        "{e}"
    );
    // The entry hash version follows the entry.
    let api1 = p.version(&r("api")).await.unwrap();
    assert_eq!(p.version(&r("api")).await.unwrap(), api1);
    write_secrets(&file, json!({"api": "ref-plugin-api-2"}));
    let api2 = p.version(&r("api")).await.unwrap();
    assert_ne!(api1, api2);
    assert_eq!(
        p.fetch(&r("api"), &api2).await.unwrap().expose(),
        b"ref-plugin-api-2"
    );
    let report = p.check().await.unwrap();
    assert!(report.detail.contains("1 entries"), "{}", report.detail);
}

#[tokio::test]
async fn plugin_without_versions_falls_back_to_the_value_digest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    write_secrets(&file, json!({"k": "digest-fallback-1"}));
    let settings = pinned(&file_plugin(), json!({"file": file, "report_versions": false}));
    let p = dso_secrets::connect(&spec("p", settings)).await.unwrap();
    let v = p.version(&r("k")).await.unwrap();
    assert_eq!(
        v,
        Version::from_digest(&dso_secrets::SecretValue::from_slice(b"digest-fallback-1"))
    );
    assert!(v.as_str().starts_with("sha256:"));
    assert_eq!(p.fetch(&r("k"), &v).await.unwrap().expose(), b"digest-fallback-1");
    // Changed between version and fetch: refused (the next poll sees the new digest).
    write_secrets(&file, json!({"k": "digest-fallback-2"}));
    let e = p.fetch(&r("k"), &v).await.err().unwrap();
    assert!(e.is_transient(), "{e}");
    assert_ne!(p.version(&r("k")).await.unwrap(), v);
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn watcher_over_the_reference_plugin_sees_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    write_secrets(
        &file,
        json!({"db": {"value": "{\"password\":\"watch-plugin-1\"}", "version": "1"}}),
    );
    let p = dso_secrets::connect(&spec("p", pinned(&file_plugin(), json!({"file": file}))))
        .await
        .unwrap();
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("p".into(), p);
    let settings = WatchSettings {
        interval: Duration::from_millis(200),
        debounce: Duration::from_millis(100),
        ..WatchSettings::default()
    };
    let item = Watched {
        consumer: "svc".into(),
        mappings: vec![(
            "PW".into(),
            Reference {
                field: Some("password".into()),
                ..r("db")
            },
        )],
    };
    let cancel = CancellationToken::new();
    let (w, mut rx) = Watcher::start(
        vec![item],
        providers,
        settings,
        dir.path().join("state"),
        cancel.clone(),
    )
    .unwrap();
    let Event::Snapshot(s) = next(&mut rx).await else {
        panic!()
    };
    assert!(s.first);
    assert_eq!(s.values[0].1.expose(), b"watch-plugin-1");
    w.applied("svc", &s.versions).unwrap();
    write_secrets(
        &file,
        json!({"db": {"value": "{\"password\":\"watch-plugin-2\"}", "version": "2"}}),
    );
    let Event::Snapshot(s) = next(&mut rx).await else {
        panic!()
    };
    assert!(!s.first);
    assert_eq!(s.values[0].1.expose(), b"watch-plugin-2");
    assert_eq!(s.versions[0].1, Version::new("2"));
    cancel.cancel();
}

#[tokio::test]
async fn a_pin_mismatch_refuses_to_run_the_plugin_and_prints_both_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let mut settings = pinned(&misbehave(), json!({"starts_file": starts}));
    let actual = settings.sha256.clone().unwrap();
    let wrong = "ab".repeat(32);
    settings.sha256 = Some(wrong.clone());
    let e = dso_secrets::connect(&spec("p", settings))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&actual) && e.contains(&wrong), "{e}");
    assert!(!starts.exists(), "the plugin must not have run");
}

#[tokio::test]
async fn an_unpinned_plugin_is_refused_with_how_to_pin_it() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let mut settings = pinned(&misbehave(), json!({"starts_file": starts}));
    settings.sha256 = None;
    let e = dso_secrets::connect(&spec("p", settings.clone()))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not pinned") && e.contains("sha256sum"), "{e}");
    // The same plugin pinned through dso-plugins-sha256.json, by file name.
    let pins = dir.path().join("dso-plugins-sha256.json");
    let hash = sha256_file(&misbehave()).unwrap();
    std::fs::write(
        &pins,
        json!({"misbehave.py": format!("sha256:{hash}")}).to_string(),
    )
    .unwrap();
    settings.pins_file = Some(pins);
    dso_secrets::connect(&spec("p", settings)).await.unwrap();
    assert_eq!(std::fs::read_to_string(&starts).unwrap().lines().count(), 1);
}

#[tokio::test]
async fn the_pin_is_checked_again_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("plugin.py");
    std::fs::copy(misbehave(), &exe).unwrap();
    let starts = dir.path().join("starts");
    let settings = pinned(
        &exe,
        json!({"mode": "crash", "bad_starts": 1, "starts_file": starts}),
    );
    let p = PluginProvider::new("p", settings, limits(Duration::from_secs(5)));
    let e = p.version(&r("x")).await.err().unwrap();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    // Replaced on disk while it was down.
    let mut body = std::fs::read(&exe).unwrap();
    body.extend_from_slice(b"\n# tampered\n");
    std::fs::write(&exe, body).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = p.version(&r("x")).await.err().unwrap().to_string();
    assert!(e.contains("but the pin"), "{e}");
    assert_eq!(p.starts(), 1);
}

/// Each misbehaviour: the call in flight fails as unavailable with the reason, the next
/// call inside the backoff is refused without starting anything, and after the backoff a
/// fresh process answers.
#[tokio::test]
async fn crash_hang_and_garbage_are_killed_and_restarted_with_backoff() {
    for (mode, reason) in [
        ("crash", "closed its stdout"),
        ("hang", "no answer to request"),
        ("garbage", "not JSON"),
        ("wrong_id", "no request in flight"),
        ("oversized", "longer than"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let starts = dir.path().join("starts");
        let settings = pinned(
            &misbehave(),
            json!({"mode": mode, "bad_starts": 1, "starts_file": starts}),
        );
        let p = PluginProvider::new("p", settings, limits(Duration::from_secs(2)));
        let t = Instant::now();
        let e = p.version(&r("x")).await.err().unwrap();
        assert!(matches!(e, Error::Unavailable { .. }), "{mode}: {e}");
        assert!(e.to_string().contains(reason), "{mode}: {e}");
        // Not the start timeout (10 s): the failure is noticed when it happens (the
        // margin is for python starting on a loaded machine).
        assert!(t.elapsed() < Duration::from_secs(8), "{mode}: {:?}", t.elapsed());
        let e = p.version(&r("x")).await.err().unwrap().to_string();
        assert!(e.contains("restarts in"), "{mode}: {e}");
        assert_eq!(p.starts(), 1, "{mode}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(p.version(&r("x")).await.unwrap(), Version::new("1"), "{mode}");
        assert_eq!(p.starts(), 2, "{mode}");
        assert_eq!(std::fs::read_to_string(&starts).unwrap().lines().count(), 2);
    }
}

#[tokio::test]
async fn a_hung_plugin_is_killed_with_its_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let settings = pinned(&misbehave(), json!({"mode": "child", "starts_file": starts}));
    let p = PluginProvider::new("p", settings, limits(Duration::from_millis(1500)));
    p.version(&r("warm-up-is-not-needed")).await.err().unwrap();
    let child: u32 = std::fs::read_to_string(dir.path().join("starts.child"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if stat.is_empty() || state == "Z" || state == "X" {
            break;
        }
        assert!(Instant::now() < deadline, "grandchild {child} still runs: {stat}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_plugin_gets_no_agent_environment_and_no_secret_in_argv() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let mut settings = pinned(
        &misbehave(),
        json!({"starts_file": starts, "token": "plugin-config-token-secret"}),
    );
    settings.args = vec!["--region".into(), "ap-southeast-1".into()];
    settings.env = vec!["DSO_PLUGIN_TEST_UNSET".into()];
    let p = dso_secrets::connect(&spec("p", settings)).await.unwrap();
    let report = p.check().await.unwrap();
    let detail = report.detail.split_once(": ").unwrap().1;
    let d: serde_json::Value = serde_json::from_str(detail).unwrap();
    let env = d["env"].as_object().unwrap();
    // Besides PATH, HOME and LANG, nothing of the agent's environment. (`#!/usr/bin/env
    // python3` may run through a shell or pyenv shim, which sets PWD, SHLVL, _ and PYENV_*
    // itself.)
    for (k, v) in env {
        let set_by_shim = ["PWD", "SHLVL", "_", "OLDPWD", "LC_CTYPE"].contains(&k.as_str())
            || k.starts_with("PYENV_")
            || k.starts_with("_PYENV");
        if ["PATH", "HOME", "LANG"].contains(&k.as_str()) || set_by_shim {
            continue;
        }
        assert!(
            std::env::var(k).ok().as_deref() != v.as_str(),
            "{k} leaked from the agent's environment"
        );
        panic!("unexpected variable {k} in the plugin's environment");
    }
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some() && !env.contains_key("CARGO_MANIFEST_DIR"));
    assert_eq!(d["argv"], json!(["--region", "ap-southeast-1"]));
    assert!(!detail.contains("plugin-config-token-secret"));
    assert_eq!(d["own_group"], json!(true));
    assert_eq!(d["cwd"], json!("/"));
}

#[tokio::test]
async fn plugin_stderr_is_logged_through_the_redactor_and_truncated() {
    crate::support::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let settings = pinned(&misbehave(), json!({"starts_file": dir.path().join("starts")}));
    let p = PluginProvider::new("p", settings, limits(Duration::from_secs(5)));
    let secret = dso_secrets::SecretValue::from_slice(b"stderr-secret-to-redact-1");
    Redactor::global().register(&secret);
    // The test plugin echoes each request line (with its reference) to stderr.
    p.version(&r("ref-with-stderr-secret-to-redact-1")).await.unwrap();
    let long = "L".repeat(10_000);
    p.version(&r(&long)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = crate::support::logs::text();
        if out.contains("truncated=true") || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Redactor::global().forget(&secret);
    assert!(out.contains("stderr-echo"), "{out}");
    assert!(out.contains("ref-with-[REDACTED]"), "{out}");
    assert!(!out.contains("stderr-secret-to-redact-1"), "{out}");
    assert!(out.contains("truncated=true"), "{out}");
    assert!(!out.contains(&long), "a 10 kB line is logged truncated");
}
