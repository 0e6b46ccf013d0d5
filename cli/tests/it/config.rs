//! `dso config validate`.

use crate::harness::{dso, stderr, stdout};

#[tokio::test]
async fn validate_prints_a_summary_of_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dso.yaml");
    std::fs::write(
        &f,
        "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:15432\n      backends: [{addr: 127.0.0.1:5432, label: blue}]\n      drain_timeout: 45s\n",
    )
    .unwrap();
    let out = dso(&["config", "validate", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ok, 1 listener(s)"), "{text}");
    assert!(
        text.contains("pg  127.0.0.1:15432 -> 127.0.0.1:5432 (blue)  drain 45s, hold max 30s"),
        "{text}"
    );
}

#[tokio::test]
async fn validate_names_key_and_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dso.yaml");
    std::fs::write(
        &f,
        "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:15432\n      drain_timeout: 30\n",
    )
    .unwrap();
    let out = dso(&["config", "validate", f.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&f.display().to_string()), "{err}");
    assert!(err.contains("proxy.listeners[0].drain_timeout"), "{err}");
    assert!(err.contains("line 5"), "{err}");

    let out = dso(&["config", "validate", "/nonexistent/dso.yaml"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read config /nonexistent/dso.yaml"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn validate_checks_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/echo.yaml");
    let out = dso(&["config", "validate", example]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}
