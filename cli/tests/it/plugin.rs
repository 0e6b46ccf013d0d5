//! Running as the Docker CLI plugin `docker-dso`.

use crate::harness::{DSO, stdout};

#[tokio::test]
async fn answers_metadata_and_drops_the_plugin_argument() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("docker-dso");
    std::os::unix::fs::symlink(DSO, &plugin).unwrap();

    let out = tokio::process::Command::new(&plugin)
        .arg("docker-cli-plugin-metadata")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["SchemaVersion"], "0.1.0");
    assert_eq!(meta["Vendor"], "dso");
    assert_eq!(meta["Version"], env!("CARGO_PKG_VERSION"));

    // `docker dso config validate F` runs `docker-dso dso config validate F`.
    let f = dir.path().join("empty.yaml");
    std::fs::write(&f, "").unwrap();
    let out = tokio::process::Command::new(&plugin)
        .args(["dso", "config", "validate"])
        .arg(&f)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("ok, 0 listener(s)"), "{}", stdout(&out));
}
