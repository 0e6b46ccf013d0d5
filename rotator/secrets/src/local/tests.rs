//! Tests of the vault file as a whole: round trips, versions, locking under concurrency,
//! damage and wrong keys (the file is never rewritten then), the provider contract.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::provider::{Provider, Version};
use crate::reference::Reference;
use crate::spec::{Limits, LocalSettings, ProviderKind, ProviderSettings, ProviderSpec};
use crate::value::MAX_VALUE_LEN;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn vault_path(&self) -> PathBuf {
        self.dir.path().join("vault.enc")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.path().join("master.key")
    }

    fn create(&self) -> LocalVault {
        LocalVault::create(&self.vault_path(), NewKey::KeyFile(self.key_path())).unwrap()
    }

    fn open(&self) -> LocalVault {
        LocalVault::open(&self.vault_path(), KeySource::KeyFile(self.key_path())).unwrap()
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.vault_path()).unwrap()
    }
}

fn value(bytes: &[u8]) -> SecretValue {
    SecretValue::from_slice(bytes)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Values that break shells and line-based formats come back byte for byte.
const AWKWARD: &[&[u8]] = &[
    b"line1\nline2\n",
    b"$HOME ${X} `id` $(id)",
    b"'single' \"double\" \\",
    "ünïcødé ✓ 秘密".as_bytes(),
    b"\0\x01\xff\xfe binary\0",
];

#[test]
fn set_get_list_delete_round_trip() {
    let f = Fixture::new();
    let vault = f.create();
    assert_eq!(mode(&f.vault_path()), 0o600);
    assert_eq!(mode(&f.key_path()), 0o600);
    assert!(vault.list().unwrap().is_empty());
    for (i, v) in AWKWARD.iter().enumerate() {
        vault.set(&format!("app/v{i}"), &value(v)).unwrap();
    }
    let reopened = f.open();
    for (i, v) in AWKWARD.iter().enumerate() {
        let (info, got) = reopened.get(&format!("app/v{i}")).unwrap().unwrap();
        assert_eq!(got.expose(), *v);
        assert_eq!(info.version, i as u64 + 1);
    }
    let names: Vec<String> = reopened.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["app/v0", "app/v1", "app/v2", "app/v3", "app/v4"]);
    assert!(reopened.get("app/none").unwrap().is_none());
    assert_eq!(reopened.delete("app/v0").unwrap().unwrap().version, 1);
    assert!(reopened.get("app/v0").unwrap().is_none());
    let before = f.bytes();
    assert!(reopened.delete("app/v0").unwrap().is_none());
    assert_eq!(f.bytes(), before, "deleting a missing name writes nothing");
    // No temp file is left behind; the lock file stays.
    let mut left: Vec<String> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["master.key", "vault.enc", "vault.enc.lock"]);
}

#[test]
fn versions_grow_and_are_never_reused() {
    let f = Fixture::new();
    let vault = f.create();
    let a1 = vault.set("a", &value(b"one1")).unwrap();
    let a2 = vault.set("a", &value(b"two2")).unwrap();
    assert!(a2.version > a1.version);
    assert!(a2.updated >= a1.updated);
    vault.delete("a").unwrap();
    let a3 = vault.set("a", &value(b"one1")).unwrap();
    assert!(
        a3.version > a2.version,
        "after delete+set: {} vs {}",
        a3.version,
        a2.version
    );
    assert_ne!(token(&a3), token(&a1));
}

#[test]
fn values_up_to_the_limit_and_not_beyond() {
    let f = Fixture::new();
    let vault = f.create();
    let half = vec![0xa5u8; 512 * 1024];
    vault.set("half", &SecretValue::new(half.clone())).unwrap();
    let max = vec![0x5au8; MAX_VALUE_LEN];
    vault.set("max", &SecretValue::new(max.clone())).unwrap();
    let before = f.bytes();
    let e = vault
        .set("big", &SecretValue::new(vec![0u8; MAX_VALUE_LEN + 1]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&MAX_VALUE_LEN.to_string()) && e.contains("\"big\""),
        "{e}"
    );
    assert!(vault.set("empty", &value(b"")).is_err());
    assert_eq!(f.bytes(), before);
    assert_eq!(vault.get("half").unwrap().unwrap().1.expose(), &half[..]);
    assert_eq!(vault.get("max").unwrap().unwrap().1.expose(), &max[..]);
}

#[test]
fn names_follow_the_local_reference_syntax() {
    for ok in ["db_password", "myapp/db_password", "a.b-c/d_e"] {
        check_name(ok).unwrap();
    }
    for bad in [
        "",
        "/abs",
        "a//b",
        "../x",
        "a/./b",
        "a b",
        "a#b",
        "tab\there",
        &"x".repeat(300),
    ] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn an_entry_copied_under_another_name_does_not_decrypt() {
    let f = Fixture::new();
    let vault = f.create();
    vault.set("app/a", &value(b"value-of-a")).unwrap();
    vault.set("app/b", &value(b"value-of-b")).unwrap();
    // Someone with the key (who can make the file MAC valid) puts b's sealed value under
    // a's name: it still must not decrypt as a.
    vault.write_raw(|entries| {
        let b = entries.iter().find(|e| e.name == "app/b").unwrap().clone();
        let a = entries.iter_mut().find(|e| e.name == "app/a").unwrap();
        a.nonce = b.nonce;
        a.ciphertext = b.ciphertext;
        a.version = b.version;
        a.updated_ns = b.updated_ns;
    });
    let e = vault.get("app/a").err().unwrap();
    assert!(matches!(e, VaultError::EntryDamaged { .. }), "{e}");
    assert!(e.to_string().contains("vault.enc") && !e.to_string().contains("value-of"));
    assert_eq!(vault.get("app/b").unwrap().unwrap().1.expose(), b"value-of-b");
    // Metadata reads decrypt nothing, so they still work.
    assert_eq!(vault.list().unwrap().len(), 2);
}

#[test]
fn a_damaged_file_is_an_error_and_never_rewritten() {
    let f = Fixture::new();
    let vault = f.create();
    vault.set("app/a", &value(b"aaaa")).unwrap();
    let good = f.bytes();
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("flipped bit in a value", {
            let mut b = good.clone();
            let at = b.len() - 40;
            b[at] ^= 1;
            b
        }),
        ("flipped bit in a name", {
            let mut b = good.clone();
            let at = b.windows(5).position(|w| w == b"app/a").unwrap();
            b[at] ^= 1;
            b
        }),
        ("truncated", good[..good.len() - 7].to_vec()),
        ("extra byte", [good.as_slice(), b"x"].concat()),
        ("not a vault", b"# just some text\n".to_vec()),
    ];
    for (what, bytes) in damages {
        std::fs::write(f.vault_path(), &bytes).unwrap();
        let e = vault.set("app/b", &value(b"bbbb")).unwrap_err().to_string();
        assert!(e.contains(&f.vault_path().display().to_string()), "{what}: {e}");
        assert!(
            e.contains("damaged") || e.contains("not a dso vault"),
            "{what}: {e}"
        );
        assert_eq!(f.bytes(), bytes, "{what}: the file was rewritten");
        assert!(vault.delete("app/a").is_err(), "{what}");
        assert_eq!(f.bytes(), bytes, "{what}: the file was rewritten by delete");
        assert!(vault.list().is_err(), "{what}");
        assert!(
            LocalVault::open(&f.vault_path(), KeySource::KeyFile(f.key_path())).is_err(),
            "{what}"
        );
    }
}

#[test]
fn a_wrong_key_is_an_error_and_never_rewrites() {
    let f = Fixture::new();
    let vault = f.create();
    vault.set("app/a", &value(b"aaaa")).unwrap();
    let other = Fixture::new();
    other.create();
    let e = LocalVault::open(&f.vault_path(), KeySource::KeyFile(other.key_path()))
        .err()
        .unwrap();
    assert!(matches!(e, VaultError::WrongKey { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("wrong key") && text.contains(&f.vault_path().display().to_string()),
        "{text}"
    );

    // A handle opened with the right key meets a file made with another key (swapped in
    // behind its back): writes refuse and leave it as it is.
    std::fs::copy(other.vault_path(), f.vault_path()).unwrap();
    let swapped = f.bytes();
    let e = vault.set("app/b", &value(b"bbbb")).unwrap_err();
    assert!(matches!(e, VaultError::WrongKey { .. }), "{e}");
    assert_eq!(f.bytes(), swapped);
}

#[test]
fn create_refuses_existing_files() {
    let f = Fixture::new();
    f.create();
    let vault_before = f.bytes();
    let key_before = std::fs::read(f.key_path()).unwrap();
    let e = LocalVault::create(&f.vault_path(), NewKey::KeyFile(f.dir.path().join("new.key")))
        .err()
        .unwrap();
    assert!(matches!(e, VaultError::Exists { .. }), "{e}");
    assert!(
        !f.dir.path().join("new.key").exists(),
        "no key made for a refused vault"
    );
    let e = LocalVault::create(&f.dir.path().join("other.enc"), NewKey::KeyFile(f.key_path()))
        .err()
        .unwrap();
    assert!(matches!(e, VaultError::Exists { .. }), "{e}");
    assert!(!f.dir.path().join("other.enc").exists());
    assert_eq!(f.bytes(), vault_before);
    assert_eq!(std::fs::read(f.key_path()).unwrap(), key_before);
}

#[test]
fn passphrase_vaults() {
    let f = Fixture::new();
    let params = new_argon2_params(1024, 1, 1).unwrap();
    let vault = LocalVault::create(
        &f.vault_path(),
        NewKey::Passphrase {
            passphrase: value(b"correct horse battery"),
            params,
        },
    )
    .unwrap();
    vault.set("db", &value(b"pw\n")).unwrap();
    assert!(matches!(
        LocalVault::read_protection(&f.vault_path()).unwrap(),
        Protection::Passphrase(p) if p == params
    ));
    let opened = LocalVault::open(
        &f.vault_path(),
        KeySource::Passphrase(value(b"correct horse battery")),
    )
    .unwrap();
    assert_eq!(opened.get("db").unwrap().unwrap().1.expose(), b"pw\n");
    let e = LocalVault::open(
        &f.vault_path(),
        KeySource::Passphrase(value(b"wrong horse battery")),
    )
    .err()
    .unwrap();
    assert!(matches!(e, VaultError::WrongKey { .. }), "{e}");
    let e = LocalVault::open(&f.vault_path(), KeySource::KeyFile(f.key_path()))
        .err()
        .unwrap();
    assert!(matches!(e, VaultError::WrongProtection { .. }), "{e}");
    assert!(e.to_string().contains("DSO_VAULT_PASSPHRASE"), "{e}");
}

#[test]
fn concurrent_writers_with_separate_opens_lose_nothing() {
    let f = Fixture::new();
    f.create();
    let writers = 20;
    let per_writer = 5;
    std::thread::scope(|s| {
        for w in 0..writers {
            let f = &f;
            s.spawn(move || {
                let vault = f.open();
                for i in 0..per_writer {
                    vault
                        .set(&format!("w{w}/s{i}"), &value(format!("value {w} {i}").as_bytes()))
                        .unwrap();
                }
            });
        }
    });
    let vault = f.open();
    let list = vault.list().unwrap();
    assert_eq!(list.len(), writers * per_writer);
    let mut versions: Vec<u64> = list.iter().map(|e| e.version).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(
        versions.len(),
        writers * per_writer,
        "every write took its own version"
    );
    for w in 0..writers {
        for i in 0..per_writer {
            let (_, v) = vault.get(&format!("w{w}/s{i}")).unwrap().unwrap();
            assert_eq!(v.expose(), format!("value {w} {i}").as_bytes());
        }
    }
}

fn spec(f: &Fixture, key: Option<PathBuf>) -> ProviderSpec {
    ProviderSpec {
        name: "vault1".into(),
        limits: Limits::default(),
        settings: ProviderSettings::Local(LocalSettings {
            vault_file: f.vault_path(),
            master_key_file: key,
        }),
    }
}

#[tokio::test]
async fn provider_version_fetch_check() {
    let f = Fixture::new();
    let writer = f.create();
    writer
        .set("myapp/db", &value(br#"{"user":"u","password":"p$w"}"#))
        .unwrap();
    let provider = crate::connect(&spec(&f, Some(f.key_path()))).await.unwrap();
    assert_eq!(provider.kind(), ProviderKind::Local);
    let r = provider.parse("myapp/db#password").unwrap();
    let v1 = provider.version(&r).await.unwrap();
    assert_eq!(
        provider.version(&r).await.unwrap(),
        v1,
        "unchanged file, same token"
    );
    let whole = provider.fetch(&r, &v1).await.unwrap();
    assert_eq!(r.select(&whole).unwrap().expose(), b"p$w");

    // Another process sets a new value: the token moves, the old version is gone.
    writer
        .set("myapp/db", &value(br#"{"user":"u","password":"new"}"#))
        .unwrap();
    let v2 = provider.version(&r).await.unwrap();
    assert_ne!(v1, v2);
    let e = provider.fetch(&r, &v1).await.err().unwrap();
    assert!(matches!(e, crate::Error::NotFound { .. }), "{e}");
    let whole = provider.fetch(&r, &v2).await.unwrap();
    assert_eq!(r.select(&whole).unwrap().expose(), b"new");
    assert!(provider.fetch(&r, &Version::new("0@0")).await.is_err());

    let missing = Reference::parse(ProviderKind::Local, "vault1", "myapp/none").unwrap();
    assert!(matches!(
        provider.version(&missing).await,
        Err(crate::Error::NotFound { .. })
    ));

    let report = provider.check().await.unwrap();
    assert!(
        report.detail.contains("1 entries") && report.detail.contains("master.key"),
        "{report:?}"
    );

    // A damaged file at runtime is an outage (keep the last good values), not a panic.
    std::fs::write(f.vault_path(), b"DSOVAULT\0\x01garbage").unwrap();
    let e = provider.version(&r).await.err().unwrap();
    assert!(e.is_transient(), "{e}");
    assert!(provider.check().await.is_err());
}

#[tokio::test]
async fn provider_connect_errors_name_the_file() {
    let f = Fixture::new();
    let e = crate::connect(&spec(&f, Some(f.key_path())))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no vault at") && e.contains("vault.enc") && e.contains("dso init"),
        "{e}"
    );
    f.create();
    let other = Fixture::new();
    other.create();
    let e = crate::connect(&spec(&f, Some(other.key_path())))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("wrong key"), "{e}");
}

#[tokio::test]
async fn provider_over_a_passphrase_vault() {
    let f = Fixture::new();
    let params = new_argon2_params(1024, 1, 1).unwrap();
    let passphrase = value(b"a long passphrase");
    let vault = LocalVault::create(
        &f.vault_path(),
        NewKey::Passphrase {
            passphrase: passphrase.duplicate(),
            params,
        },
    )
    .unwrap();
    vault.set("x", &value(b"xval")).unwrap();
    let opened = LocalVault::open(&f.vault_path(), KeySource::Passphrase(passphrase)).unwrap();
    let provider = LocalProvider::new("p", opened);
    let r = provider.parse("x").unwrap();
    let v = provider.version(&r).await.unwrap();
    assert_eq!(provider.fetch(&r, &v).await.unwrap().expose(), b"xval");
    assert!(provider.check().await.unwrap().detail.contains("Argon2id"));
}

#[test]
fn set_many_writes_once_with_distinct_versions() {
    let f = Fixture::new();
    let vault = f.create();
    let (a, b) = (value(b"aaaa"), value(b"bbbb"));
    let infos = vault.set_many(&[("m/b", &b), ("m/a", &a)]).unwrap();
    assert_eq!(infos.iter().map(|i| i.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(vault.get("m/a").unwrap().unwrap().1.expose(), b"aaaa");
    assert_eq!(vault.list().unwrap()[0].name, "m/a", "kept sorted");
    let before = f.bytes();
    assert!(vault.set_many(&[("ok", &a), ("bad name", &b)]).is_err());
    assert_eq!(f.bytes(), before, "a bad item writes nothing");
}
