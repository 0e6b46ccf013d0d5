//! The `vault` provider against the in-process Vault (`support::vault_server`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dso_secrets::spec::{Credential, ProviderSettings, ProviderSpec, VaultAuth, VaultSettings};
use dso_secrets::{Error, Provider, Redactor, Version};
use serde_json::json;

use crate::support::limits;
use crate::support::tls::test_ca;
use crate::support::vault_server::{Mode, VaultServer};

const ROOT: &str = "hvs.CAESIJ-test-root-token-0123456789";
const PASSWORD: &str = "pw-v1-Zq8#kL2!s3cr3t";

fn token_settings(server: &VaultServer, token: &str) -> VaultSettings {
    VaultSettings {
        address: server.address.clone(),
        namespace: None,
        ca_file: None,
        auth: VaultAuth::Token {
            token: Credential::new(token),
        },
    }
}

async fn connect(settings: VaultSettings) -> Result<Arc<dyn Provider>, Error> {
    dso_secrets::connect(&ProviderSpec {
        name: "vault-prod".to_string(),
        limits: limits(),
        settings: ProviderSettings::Vault(settings),
    })
    .await
}

/// A fake Vault with the root token and `secret/prod/database` at version 1.
async fn vault_with_database() -> VaultServer {
    let server = VaultServer::start(None).await;
    server.add_token(ROOT, 0, false);
    server.put(
        "",
        "secret",
        "prod/database",
        json!({"username": "app", "password": PASSWORD}),
    );
    server
}

/// No error text ever holds a token or a value.
fn assert_clean(e: &Error, secrets: &[&str]) -> String {
    let text = format!("{e} / {e:?}");
    for s in secrets {
        assert!(!text.contains(s), "error text holds a secret: {text}");
    }
    text
}

fn text(v: &dso_secrets::SecretValue) -> String {
    String::from_utf8(v.expose().to_vec()).unwrap()
}

#[tokio::test]
async fn version_reads_metadata_only_and_fetch_reads_that_version() {
    let server = vault_with_database().await;
    let provider = connect(token_settings(&server, ROOT)).await.unwrap();
    assert_eq!(server.calls("lookup-self"), 1, "connect looks the token up once");
    // The README's form: the last segment is the field.
    let reference = provider.parse("secret/data/prod/database/password").unwrap();

    for round in 1..=5 {
        assert_eq!(provider.version(&reference).await.unwrap(), Version::new("1"));
        assert_eq!(server.calls("metadata"), round, "one metadata call per version()");
        assert_eq!(server.calls("data-read"), 0, "version() never reads data");
    }
    let before = server.total_calls();
    let value = provider.fetch(&reference, &Version::new("1")).await.unwrap();
    assert_eq!(server.calls("data-read"), 1);
    assert_eq!(server.total_calls() - before, 1, "fetch() is one call");
    assert_eq!(text(&reference.select(&value).unwrap()), PASSWORD);
    let whole: serde_json::Value = serde_json::from_slice(value.expose()).unwrap();
    assert_eq!(whole, json!({"username": "app", "password": PASSWORD}));

    // A write through the API (vaultrs' own kv2::set, a POST to secret/data/...) makes
    // version 2; version 1 stays readable by number.
    let writer = vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(&server.address)
            .token(ROOT)
            .build()
            .unwrap(),
    )
    .unwrap();
    vaultrs::kv2::set(
        &writer,
        "secret",
        "prod/database",
        &json!({"username": "app", "password": "pw-v2-rotated!"}),
    )
    .await
    .unwrap();
    assert_eq!(server.calls("data-write"), 1);
    let v2 = provider.version(&reference).await.unwrap();
    assert_eq!(v2, Version::new("2"));
    let new = provider.fetch(&reference, &v2).await.unwrap();
    assert_eq!(text(&reference.select(&new).unwrap()), "pw-v2-rotated!");
    let old = provider.fetch(&reference, &Version::new("1")).await.unwrap();
    assert_eq!(text(&reference.select(&old).unwrap()), PASSWORD);

    // The `#FIELD` form reads the same object.
    let user = provider.parse("secret/data/prod/database#username").unwrap();
    assert_eq!(user.object_key(), reference.object_key());
    assert_eq!(text(&user.select(&new).unwrap()), "app");
}

#[tokio::test]
async fn status_codes_map_to_errors() {
    let server = vault_with_database().await;
    server.put("", "secret", "prod/locked", json!({"k": "v-locked-value"}));
    server.deny("secret/prod/locked");
    let provider = connect(token_settings(&server, ROOT)).await.unwrap();
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    let secrets = [ROOT, PASSWORD, "v-locked-value"];

    let missing = provider.parse("secret/data/prod/nothing/password").unwrap();
    let e = provider.version(&missing).await.err().unwrap();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = provider.fetch(&db, &Version::new("9")).await.err().unwrap();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert_clean(&e, &secrets);

    let locked = provider.parse("secret/data/prod/locked#k").unwrap();
    let e = provider.version(&locked).await.err().unwrap();
    assert!(
        matches!(&e, Error::Forbidden { detail, .. } if detail.contains("permission denied")),
        "{e}"
    );
    let e = provider.fetch(&locked, &Version::new("1")).await.err().unwrap();
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    assert_clean(&e, &secrets);

    server.set_mode(Mode::Throttled(7));
    let e = provider.version(&db).await.err().unwrap();
    assert!(
        matches!(e, Error::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
        "{e}"
    );
    assert!(e.is_transient());
    assert_clean(&e, &secrets);

    server.set_mode(Mode::Broken);
    let e = provider.version(&db).await.err().unwrap();
    assert!(
        matches!(&e, Error::Unavailable { detail, .. } if detail.contains("500")),
        "{e}"
    );
    let e = provider.fetch(&db, &Version::new("1")).await.err().unwrap();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert_clean(&e, &secrets);

    server.set_mode(Mode::Sealed);
    let e = provider.version(&db).await.err().unwrap();
    assert!(
        matches!(&e, Error::Unavailable { detail, .. } if detail == "vault is sealed"),
        "{e}"
    );
    let e = provider.check().await.err().unwrap();
    assert!(
        matches!(&e, Error::Unavailable { detail, .. } if detail == "vault is sealed"),
        "{e}"
    );
    assert_clean(&e, &secrets);

    server.set_mode(Mode::Normal);
    let (health, lookups, total) = (
        server.calls("health"),
        server.calls("lookup-self"),
        server.total_calls(),
    );
    let report = provider.check().await.unwrap();
    assert_eq!(
        (server.calls("health"), server.calls("lookup-self")),
        (health + 1, lookups + 1)
    );
    assert_eq!(server.total_calls(), total + 2, "check() is health + lookup-self");
    assert!(
        report.detail.contains("vault 1.17.2") && report.detail.contains("(active)"),
        "{}",
        report.detail
    );
    assert!(!report.detail.contains(ROOT));

    // The server gone: connection refused is "unavailable".
    drop(server);
    let e = provider.version(&db).await.err().unwrap();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert_clean(&e, &secrets);
}

#[tokio::test]
async fn deleted_and_destroyed_versions_are_unusable() {
    let server = vault_with_database().await;
    server.put(
        "",
        "secret",
        "prod/database",
        json!({"password": "pw-v2-deleted-later"}),
    );
    let provider = connect(token_settings(&server, ROOT)).await.unwrap();
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    assert_eq!(provider.version(&db).await.unwrap(), Version::new("2"));

    server.delete_version("", "secret", "prod/database", 2);
    let e = provider.version(&db).await.err().unwrap();
    assert!(
        matches!(&e, Error::Unusable { reason, .. } if reason.contains("version 2 was deleted")),
        "{e}"
    );
    let e = provider.fetch(&db, &Version::new("2")).await.err().unwrap();
    assert!(
        matches!(&e, Error::Unusable { reason, .. } if reason.contains("version 2 was deleted")),
        "{e}"
    );

    server.destroy_version("", "secret", "prod/database", 1);
    let e = provider.fetch(&db, &Version::new("1")).await.err().unwrap();
    assert!(
        matches!(&e, Error::Unusable { reason, .. } if reason.contains("version 1 is destroyed")),
        "{e}"
    );
    assert_clean(&e, &[ROOT, PASSWORD, "pw-v2-deleted-later"]);
}

#[tokio::test]
async fn a_bad_token_fails_at_connect_without_showing_it() {
    let server = vault_with_database().await;
    let bad = "hvs.this-token-is-unknown-42";
    let e = connect(token_settings(&server, bad)).await.err().unwrap();
    let text = assert_clean(&e, &[bad]);
    assert!(matches!(e, Error::Auth { .. }), "{text}");
    assert!(text.contains("token lookup") && text.contains("403"), "{text}");
    assert_eq!(server.tokens_seen(), vec![bad.to_string()], "the token was sent");

    // The token in use is registered with the redactor.
    let _provider = connect(token_settings(&server, ROOT)).await.unwrap();
    assert_eq!(
        Redactor::global().redact(&format!("token={ROOT}")),
        "token=[REDACTED]"
    );
}

#[tokio::test]
async fn a_renewable_token_is_renewed_before_expiry_until_the_provider_is_dropped() {
    let server = vault_with_database().await;
    let token = "hvs.short-lived-renewable-token";
    server.add_token(token, 1, true);
    let provider = connect(token_settings(&server, token)).await.unwrap();
    assert_eq!(server.calls("renew-self"), 0);
    // TTL 1 s: renewals at about 0.67 s, 1.33 s, 2 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewed = server.calls("renew-self");
    assert!((1..=3).contains(&renewed), "renewals after 1.5 s: {renewed}");
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    assert_eq!(
        provider.version(&db).await.unwrap(),
        Version::new("1"),
        "the renewed token still works"
    );
    drop(provider);
    let at_drop = server.calls("renew-self");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        server.calls("renew-self"),
        at_drop,
        "no renewal after the provider is dropped"
    );
}

#[tokio::test]
async fn a_failed_renewal_is_logged_and_retried() {
    crate::support::logs::capture();
    let server = vault_with_database().await;
    let token = "hvs.renewal-fails-then-recovers";
    server.add_token(token, 1, true);
    server.fail_renewals(true);
    let _provider = connect(token_settings(&server, token)).await.unwrap();
    // The first attempt, at about 0.67 s, fails; the next waits the 1 s backoff.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(server.calls("renew-self"), 1);
    let logs = crate::support::logs::text();
    let line = logs
        .lines()
        .find(|l| l.contains("vault token renewal failed") && l.contains("HTTP 500"))
        .expect("the failed renewal is logged");
    assert!(line.contains("retry_in_seconds=1"), "{line}");
    assert!(!line.contains(token), "{line}");
    server.fail_renewals(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while server.calls("renew-self") < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry after the backoff"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn approle_logs_in_from_the_secret_id_file_and_again_before_the_lease_ends() {
    let server = vault_with_database().await;
    let secret_id = "5e1f0e1a-approle-secret-id-9b3c";
    server.set_approle("role-app", secret_id, 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret_id");
    std::fs::write(&file, format!("{secret_id}\n")).unwrap();
    let settings = |file: PathBuf| VaultSettings {
        address: server.address.clone(),
        namespace: None,
        ca_file: None,
        auth: VaultAuth::AppRole {
            role_id: "role-app".to_string(),
            secret_id_file: file,
            mount: "approle".to_string(),
        },
    };
    let provider = connect(settings(file.clone())).await.unwrap();
    assert_eq!(server.calls("approle-login"), 1);
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    assert_eq!(provider.version(&db).await.unwrap(), Version::new("1"));
    assert_eq!(server.tokens_seen().last().unwrap(), "hvs.approle-token-1");

    // Lease 1 s: a new login at about 0.67 s, reading the file again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let logins = server.calls("approle-login");
    assert!(logins >= 2, "logins after 1.2 s: {logins}");
    provider.version(&db).await.unwrap();
    assert_eq!(
        server.tokens_seen().last().unwrap(),
        &format!("hvs.approle-token-{logins}")
    );
    drop(provider);

    // A wrong secret id is an auth error that does not show it.
    std::fs::write(&file, "wrong-secret-id-0000").unwrap();
    let e = connect(settings(file.clone())).await.err().unwrap();
    let text = assert_clean(&e, &["wrong-secret-id-0000", secret_id]);
    assert!(
        matches!(e, Error::Auth { .. }) && text.contains("invalid role or secret ID"),
        "{text}"
    );
    // A missing file is a config error naming it.
    let e = connect(settings(dir.path().join("nope"))).await.err().unwrap();
    assert!(
        matches!(&e, Error::Config { detail, .. } if detail.contains("secret_id_file") && detail.contains("nope")),
        "{e}"
    );
}

#[tokio::test]
async fn the_namespace_header_is_sent_on_every_call() {
    let server = VaultServer::start(None).await;
    server.add_token(ROOT, 0, false);
    server.put("team-a", "secret", "prod/database", json!({"password": PASSWORD}));
    let mut settings = token_settings(&server, ROOT);
    settings.namespace = Some("team-a".to_string());
    let provider = connect(settings).await.unwrap();
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    let v = provider.version(&db).await.unwrap();
    let value = provider.fetch(&db, &v).await.unwrap();
    assert_eq!(text(&db.select(&value).unwrap()), PASSWORD);
    let seen = server.namespaces_seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|ns| ns.as_deref() == Some("team-a")), "{seen:?}");

    // Without the namespace the secret is not there.
    let plain = connect(token_settings(&server, ROOT)).await.unwrap();
    assert!(matches!(plain.version(&db).await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn https_with_the_ca_file() {
    let ca = test_ca();
    let server = VaultServer::start(Some(Arc::clone(&ca.server))).await;
    server.add_token(ROOT, 0, false);
    server.put("", "secret", "prod/database", json!({"password": PASSWORD}));
    assert!(server.address.starts_with("https://localhost:"));

    let mut settings = token_settings(&server, ROOT);
    settings.ca_file = Some(ca.ca_file.clone());
    let provider = connect(settings).await.unwrap();
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    let v = provider.version(&db).await.unwrap();
    assert_eq!(
        text(&db.select(&provider.fetch(&db, &v).await.unwrap()).unwrap()),
        PASSWORD
    );

    // Without it the test CA is not trusted.
    let e = connect(token_settings(&server, ROOT)).await.err().unwrap();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert_clean(&e, &[ROOT]);
    // A missing CA file is a config error naming it.
    let mut settings = token_settings(&server, ROOT);
    settings.ca_file = Some("/nonexistent/ca.pem".into());
    let e = connect(settings).await.err().unwrap();
    assert!(
        matches!(&e, Error::Config { detail, .. } if detail.contains("/nonexistent/ca.pem")),
        "{e}"
    );
}

#[tokio::test]
async fn nothing_secret_is_logged_at_trace() {
    crate::support::logs::capture();
    let server = vault_with_database().await;
    let token = "hvs.trace-test-renewable-token-5150";
    server.add_token(token, 1, true);
    let provider = connect(token_settings(&server, token)).await.unwrap();
    let db = provider.parse("secret/data/prod/database/password").unwrap();
    let v = provider.version(&db).await.unwrap();
    let value = provider.fetch(&db, &v).await.unwrap();
    assert_eq!(text(&db.select(&value).unwrap()), PASSWORD);
    let _ = provider
        .version(&provider.parse("secret/data/prod/missing#x").unwrap())
        .await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(server.calls("renew-self") >= 1);

    let secret_id = "trace-test-approle-secret-id-8086";
    server.set_approle("role-app", secret_id, 60);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sid"), secret_id).unwrap();
    let approle = connect(VaultSettings {
        auth: VaultAuth::AppRole {
            role_id: "role-app".to_string(),
            secret_id_file: dir.path().join("sid"),
            mount: "approle".to_string(),
        },
        ..token_settings(&server, "")
    })
    .await
    .unwrap();
    approle.fetch(&db, &v).await.unwrap();
    drop((provider, approle));

    let logs = crate::support::logs::text();
    assert!(
        logs.contains("vault token renewed"),
        "the capture works: {} bytes",
        logs.len()
    );
    let mut secrets = vec![token.to_string(), PASSWORD.to_string(), secret_id.to_string()];
    secrets.extend(server.tokens_seen());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret is in the trace log ({} bytes)",
            logs.len()
        );
    }
}
