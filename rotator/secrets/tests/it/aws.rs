//! The `aws` provider against real moto_server processes (one or two per test, on free
//! loopback ports), with a counting forwarder between the SDK and moto so every test can
//! assert how many `DescribeSecret` and `GetSecretValue` calls were made.
//!
//! Credentials are explicit static test keys given to the SDK config loader
//! (`AwsProvider::connect_with`), so no test touches the process environment and no test
//! ever reaches the default chain's instance-metadata lookup.

mod capture;
mod forwarder;
mod moto;

use std::time::Duration;

use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_secretsmanager::primitives::Blob;
use dso_secrets::aws::AwsProvider;
use dso_secrets::spec::{AwsSettings, Limits, ProviderSettings, ProviderSpec};
use dso_secrets::{Error, Provider, Version};

use forwarder::{Fault, Forwarder};
use moto::Moto;

/// Static keys moto accepts when it checks no IAM policy.
fn test_keys() -> Credentials {
    Credentials::new("testing", "testing", None, None, "dso-test")
}

fn limits() -> Limits {
    Limits {
        retry_attempts: 3,
        retry_backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(10),
        ..Limits::default()
    }
}

fn spec(name: &str, region: &str, endpoint: &str, limits: Limits) -> ProviderSpec {
    ProviderSpec {
        name: name.to_string(),
        limits,
        settings: ProviderSettings::Aws(AwsSettings {
            region: Some(region.to_string()),
            endpoint_url: Some(endpoint.to_string()),
            profile: None,
            auth: Default::default(),
        }),
    }
}

async fn provider(name: &str, region: &str, endpoint: &str) -> AwsProvider {
    provider_with(spec(name, region, endpoint, limits()), test_keys()).await
}

async fn provider_with(spec: ProviderSpec, keys: Credentials) -> AwsProvider {
    AwsProvider::connect_with(&spec, |l| l.credentials_provider(keys))
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", spec.name))
}

/// A Secrets Manager client straight to moto (not through the forwarder) that sets up
/// the secrets the tests read.
fn admin(moto: &Moto, region: &str) -> aws_sdk_secretsmanager::Client {
    admin_with(moto, region, test_keys())
}

fn admin_with(moto: &Moto, region: &str, keys: Credentials) -> aws_sdk_secretsmanager::Client {
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .endpoint_url(moto.url())
        .credentials_provider(keys)
        .build();
    aws_sdk_secretsmanager::Client::from_conf(config)
}

async fn create_string(admin: &aws_sdk_secretsmanager::Client, name: &str, value: &str) -> String {
    admin
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .expect("CreateSecret")
        .version_id()
        .expect("VersionId")
        .to_string()
}

/// What the forwarder saw, for assertion messages.
fn seen(f: &Forwarder) -> String {
    let mut v: Vec<_> = f.counts().into_iter().collect();
    v.sort();
    format!("{v:?}")
}

#[tokio::test]
async fn aws_string_secret_one_describe_per_version_one_get_per_fetch() {
    let moto = Moto::start();
    let created = create_string(&admin(&moto, "us-east-1"), "prod/db/password", "s3cr3t-string").await;
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;
    let r = p.parse("prod/db/password").unwrap();

    let v = p.version(&r).await.unwrap();
    assert_eq!(
        v,
        Version::new(created.clone()),
        "the token is CreateSecret's VersionId"
    );
    assert_eq!(fwd.count("DescribeSecret"), 1, "{}", seen(&fwd));
    assert_eq!(
        fwd.count("GetSecretValue"),
        0,
        "version() reads no value: {}",
        seen(&fwd)
    );

    // A poll cycle that finds no change: metadata only, every time.
    for _ in 0..4 {
        assert_eq!(p.version(&r).await.unwrap(), v);
    }
    assert_eq!(fwd.count("DescribeSecret"), 5, "{}", seen(&fwd));
    assert_eq!(fwd.count("GetSecretValue"), 0, "{}", seen(&fwd));

    let value = p.fetch(&r, &v).await.unwrap();
    assert_eq!(value.expose(), b"s3cr3t-string");
    assert_eq!(fwd.count("GetSecretValue"), 1, "{}", seen(&fwd));
    assert_eq!(
        fwd.count("DescribeSecret"),
        5,
        "fetch() makes no metadata call: {}",
        seen(&fwd)
    );
    assert_eq!(fwd.counts().len(), 2, "no other call was made: {}", seen(&fwd));
}

#[tokio::test]
async fn aws_json_secret_field_selected() {
    let moto = Moto::start();
    let doc = r#"{"username":"app","password":"pw-json-1","port":5432}"#;
    create_string(&admin(&moto, "us-east-1"), "prod/db", doc).await;
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;

    let pw = p.parse("prod/db#password").unwrap();
    let user = p.parse("prod/db#username").unwrap();
    assert_eq!(
        pw.object_key(),
        user.object_key(),
        "two fields, one object to poll"
    );
    let v = p.version(&pw).await.unwrap();
    let whole = p.fetch(&pw, &v).await.unwrap();
    assert_eq!(whole.expose(), doc.as_bytes(), "fetch returns the whole object");
    assert_eq!(pw.select(&whole).unwrap().expose(), b"pw-json-1");
    assert_eq!(user.select(&whole).unwrap().expose(), b"app");
    assert_eq!(
        p.parse("prod/db#port").unwrap().select(&whole).unwrap().expose(),
        b"5432"
    );
    let missing = p
        .parse("prod/db#nope")
        .unwrap()
        .select(&whole)
        .err()
        .unwrap()
        .to_string();
    assert!(
        missing.contains("no key \"nope\"") && !missing.contains("pw-json-1"),
        "{missing}"
    );
    assert_eq!(
        (fwd.count("DescribeSecret"), fwd.count("GetSecretValue")),
        (1, 1),
        "{}",
        seen(&fwd)
    );
}

#[tokio::test]
async fn aws_binary_secret_bytes_unchanged() {
    let moto = Moto::start();
    let bytes: Vec<u8> = vec![0x00, 0xff, 0xfe, b'\n', b'$', b'"', 0x80, 0x01, 0x00];
    let created = admin(&moto, "us-east-1")
        .create_secret()
        .name("tls/key.der")
        .secret_binary(Blob::new(bytes.clone()))
        .send()
        .await
        .unwrap();
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;
    let r = p.parse("tls/key.der").unwrap();
    let v = p.version(&r).await.unwrap();
    assert_eq!(v.as_str(), created.version_id().unwrap());
    assert_eq!(p.fetch(&r, &v).await.unwrap().expose(), bytes.as_slice());
    assert_eq!(
        (fwd.count("DescribeSecret"), fwd.count("GetSecretValue")),
        (1, 1),
        "{}",
        seen(&fwd)
    );
}

#[tokio::test]
async fn aws_new_version_gets_a_new_token_and_old_version_still_reads_old_value() {
    let moto = Moto::start();
    let admin = admin(&moto, "us-east-1");
    let old_id = create_string(&admin, "app/api-key", "old-value-1").await;
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;
    let r = p.parse("app/api-key").unwrap();
    let old = p.version(&r).await.unwrap();
    assert_eq!(old.as_str(), old_id);

    let put = admin
        .put_secret_value()
        .secret_id("app/api-key")
        .secret_string("new-value-2")
        .send()
        .await
        .unwrap();
    let new = p.version(&r).await.unwrap();
    assert_ne!(new, old, "PutSecretValue moves AWSCURRENT to a new version id");
    assert_eq!(new.as_str(), put.version_id().unwrap());

    assert_eq!(p.fetch(&r, &new).await.unwrap().expose(), b"new-value-2");
    assert_eq!(
        p.fetch(&r, &old).await.unwrap().expose(),
        b"old-value-1",
        "fetch reads exactly the version asked for"
    );
    assert_eq!(
        (fwd.count("DescribeSecret"), fwd.count("GetSecretValue")),
        (2, 2),
        "{}",
        seen(&fwd)
    );
}

#[tokio::test]
async fn aws_not_found_secret_and_version() {
    let moto = Moto::start();
    create_string(&admin(&moto, "us-east-1"), "exists", "value-x").await;
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;

    let missing = p.parse("does/not/exist#password").unwrap();
    let e = p.version(&missing).await.expect_err("missing secret");
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("aws-main") && text.contains("does/not/exist#password"),
        "{text}"
    );
    assert!(!e.is_transient());
    assert_eq!(
        fwd.count("DescribeSecret"),
        1,
        "NotFound is not retried: {}",
        seen(&fwd)
    );

    let r = p.parse("exists").unwrap();
    let e = p
        .fetch(&r, &Version::new("00000000-0000-0000-0000-000000000000"))
        .await
        .err()
        .expect("missing version");
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(!e.to_string().contains("value-x"));
}

#[tokio::test]
async fn aws_two_instances_two_servers_two_regions_at_once() {
    let (east, west) = (Moto::start(), Moto::start());
    let east_id = create_string(&admin(&east, "us-east-1"), "shared/name", "value-from-east").await;
    let west_id = create_string(&admin(&west, "eu-west-1"), "shared/name", "value-from-west").await;
    let (fe, fw) = (
        Forwarder::start(east.addr).await,
        Forwarder::start(west.addr).await,
    );
    let (ue, uw) = (fe.url(), fw.url());
    let (pe, pw) = tokio::join!(
        provider("aws-east", "us-east-1", &ue),
        provider("aws-west", "eu-west-1", &uw)
    );
    assert_eq!((pe.region(), pw.region()), ("us-east-1", "eu-west-1"));
    let (re, rw) = (pe.parse("shared/name").unwrap(), pw.parse("shared/name").unwrap());

    for _ in 0..3 {
        let ((ve, vale), (vw, valw)) = tokio::join!(
            async {
                let v = pe.version(&re).await.unwrap();
                let val = pe.fetch(&re, &v).await.unwrap();
                (v, val)
            },
            async {
                let v = pw.version(&rw).await.unwrap();
                let val = pw.fetch(&rw, &v).await.unwrap();
                (v, val)
            }
        );
        assert_eq!(
            (ve.as_str(), vale.expose()),
            (east_id.as_str(), b"value-from-east".as_slice())
        );
        assert_eq!(
            (vw.as_str(), valw.expose()),
            (west_id.as_str(), b"value-from-west".as_slice())
        );
    }
    // Each instance spoke only to its own server.
    for f in [&fe, &fw] {
        assert_eq!(
            (f.count("DescribeSecret"), f.count("GetSecretValue")),
            (3, 3),
            "{}",
            seen(f)
        );
    }
    // The region is each instance's own: the east secret does not exist in west's region
    // on east's server.
    let west_on_east = provider("aws-west-on-east", "eu-west-1", &fe.url()).await;
    let e = west_on_east.version(&re).await.expect_err("other region");
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    // One instance's outage is not the other's.
    drop(west);
    let (e, ok) = tokio::join!(pw.version(&rw), pe.version(&re));
    let e = e.expect_err("west is down");
    assert!(matches!(e, Error::Unavailable { .. }) && e.is_transient(), "{e}");
    assert_eq!(ok.unwrap().as_str(), east_id);
}

#[tokio::test]
async fn aws_throttling_and_5xx_through_the_sdk_retries_from_limits() {
    let moto = Moto::start();
    let id = create_string(&admin(&moto, "us-east-1"), "busy", "v").await;
    let fwd = Forwarder::start(moto.addr).await;
    let attempts = 2;
    let p = provider_with(
        spec(
            "aws-main",
            "us-east-1",
            &fwd.url(),
            Limits {
                retry_attempts: attempts,
                ..limits()
            },
        ),
        test_keys(),
    )
    .await;
    let r = p.parse("busy").unwrap();
    let throttle = Fault {
        status: 400,
        headers: vec![("Retry-After".to_string(), "3".to_string())],
        code: "ThrottlingException".to_string(),
        message: "Rate exceeded".to_string(),
        raw_body: None,
    };

    // Throttled on every attempt: the SDK makes exactly `retry_attempts` attempts, then
    // the error says throttled, with the server's Retry-After.
    fwd.fail_next("DescribeSecret", attempts as usize, throttle.clone());
    let e = p.version(&r).await.expect_err("throttled");
    assert!(matches!(e, Error::Throttled { .. }), "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(fwd.count("DescribeSecret"), attempts as usize, "{}", seen(&fwd));

    // Throttled once: the SDK's second attempt succeeds.
    fwd.fail_next("DescribeSecret", 1, throttle);
    assert_eq!(p.version(&r).await.unwrap().as_str(), id);
    assert_eq!(
        fwd.count("DescribeSecret"),
        attempts as usize + 2,
        "{}",
        seen(&fwd)
    );

    // InternalServiceError (500) on every attempt: Unavailable, transient.
    let before = fwd.count("GetSecretValue");
    fwd.fail_next(
        "GetSecretValue",
        attempts as usize,
        Fault {
            status: 500,
            headers: vec![],
            code: "InternalServiceError".to_string(),
            message: "An error occurred on the server side.".to_string(),
            raw_body: None,
        },
    );
    let e = p.fetch(&r, &Version::new(id.clone())).await.err().expect("5xx");
    assert!(matches!(e, Error::Unavailable { .. }) && e.is_transient(), "{e}");
    assert_eq!(
        fwd.count("GetSecretValue") - before,
        attempts as usize,
        "{}",
        seen(&fwd)
    );

    // 503 without an AWS error code: Unavailable too.
    fwd.fail_next(
        "DescribeSecret",
        attempts as usize,
        Fault {
            status: 503,
            headers: vec![],
            code: "ServiceUnavailable".to_string(),
            message: "".to_string(),
            raw_body: None,
        },
    );
    let e = p.version(&r).await.expect_err("503");
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");

    // 429: Throttled.
    fwd.fail_next(
        "DescribeSecret",
        attempts as usize,
        Fault {
            status: 429,
            headers: vec![],
            code: "TooManyRequestsException".to_string(),
            message: "slow down".to_string(),
            raw_body: None,
        },
    );
    let e = p.version(&r).await.expect_err("429");
    assert!(
        matches!(
            e,
            Error::Throttled {
                retry_after: None,
                ..
            }
        ),
        "{e}"
    );

    // Nothing listening: Unavailable, within the deadline.
    let dead = format!("http://127.0.0.1:{}", moto::free_port());
    let p = provider_with(
        spec(
            "aws-dead",
            "us-east-1",
            &dead,
            Limits {
                retry_attempts: attempts,
                timeout: Duration::from_secs(3),
                ..limits()
            },
        ),
        test_keys(),
    )
    .await;
    let started = std::time::Instant::now();
    let e = p.version(&r).await.expect_err("connection refused");
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn aws_scheduled_for_deletion_is_unusable_with_the_reason() {
    let moto = Moto::start();
    let admin = admin(&moto, "us-east-1");
    let id = create_string(&admin, "retired", "old-secret-value").await;
    admin
        .delete_secret()
        .secret_id("retired")
        .recovery_window_in_days(7)
        .send()
        .await
        .unwrap();
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;
    let r = p.parse("retired").unwrap();
    let e = p.version(&r).await.expect_err("deleted");
    assert!(matches!(e, Error::Unusable { .. }), "{e}");
    assert!(
        e.to_string().contains("scheduled for deletion") && e.to_string().contains("restore-secret"),
        "{e}"
    );
    let e = p.fetch(&r, &Version::new(id)).await.err().expect("deleted");
    assert!(matches!(e, Error::Unusable { .. }), "{e}");
    assert!(!e.to_string().contains("old-secret-value"), "{e}");
}

/// An IAM call made before moto starts enforcing (no signature needed then).
async fn iam(moto: &Moto, form: &[(&str, &str)]) -> String {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let body: String = form
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let stream = tokio::net::TcpStream::connect(moto.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/")
        .header("host", moto.addr.to_string())
        .header("content-type", "application/x-www-form-urlencoded")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert!(resp.status().is_success(), "IAM {form:?}: {}", resp.status());
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn xml_text(doc: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = doc.find(&open).unwrap_or_else(|| panic!("no <{tag}> in {doc}")) + open.len();
    let end = doc[start..].find('<').unwrap() + start;
    doc[start..end].to_string()
}

#[tokio::test]
async fn aws_access_denied_and_unknown_keys_against_moto_iam() {
    // moto enforces IAM after the first 4 requests: create a user whose policy allows
    // DescribeSecret only, its access key, and one secret.
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]);
    iam(
        &moto,
        &[
            ("Action", "CreateUser"),
            ("UserName", "dso-reader"),
            ("Version", "2010-05-08"),
        ],
    )
    .await;
    let key = iam(
        &moto,
        &[
            ("Action", "CreateAccessKey"),
            ("UserName", "dso-reader"),
            ("Version", "2010-05-08"),
        ],
    )
    .await;
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["secretsmanager:DescribeSecret"],"Resource":"*"}]}"#;
    iam(
        &moto,
        &[
            ("Action", "PutUserPolicy"),
            ("UserName", "dso-reader"),
            ("PolicyName", "describe-only"),
            ("PolicyDocument", policy),
            ("Version", "2010-05-08"),
        ],
    )
    .await;
    create_string(&admin(&moto, "us-east-1"), "guarded", "guarded-value").await;
    let reader = Credentials::new(
        xml_text(&key, "AccessKeyId"),
        xml_text(&key, "SecretAccessKey"),
        None,
        None,
        "dso-test-iam",
    );
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider_with(spec("aws-iam", "us-east-1", &fwd.url(), limits()), reader).await;
    let r = p.parse("guarded").unwrap();

    let v = p.version(&r).await.expect("DescribeSecret is allowed");
    let e = p
        .fetch(&r, &v)
        .await
        .err()
        .expect("GetSecretValue is not allowed");
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    assert!(
        e.to_string().contains("guarded") && !e.to_string().contains("guarded-value"),
        "{e}"
    );
    assert_eq!(
        fwd.count("GetSecretValue"),
        1,
        "AccessDenied is not retried: {}",
        seen(&fwd)
    );

    // Keys moto's IAM does not know: authentication failed (not retried, not transient).
    let stranger = provider_with(
        spec("aws-stranger", "us-east-1", &fwd.url(), limits()),
        Credentials::new(
            "AKIAUNKNOWNUNKNOWN00",
            "not-a-real-secret-key",
            None,
            None,
            "dso-test",
        ),
    )
    .await;
    let e = stranger.version(&r).await.expect_err("unknown key");
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    assert!(!e.is_transient());
    let e = stranger.check().await.expect_err("check with unknown key");
    assert!(matches!(e, Error::Auth { .. }), "{e}");
}

#[tokio::test]
async fn aws_check_reports_region_endpoint_identity_and_reads_no_secret() {
    let moto = Moto::start();
    create_string(&admin(&moto, "eu-central-1"), "some/secret", "not-read-by-check").await;
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-doctor", "eu-central-1", &fwd.url()).await;
    let report = p.check().await.unwrap();
    assert_eq!(report.provider, "aws-doctor");
    assert!(report.detail.contains("eu-central-1"), "{}", report.detail);
    assert!(report.detail.contains(&fwd.url()), "{}", report.detail);
    assert!(report.detail.contains("identity arn:aws:"), "{}", report.detail);
    assert_eq!(fwd.count("GetSecretValue"), 0, "{}", seen(&fwd));
    assert_eq!(fwd.count("DescribeSecret"), 1, "{}", seen(&fwd));

    let dead = provider(
        "aws-dead",
        "eu-central-1",
        &format!("http://127.0.0.1:{}", moto::free_port()),
    )
    .await;
    let e = dead.check().await.expect_err("nothing listens");
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
}

#[tokio::test]
async fn aws_profile_gives_the_region() {
    let moto = Moto::start();
    create_string(&admin(&moto, "ap-southeast-2"), "from/profile", "profile-value").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::write(&config, "[profile dso-test]\nregion = ap-southeast-2\n").unwrap();
    let spec = ProviderSpec {
        name: "aws-profile".to_string(),
        limits: limits(),
        settings: ProviderSettings::Aws(AwsSettings {
            region: None,
            endpoint_url: Some(moto.url()),
            profile: Some("dso-test".to_string()),
            auth: Default::default(),
        }),
    };
    // The non-deprecated name lives in aws-runtime, which is not a direct dependency.
    #[allow(deprecated)]
    let files = aws_config::profile::profile_file::ProfileFiles::builder()
        .with_file(
            #[allow(deprecated)]
            aws_config::profile::profile_file::ProfileFileKind::Config,
            &config,
        )
        .build();
    let p = AwsProvider::connect_with(&spec, |l| {
        l.profile_files(files).credentials_provider(test_keys())
    })
    .await
    .unwrap();
    assert_eq!(p.region(), "ap-southeast-2");
    let r = p.parse("from/profile").unwrap();
    let v = p.version(&r).await.unwrap();
    assert_eq!(p.fetch(&r, &v).await.unwrap().expose(), b"profile-value");
}

#[tokio::test]
async fn aws_bad_settings_fail_at_connect_with_the_fix() {
    let e = AwsProvider::connect_with(
        &spec("aws-bad", "Not A Region", "http://127.0.0.1:1", limits()),
        |l| l.credentials_provider(test_keys()),
    )
    .await
    .err()
    .unwrap();
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("region"),
        "{e}"
    );
    let e = AwsProvider::connect_with(&spec("aws-bad", "us-east-1", "localhost:4566", limits()), |l| {
        l.credentials_provider(test_keys())
    })
    .await
    .err()
    .unwrap();
    assert!(e.to_string().contains("endpoint_url"), "{e}");
}

#[tokio::test]
async fn aws_trace_log_of_the_whole_flow_holds_no_value() {
    use base64::Engine as _;
    let moto = Moto::start();
    let admin = admin(&moto, "us-east-1");
    let string_value = "trace-canary-string-7d1f0b";
    let binary_value = b"trace-canary-binary-\x00\xff-4c2e".to_vec();
    create_string(&admin, "canary/string", string_value).await;
    admin
        .create_secret()
        .name("canary/binary")
        .secret_binary(Blob::new(binary_value.clone()))
        .send()
        .await
        .unwrap();
    let fwd = Forwarder::start(moto.addr).await;

    let capture = capture::Capture::default();
    let guard = tracing::dispatcher::set_default(&tracing::Dispatch::new(capture.clone()));
    let p = provider("aws-trace", "us-east-1", &fwd.url()).await;
    for (name, expected) in [
        ("canary/string", string_value.as_bytes()),
        ("canary/binary", &binary_value[..]),
    ] {
        let r = p.parse(name).unwrap();
        let v = p.version(&r).await.unwrap();
        assert_eq!(p.fetch(&r, &v).await.unwrap().expose(), expected);
    }
    let r = p.parse("canary/string").unwrap();
    let _ = p.fetch(&r, &Version::new("no-such-version")).await.err().unwrap();
    p.check().await.unwrap();
    drop(guard);

    let log = capture.text();
    assert!(
        log.contains("aws: GetSecretValue") && log.contains("canary/binary") && log.contains("REDACTED"),
        "the capture saw the SDK's trace output ({} bytes)",
        log.len()
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    for needle in [
        string_value.to_string(),
        b64.encode(string_value),
        b64.encode(&binary_value),
        "trace-canary-binary".to_string(),
    ] {
        assert!(!log.contains(&needle), "the trace log holds {needle:?}");
    }
}

/// The environment a child test process gets: exactly the variables named, plus PATH.
const CHILD_AWS_VARS: [&str; 9] = [
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SESSION_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
];

/// Runs this same test in a child process whose environment holds `env` (and no other AWS
/// variable, instance metadata disabled), so the real default credential chain is used
/// without changing this process's environment. Returns the child's output.
fn run_child(test: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    for k in CHILD_AWS_VARS {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "child {test}:\n{text}"
    );
    text
}

#[tokio::test]
async fn aws_registry_connect_uses_the_default_chain_from_the_environment() {
    const NAME: &str = "aws::aws_registry_connect_uses_the_default_chain_from_the_environment";
    match std::env::var("DSO_AWS_CHILD").as_deref() {
        Ok("env-keys") => {
            let endpoint = std::env::var("DSO_AWS_CHILD_ENDPOINT").unwrap();
            let p = dso_secrets::connect(&spec("aws-env", "us-east-1", &endpoint, limits()))
                .await
                .unwrap();
            assert_eq!(p.kind(), dso_secrets::ProviderKind::Aws);
            let r = p.parse("env/secret").unwrap();
            let v = p.version(&r).await.unwrap();
            assert_eq!(p.fetch(&r, &v).await.unwrap().expose(), b"env-value");
            let report = p.check().await.unwrap();
            println!("child check: {}", report.detail);
            return;
        }
        Ok("no-credentials") => {
            let endpoint = std::env::var("DSO_AWS_CHILD_ENDPOINT").unwrap();
            let e = dso_secrets::connect(&spec("aws-none", "us-east-1", &endpoint, limits()))
                .await
                .err()
                .expect("no credentials anywhere");
            assert!(matches!(e, Error::Auth { .. }), "{e}");
            assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
            println!("child error: {e}");
            return;
        }
        _ => {}
    }
    let moto = Moto::start();
    create_string(&admin(&moto, "us-east-1"), "env/secret", "env-value").await;
    let url = moto.url();
    let ok = run_child(
        NAME,
        &[
            ("DSO_AWS_CHILD", "env-keys"),
            ("DSO_AWS_CHILD_ENDPOINT", &url),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ],
    );
    assert!(
        ok.contains("child check: AWS Secrets Manager in region us-east-1"),
        "{ok}"
    );
    let none = run_child(
        NAME,
        &[
            ("DSO_AWS_CHILD", "no-credentials"),
            ("DSO_AWS_CHILD_ENDPOINT", &url),
        ],
    );
    assert!(
        none.contains("child error: provider aws-none: authentication failed"),
        "{none}"
    );
    for text in [&ok, &none] {
        let at = text.find("child ").unwrap_or(0);
        println!("{}", text[at..].lines().next().unwrap_or_default());
    }
}

#[tokio::test]
async fn aws_garbled_answer_is_a_protocol_error_that_quotes_nothing() {
    let moto = Moto::start();
    let id = create_string(&admin(&moto, "us-east-1"), "garbled", "v").await;
    let fwd = Forwarder::start(moto.addr).await;
    let p = provider("aws-main", "us-east-1", &fwd.url()).await;
    let r = p.parse("garbled").unwrap();
    // A 200 whose JSON is cut off inside the value (which looks like an XML error).
    fwd.fail_next(
        "GetSecretValue",
        1,
        Fault {
            status: 200,
            headers: vec![],
            code: String::new(),
            message: String::new(),
            raw_body: Some(
                r#"{"SecretString": "<Code>leak-canary</Code><Message>leak-canary</Message>"#.to_string(),
            ),
        },
    );
    let e = p.fetch(&r, &Version::new(id)).await.err().expect("garbled");
    assert!(matches!(e, Error::Protocol { .. }), "{e}");
    assert!(!e.to_string().contains("leak-canary"), "{e}");
}
