//! The `azure` provider against the in-process Key Vault (`support::azure_server`).

use std::sync::Arc;
use std::time::Duration;

use dso_secrets::spec::{AzureAuth, AzureSettings, Credential, ProviderSettings, ProviderSpec};
use dso_secrets::{Error, Provider, Redactor, Version};

use crate::support::azure_server::{
    ASSERTION, CLIENT_ID, CLIENT_SECRET, IDENTITY_HEADER, KeyVaultServer, Mode, TENANT,
};
use crate::support::limits;
use crate::support::tls::{TestCa, test_ca};

const CURRENT: &str = "s3cr3t-current-value-2";
const OLD: &str = "s3cr3t-old-value-1";

fn client_secret() -> AzureAuth {
    AzureAuth::ClientSecret {
        tenant_id: TENANT.to_string(),
        client_id: CLIENT_ID.to_string(),
        client_secret: Credential::new(CLIENT_SECRET),
    }
}

fn settings(server: &KeyVaultServer, ca: &TestCa, auth: AzureAuth) -> AzureSettings {
    AzureSettings {
        vault_url: server.url.clone(),
        auth,
        authority_host: server.url.clone(),
        ca_file: Some(ca.ca_file.clone()),
    }
}

fn spec(settings: AzureSettings) -> ProviderSpec {
    ProviderSpec {
        name: "kv-prod".to_string(),
        limits: limits(),
        settings: ProviderSettings::Azure(settings),
    }
}

async fn connect(settings: AzureSettings) -> Arc<dyn Provider> {
    dso_secrets::connect(&spec(settings)).await.unwrap()
}

fn text(v: &dso_secrets::SecretValue) -> String {
    String::from_utf8(v.expose().to_vec()).unwrap()
}

/// No error text holds a token, a credential or a value.
fn assert_clean(server: &KeyVaultServer, e: &Error) -> String {
    let text = format!("{e} / {e:?}");
    let mut secrets = vec![
        CURRENT.to_string(),
        OLD.to_string(),
        CLIENT_SECRET.to_string(),
        ASSERTION.to_string(),
        IDENTITY_HEADER.to_string(),
    ];
    secrets.extend(server.issued_tokens());
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "error text holds a secret: {text}");
    }
    text
}

/// A vault with `db-password`: an old and a current version.
async fn vault_with_secret(ca: &TestCa) -> (KeyVaultServer, String, String) {
    let server = KeyVaultServer::start(ca).await;
    let old = server.add_version("db-password", OLD, true, 1_764_500_000);
    let current = server.add_version("db-password", CURRENT, true, 1_764_583_200);
    (server, old, current)
}

#[tokio::test]
async fn challenge_then_token_then_version_and_fetch_with_one_token_for_many_calls() {
    let ca = test_ca();
    let (server, old, current) = vault_with_secret(&ca).await;
    let provider = connect(settings(&server, &ca, client_secret())).await;
    assert_eq!(
        server.token_calls() + server.calls("challenge"),
        0,
        "connect sends nothing"
    );
    let reference = provider.parse("db-password").unwrap();

    assert_eq!(
        provider.version(&reference).await.unwrap(),
        Version::new(current.clone())
    );
    assert_eq!(
        server.calls("challenge"),
        1,
        "the first request goes without a token"
    );
    assert_eq!(server.authorizations()[0], None);
    assert_eq!(server.calls("token-client-secret"), 1);
    assert_eq!(server.calls("versions"), 1);

    // Steady state: one versions call per version(), one get per fetch(), no new token.
    for round in 1..=5 {
        assert_eq!(
            provider.version(&reference).await.unwrap(),
            Version::new(current.clone())
        );
        assert_eq!(server.calls("versions"), 1 + round);
        assert_eq!(server.calls("get"), 0, "version() reads no value");
    }
    let value = provider
        .fetch(&reference, &Version::new(current.clone()))
        .await
        .unwrap();
    assert_eq!(text(&value), CURRENT);
    assert_eq!(server.calls("get"), 1);
    let value = provider.fetch(&reference, &Version::new(old)).await.unwrap();
    assert_eq!(text(&value), OLD, "fetch reads exactly the version asked for");

    // Concurrent calls share the cached token.
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let provider = Arc::clone(&provider);
            let reference = reference.clone();
            tokio::spawn(async move { provider.version(&reference).await.unwrap() })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(server.token_calls(), 1, "one token for every request");
    assert_eq!(server.calls("challenge"), 1);

    // The token is registered with the redactor.
    let token = server.issued_tokens().pop().unwrap();
    assert_eq!(
        Redactor::global().redact(&format!("Bearer {token}")),
        "Bearer [REDACTED]"
    );

    let (list, versions, tokens) = (
        server.calls("list"),
        server.calls("versions"),
        server.token_calls(),
    );
    let report = provider.check().await.unwrap();
    assert_eq!(server.calls("list"), list + 1, "check() is one list call");
    assert_eq!(
        (server.calls("versions"), server.token_calls()),
        (versions, tokens)
    );
    assert!(
        report.detail.contains("client secret") && report.detail.contains("https://localhost"),
        "{}",
        report.detail
    );
}

#[tokio::test]
async fn a_json_secret_gives_its_keys() {
    let ca = test_ca();
    let server = KeyVaultServer::start(&ca).await;
    let id = server.add_version(
        "db-json",
        r#"{"username":"app","password":"pw-in-json-77"}"#,
        true,
        1,
    );
    let provider = connect(settings(&server, &ca, client_secret())).await;
    let reference = provider.parse("db-json#password").unwrap();
    let v = provider.version(&reference).await.unwrap();
    assert_eq!(v, Version::new(id));
    assert_eq!(
        text(
            &reference
                .select(&provider.fetch(&reference, &v).await.unwrap())
                .unwrap()
        ),
        "pw-in-json-77"
    );
}

#[tokio::test]
async fn the_newest_enabled_version_is_the_token() {
    let ca = test_ca();
    let (server, old, current) = vault_with_secret(&ca).await;
    let newest_disabled = server.add_version("db-password", "s3cr3t-disabled-3", false, 1_764_600_000);
    let provider = connect(settings(&server, &ca, client_secret())).await;
    let reference = provider.parse("db-password").unwrap();
    assert_eq!(
        provider.version(&reference).await.unwrap(),
        Version::new(current.clone())
    );
    let e = provider
        .fetch(&reference, &Version::new(newest_disabled.clone()))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&e, Error::Unusable { reason, .. } if reason.contains("disabled")),
        "{e}"
    );

    server.set_enabled("db-password", &newest_disabled, true);
    assert_eq!(
        provider.version(&reference).await.unwrap(),
        Version::new(newest_disabled.clone())
    );
    for id in [&old, &current, &newest_disabled] {
        server.set_enabled("db-password", id, false);
    }
    let e = provider.version(&reference).await.unwrap_err();
    assert!(
        matches!(&e, Error::Unusable { reason, .. } if reason.contains("none of its 3 versions is enabled")),
        "{e}"
    );
    assert_clean(&server, &e);
}

#[tokio::test]
async fn versions_are_paged_with_next_link() {
    let ca = test_ca();
    let server = KeyVaultServer::start(&ca).await;
    server.set_page_size(2);
    let mut newest = String::new();
    for i in 0..7 {
        // Creation times out of order, so the newest is not the last added.
        let created = [5, 1, 7, 3, 9, 2, 4][i];
        let id = server.add_version("paged", &format!("value-{i}"), true, created);
        if created == 9 {
            newest = id;
        }
    }
    let provider = connect(settings(&server, &ca, client_secret())).await;
    let reference = provider.parse("paged").unwrap();
    assert_eq!(
        provider.version(&reference).await.unwrap(),
        Version::new(newest.clone())
    );
    assert_eq!(server.calls("versions"), 4, "7 versions, 2 a page: 4 pages");
    provider.version(&reference).await.unwrap();
    assert_eq!(server.calls("versions"), 8);
    assert_eq!(server.calls("challenge"), 1);
}

#[tokio::test]
async fn managed_identity_through_the_imds_endpoint_override() {
    let ca = test_ca();
    let (server, _, current) = vault_with_secret(&ca).await;
    let auth = AzureAuth::ManagedIdentity {
        client_id: Some(CLIENT_ID.to_string()),
        endpoint: Some(format!("{}/metadata/identity/oauth2/token", server.url)),
    };
    let provider = connect(settings(&server, &ca, auth)).await;
    let reference = provider.parse("db-password").unwrap();
    for _ in 0..3 {
        assert_eq!(
            provider.version(&reference).await.unwrap(),
            Version::new(current.clone())
        );
    }
    assert_eq!(
        text(&provider.fetch(&reference, &Version::new(current)).await.unwrap()),
        CURRENT
    );
    assert_eq!(server.calls("token-imds"), 1);
    assert_eq!(server.token_calls(), 1);
}

#[tokio::test]
async fn managed_identity_through_app_service_environment() {
    let ca = test_ca();
    let (server, _, current) = vault_with_secret(&ca).await;
    let endpoint = format!("{}/msi/token", server.url);
    let env = |name: &str| match name {
        "IDENTITY_ENDPOINT" => Some(endpoint.clone()),
        "IDENTITY_HEADER" => Some(IDENTITY_HEADER.to_string()),
        _ => None,
    };
    let auth = AzureAuth::ManagedIdentity {
        client_id: None,
        endpoint: None,
    };
    let provider = dso_secrets::azure::connect_with_env(&spec(settings(&server, &ca, auth.clone())), &env)
        .await
        .unwrap();
    let reference = provider.parse("db-password").unwrap();
    assert_eq!(
        provider.version(&reference).await.unwrap(),
        Version::new(current.clone())
    );
    provider.version(&reference).await.unwrap();
    assert_eq!(server.calls("token-app-service"), 1);

    // A wrong identity header is an auth error that does not show it.
    let wrong = |name: &str| match name {
        "IDENTITY_ENDPOINT" => Some(endpoint.clone()),
        "IDENTITY_HEADER" => Some("wrong-header-value-123".to_string()),
        _ => None,
    };
    let provider = dso_secrets::azure::connect_with_env(&spec(settings(&server, &ca, auth)), &wrong)
        .await
        .unwrap();
    let e = provider.version(&reference).await.unwrap_err();
    let text = assert_clean(&server, &e);
    assert!(
        matches!(e, Error::Auth { .. }) && !text.contains("wrong-header-value-123"),
        "{text}"
    );
}

#[tokio::test]
async fn workload_identity_sends_the_token_file_as_assertion() {
    let ca = test_ca();
    let (server, _, current) = vault_with_secret(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, format!("{ASSERTION}\n")).unwrap();
    let auth = AzureAuth::WorkloadIdentity {
        tenant_id: TENANT.to_string(),
        client_id: CLIENT_ID.to_string(),
        token_file: file.clone(),
    };
    let provider = connect(settings(&server, &ca, auth.clone())).await;
    let reference = provider.parse("db-password").unwrap();
    assert_eq!(provider.version(&reference).await.unwrap(), Version::new(current));
    assert_eq!(server.calls("token-workload"), 1);

    // The file is read at each token request: a bad assertion is rejected.
    std::fs::write(&file, "not-the-federated-token").unwrap();
    let provider = connect(settings(&server, &ca, auth)).await;
    let e = provider.version(&reference).await.unwrap_err();
    let text = assert_clean(&server, &e);
    assert!(
        matches!(e, Error::Auth { .. }) && text.contains("invalid_client"),
        "{text}"
    );
    assert!(!text.contains("not-the-federated-token"), "{text}");
    // A missing file is a config error at connect.
    let e = dso_secrets::connect(&spec(settings(
        &server,
        &ca,
        AzureAuth::WorkloadIdentity {
            tenant_id: TENANT.to_string(),
            client_id: CLIENT_ID.to_string(),
            token_file: dir.path().join("missing"),
        },
    )))
    .await
    .err()
    .unwrap();
    assert!(
        matches!(&e, Error::Config { detail, .. } if detail.contains("token_file") && detail.contains("missing")),
        "{e}"
    );
}

#[tokio::test]
async fn status_codes_map_to_errors() {
    let ca = test_ca();
    let (server, _, current) = vault_with_secret(&ca).await;
    server.add_version("locked", "s3cr3t-locked", true, 1);
    server.deny("locked");
    let provider = connect(settings(&server, &ca, client_secret())).await;
    let db = provider.parse("db-password").unwrap();
    let current = Version::new(current);

    let e = provider
        .version(&provider.parse("no-such-secret").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = provider
        .fetch(&db, &Version::new("0123456789abcdef0123456789abcdef"))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    let locked = provider.parse("locked").unwrap();
    let e = provider.version(&locked).await.unwrap_err();
    assert!(
        matches!(&e, Error::Forbidden { detail, .. } if detail.contains("does not have secrets list permission")),
        "{e}"
    );
    assert_clean(&server, &e);

    server.set_mode(Mode::Throttled(5));
    let e = provider.version(&db).await.unwrap_err();
    assert!(
        matches!(e, Error::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(5)),
        "{e}"
    );
    let e = provider.fetch(&db, &current).await.err().unwrap();
    assert!(matches!(e, Error::Throttled { .. }), "{e}");

    server.set_mode(Mode::Broken);
    let e = provider.version(&db).await.unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable { detail, .. } if detail.contains("500")),
        "{e}"
    );
    let e = provider.fetch(&db, &current).await.err().unwrap();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert_clean(&server, &e);

    // A 401 on a cached token gets one fresh token; a 401 on that one is an auth error.
    server.set_mode(Mode::RejectTokens);
    let tokens_before = server.token_calls();
    let e = provider.version(&db).await.unwrap_err();
    let text = assert_clean(&server, &e);
    assert!(
        matches!(e, Error::Auth { .. }) && text.contains("AKV10032"),
        "{text}"
    );
    assert_eq!(server.token_calls(), tokens_before + 1);

    server.set_mode(Mode::Normal);
    assert_eq!(provider.version(&db).await.unwrap(), current);

    // A wrong client secret: auth error with AAD's reason, never the secret.
    let auth = AzureAuth::ClientSecret {
        tenant_id: TENANT.to_string(),
        client_id: CLIENT_ID.to_string(),
        client_secret: Credential::new("cs~wrong-client-secret-xyz"),
    };
    let provider = connect(settings(&server, &ca, auth)).await;
    let e = provider.version(&db).await.unwrap_err();
    let text = assert_clean(&server, &e);
    assert!(
        matches!(e, Error::Auth { .. }) && text.contains("AADSTS7000215"),
        "{text}"
    );
    assert!(!text.contains("cs~wrong-client-secret-xyz"), "{text}");
}

#[tokio::test]
async fn a_challenge_for_another_resource_or_tenant_gets_no_token() {
    let ca = test_ca();
    let (server, _, _) = vault_with_secret(&ca).await;
    server.set_resource("https://vault.azure.net");
    let provider = connect(settings(&server, &ca, client_secret())).await;
    let db = provider.parse("db-password").unwrap();
    let e = provider.version(&db).await.unwrap_err();
    assert!(
        matches!(&e, Error::Auth { detail, .. } if detail.contains("not its domain")),
        "{e}"
    );
    assert_eq!(
        server.token_calls(),
        0,
        "no token is requested for a foreign resource"
    );

    server.set_resource("https://localhost");
    let auth = AzureAuth::ClientSecret {
        tenant_id: "contoso.onmicrosoft.com".to_string(),
        client_id: CLIENT_ID.to_string(),
        client_secret: Credential::new(CLIENT_SECRET),
    };
    let provider = connect(settings(&server, &ca, auth)).await;
    let e = provider.version(&db).await.unwrap_err();
    assert!(
        matches!(&e, Error::Auth { detail, .. } if detail.contains(&format!("set tenant_id to {TENANT}"))),
        "{e}"
    );
    assert_eq!(server.token_calls(), 0);
}

#[tokio::test]
async fn the_test_ca_is_trusted_only_through_ca_file() {
    let ca = test_ca();
    let (server, _, _) = vault_with_secret(&ca).await;
    let mut s = settings(&server, &ca, client_secret());
    s.ca_file = None;
    let provider = connect(s).await;
    let e = provider
        .version(&provider.parse("db-password").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert_eq!(server.calls("challenge"), 0, "no request got through");

    let mut s = settings(&server, &ca, client_secret());
    s.vault_url = "http://localhost:1".to_string();
    let e = dso_secrets::connect(&spec(s)).await.err().unwrap();
    assert!(
        matches!(&e, Error::Config { detail, .. } if detail.contains("not an https URL")),
        "{e}"
    );
}

#[tokio::test]
async fn nothing_secret_is_logged_at_trace() {
    crate::support::logs::capture();
    let ca = test_ca();
    let (server, _, current) = vault_with_secret(&ca).await;
    let provider = connect(settings(&server, &ca, client_secret())).await;
    let db = provider.parse("db-password").unwrap();
    let v = provider.version(&db).await.unwrap();
    assert_eq!(text(&provider.fetch(&db, &v).await.unwrap()), CURRENT);
    assert_eq!(v, Version::new(current));
    let _ = provider.version(&provider.parse("missing").unwrap()).await;
    provider.check().await.unwrap();

    let logs = crate::support::logs::text();
    assert!(
        logs.contains("azure token acquired"),
        "the capture works: {} bytes",
        logs.len()
    );
    let mut secrets = vec![CURRENT.to_string(), OLD.to_string(), CLIENT_SECRET.to_string()];
    secrets.extend(server.issued_tokens());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret is in the trace log ({} bytes)",
            logs.len()
        );
    }
}
