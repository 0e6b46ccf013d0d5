use super::*;

#[test]
fn user_strings_become_uid_and_gid() {
    assert_eq!(parse_user(""), Some((0, 0)));
    assert_eq!(parse_user("1000"), Some((1000, 0)));
    assert_eq!(parse_user("1000:1001"), Some((1000, 1001)));
    assert_eq!(parse_user(" 7:8 "), Some((7, 8)));
    assert_eq!(parse_user("app"), None);
    assert_eq!(parse_user("1000:app"), None);
}

#[test]
fn a_wrapped_entrypoint_unwraps_to_the_original() {
    let mut e = launcher_args();
    e.extend(["/dso-testsrv".to_owned(), "--x".to_owned()]);
    assert_eq!(
        unwrap_entrypoint(&e),
        vec!["/dso-testsrv".to_owned(), "--x".to_owned()]
    );
    assert!(unwrap_entrypoint(&launcher_args()).is_empty());
}

use std::collections::BTreeMap;

use dso_secrets::config::{RotationSpec, Targets};
use dso_secrets::{ProviderKind, Reference};

/// A delivery on its own tmpfs (mounted by `Store::open` on a fresh dir, as root), with
/// a launcher file; unmounted on drop.
struct Fx {
    d: Delivery,
    launcher: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.d.store().root(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn secret(name: &str, keys: &[&str], inject: InjectSpec) -> SecretSpec {
    SecretSpec {
        name: name.to_owned(),
        provider: "local".to_owned(),
        mappings: keys
            .iter()
            .map(|k| {
                (
                    (*k).to_owned(),
                    Reference::parse(ProviderKind::Local, "local", &format!("app/{k}")).unwrap(),
                )
            })
            .collect(),
        targets: Targets::default(),
        inject,
        rotation: RotationSpec::default(),
    }
}

fn fx(secrets: Vec<SecretSpec>) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("dso-init");
    std::fs::write(&launcher, b"#!launcher").unwrap();
    let d = Delivery::new(DeliveryConfig {
        root: dir.path().join("root"),
        store: StoreOptions {
            mount: true,
            size_bytes: 8 << 20,
        },
        launcher: Some(launcher.clone()),
        secrets,
        providers: BTreeMap::from([("local".to_string(), dso_secrets::ProviderKind::Local)]),
    })
    .expect("tests run as root: the store mounts its tmpfs");
    Fx {
        d,
        launcher,
        _dir: dir,
    }
}

fn container(labels: &[(&str, &str)], user: &str) -> Container {
    Container {
        id: "blue0123456789".into(),
        name: "shop-web-1".into(),
        image: "app".into(),
        image_id: "sha256:app".into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        running: true,
        health: crate::engine::DockerHealth::None,
        networks: BTreeMap::new(),
        publishes_ports: false,
        auto_remove: false,
        mounts: Vec::new(),
        process: crate::engine::Process {
            user: user.to_owned(),
            entrypoint: vec!["/app".into()],
            cmd: vec!["--serve".into()],
            binds: vec!["/data:/data".into()],
            started_at: String::new(),
        },
    }
}

fn bundle(items: &[(&str, &str, &[u8])]) -> Bundle {
    Bundle::new(
        items
            .iter()
            .map(|(s, k, v)| ((*s).to_owned(), (*k).to_owned(), SecretValue::from_slice(v)))
            .collect(),
        Vec::new(),
    )
}

fn file(mode: u32) -> InjectSpec {
    InjectSpec::File {
        path: PathBuf::from("/run/secrets"),
        mode,
        uid: None,
        gid: None,
        env_pointers: false,
    }
}

#[test]
fn consumers_come_from_the_label_and_from_targets() {
    let mut by_service = secret("b", &["k"], file(0o400));
    by_service.targets.services = vec!["web".into()];
    let mut by_label = secret("c", &["k2"], file(0o400));
    by_label.targets.labels = BTreeMap::from([("tier".to_owned(), "front".to_owned())]);
    let f = fx(vec![
        secret("a", &["k0"], file(0o400)),
        by_service,
        by_label,
        secret("d", &["k3"], file(0o400)),
    ]);
    let c = container(
        &[
            ("dso.secrets", " a , nope"),
            ("com.docker.compose.service", "web"),
            ("tier", "front"),
        ],
        "",
    );
    let names: Vec<String> = f.d.consumed(&c).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(f.d.consumed(&container(&[], "")).is_empty());
}

#[test]
fn a_plan_writes_files_owned_by_the_container_user_and_binds_their_directory_read_only() {
    let f = fx(vec![secret("db", &["password", "user"], file(0o440))]);
    let blue = container(&[("dso.secrets", "db")], "1000:1001");
    let b = bundle(&[("db", "password", b"p\x00w\n$"), ("db", "user", b"app")]);
    let p = f.d.plan(&blue, Some(&b), "r1").unwrap().expect("a plan");
    assert_eq!(p.labels, vec![(LABEL_INSTANCE.to_owned(), "r1".to_owned())]);
    let dir = f.d.store().group_dir("r1", "f0").unwrap();
    assert_eq!(
        p.overrides.add_binds,
        vec![format!("{}:/run/secrets:ro", dir.display())]
    );
    assert!(p.overrides.drop_binds.is_empty(), "the user's own bind stays");
    assert_eq!(
        p.overrides.entrypoint, None,
        "file injection keeps the entrypoint"
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join("password")).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o440, 1000, 1001));
    assert_eq!(std::fs::read(dir.join("password")).unwrap(), b"p\x00w\n$");
    assert!(p.env.is_empty());
}

#[test]
fn a_copy_of_a_delivered_container_takes_its_files_and_drops_its_binds() {
    let f = fx(vec![
        secret("db", &["password"], file(0o400)),
        secret(
            "api",
            &["API_KEY"],
            InjectSpec::Env {
                env_mode: EnvMode::Launcher,
            },
        ),
    ]);
    let blue = container(&[("dso.secrets", "db,api")], "7");
    let first =
        f.d.plan(
            &blue,
            Some(&bundle(&[("db", "password", b"v1"), ("api", "API_KEY", b"k1")])),
            "r1",
        )
        .unwrap()
        .unwrap();
    let (entry, cmd) = first
        .overrides
        .entrypoint
        .clone()
        .expect("the launcher wraps the entrypoint");
    assert_eq!(
        entry,
        ["/run/dso/init", "--env-dir", "/run/dso/env", "--", "/app"]
    );
    assert_eq!(cmd, ["--serve"]);
    assert!(
        first
            .overrides
            .add_binds
            .contains(&format!("{}:/run/dso/init:ro", f.launcher.display()))
    );
    // Green of a later manual rotation (no bundle): blue's values, its own directory,
    // blue's dso binds dropped, the entrypoint already wrapped left alone.
    let mut green_of = blue.clone();
    green_of.labels.insert(LABEL_INSTANCE.into(), "r1".into());
    green_of
        .process
        .binds
        .extend(first.overrides.add_binds.iter().cloned());
    green_of.process.entrypoint = entry;
    let second = f.d.plan(&green_of, None, "r2").unwrap().unwrap();
    assert_eq!(second.overrides.entrypoint, None);
    assert_eq!(second.overrides.drop_binds, first.overrides.add_binds);
    let dir = f.d.store().group_dir("r2", "env").unwrap();
    assert_eq!(std::fs::read(dir.join("API_KEY")).unwrap(), b"k1");
    assert_eq!(
        std::fs::read(f.d.store().group_dir("r2", "f0").unwrap().join("password")).unwrap(),
        b"v1"
    );
}

#[test]
fn in_place_updates_change_only_the_files_and_need_a_delivered_container() {
    let f = fx(vec![secret("tok", &["token", "other"], file(0o400))]);
    let blue = container(&[("dso.secrets", "tok")], "");
    assert!(
        !f.d.can_update_in_place(&blue),
        "never delivered: needs a replacement"
    );
    assert!(matches!(
        f.d.update_in_place(&blue, &bundle(&[])),
        Err(DeliveryError::NoInstance { .. })
    ));
    f.d.plan(
        &blue,
        Some(&bundle(&[("tok", "token", b"a"), ("tok", "other", b"o")])),
        "r1",
    )
    .unwrap()
    .unwrap();
    let mut delivered = blue.clone();
    delivered.labels.insert(LABEL_INSTANCE.into(), "r1".into());
    assert!(f.d.can_update_in_place(&delivered));
    f.d.update_in_place(&delivered, &bundle(&[("tok", "token", b"b")]))
        .unwrap();
    let dir = f.d.store().group_dir("r1", "f0").unwrap();
    assert_eq!(std::fs::read(dir.join("token")).unwrap(), b"b");
    assert_eq!(
        std::fs::read(dir.join("other")).unwrap(),
        b"o",
        "values the bundle lacks stay"
    );
}

#[test]
fn bad_layouts_are_refused_and_leave_no_directory() {
    let f = fx(vec![
        secret("a", &["same"], file(0o400)),
        secret("b", &["same"], file(0o400)),
        secret("named", &["x"], file(0o400)),
    ]);
    let clash = container(&[("dso.secrets", "a,b")], "");
    let e =
        f.d.plan(
            &clash,
            Some(&bundle(&[("a", "same", b"1"), ("b", "same", b"2")])),
            "r1",
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("/run/secrets/same") && e.to_string().contains("rename one mapping key"),
        "{e}"
    );
    let user = container(&[("dso.secrets", "named")], "app");
    let e =
        f.d.plan(&user, Some(&bundle(&[("named", "x", b"1")])), "r2")
            .unwrap_err();
    assert!(e.to_string().contains("inject.uid"), "{e}");
    let missing = container(&[("dso.secrets", "named")], "");
    let e = f.d.plan(&missing, Some(&bundle(&[])), "r3").unwrap_err();
    assert!(matches!(e, DeliveryError::Missing { .. }), "{e}");
    assert!(
        f.d.store().instances().unwrap().is_empty(),
        "nothing half-written is left"
    );
}

#[test]
fn sweep_keeps_referenced_and_young_directories() {
    let f = fx(vec![secret("s", &["k"], file(0o400))]);
    let c = container(&[("dso.secrets", "s")], "");
    for i in ["keep", "young"] {
        f.d.plan(&c, Some(&bundle(&[("s", "k", b"v")])), i)
            .unwrap()
            .unwrap();
    }
    let referenced = HashSet::from(["keep".to_owned()]);
    assert!(
        f.d.sweep(&referenced, SWEEP_MIN_AGE).is_empty(),
        "young directories stay"
    );
    assert_eq!(f.d.sweep(&referenced, Duration::ZERO), ["young"]);
    assert_eq!(f.d.store().instances().unwrap(), ["keep"]);
}

#[test]
fn a_remote_plan_uses_volumes_and_the_launcher_waits_for_every_group() {
    let f = fx(vec![secret("db", &["password"], file(0o400))]);
    f.d.set_remote(true);
    let blue = container(&[("dso.secrets", "db")], "");
    let p =
        f.d.plan(&blue, Some(&bundle(&[("db", "password", b"v")])), "r1")
            .unwrap()
            .unwrap();
    assert_eq!(
        p.overrides.add_binds,
        ["dso-r1-f0:/run/secrets", "dso-r1-env:/run/dso/env"]
    );
    let vols: Vec<(&str, &str)> = p
        .volumes
        .iter()
        .map(|v| (v.volume.as_str(), v.target.as_str()))
        .collect();
    assert_eq!(
        vols,
        [("dso-r1-f0", "/run/secrets"), ("dso-r1-env", "/run/dso/env")]
    );
    assert_eq!(p.launcher_upload.as_deref(), Some(f.launcher.as_path()));
    let (entry, _) = p.overrides.entrypoint.unwrap();
    assert_eq!(
        entry,
        [
            "/run/dso/init",
            "--env-dir",
            "/run/dso/env",
            "--wait-for",
            "/run/secrets/.dso-ready",
            "--wait-for",
            "/run/dso/env/.dso-ready",
            "--",
            "/app"
        ]
    );
    let mut a = tar::Archive::new(p.volumes[0].archive());
    let names: Vec<String> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["password", ".dso-ready"]);
}

#[test]
fn env_pointers_name_the_file_paths_not_the_values() {
    let mut s = secret("pg", &["POSTGRES_PASSWORD"], file(0o400));
    if let InjectSpec::File { env_pointers, .. } = &mut s.inject {
        *env_pointers = true;
    }
    let f = fx(vec![s]);
    let blue = container(&[("dso.secrets", "pg")], "999");
    let p =
        f.d.plan(
            &blue,
            Some(&bundle(&[("pg", "POSTGRES_PASSWORD", b"hunter2")])),
            "r1",
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        p.env,
        [(
            "POSTGRES_PASSWORD_FILE".to_owned(),
            "/run/secrets/POSTGRES_PASSWORD".to_owned()
        )]
    );
}

#[test]
fn debug_output_of_a_plan_holds_no_value() {
    let f = fx(vec![secret(
        "n",
        &["TOKEN"],
        InjectSpec::Env {
            env_mode: EnvMode::Native,
        },
    )]);
    let blue = container(&[("dso.secrets", "n")], "");
    let p =
        f.d.plan(&blue, Some(&bundle(&[("n", "TOKEN", b"native-secret-42")])), "r1")
            .unwrap()
            .unwrap();
    assert_eq!(p.env, [("TOKEN".to_owned(), "native-secret-42".to_owned())]);
    let text = format!("{p:?}");
    assert!(
        text.contains("TOKEN") && !text.contains("native-secret-42"),
        "{text}"
    );
}

#[test]
fn a_users_volume_named_like_dsos_is_kept_in_a_copy() {
    let f = fx(vec![secret("db", &["password"], file(0o400))]);
    f.d.set_remote(true);
    let mut blue = container(&[("dso.secrets", "db"), (LABEL_INSTANCE, "r1")], "");
    f.d.plan(
        &container(&[("dso.secrets", "db")], ""),
        Some(&bundle(&[("db", "password", b"v")])),
        "r1",
    )
    .unwrap()
    .unwrap();
    blue.process.binds = vec![
        "dso-data:/data".into(),
        "dso-r1-f0:/run/secrets".into(),
        "dso-r1-env:/run/dso/env".into(),
    ];
    let p = f.d.plan(&blue, None, "r2").unwrap().unwrap();
    assert_eq!(
        p.overrides.drop_binds,
        ["dso-r1-f0:/run/secrets", "dso-r1-env:/run/dso/env"]
    );
}

#[test]
fn declared_references_are_consumed_and_planned_like_configured_secrets() {
    let f = fx(vec![secret("db", &["password"], file(0o400))]);
    let refs = declared::Declared {
        env: vec![declared::DeclaredRef {
            var: "API_KEY".into(),
            provider: "local".into(),
            reference: "shop/api_key".into(),
        }],
        files: vec![declared::DeclaredRef {
            var: "DB_PASSWORD_FILE".into(),
            provider: "local".into(),
            reference: "shop/db#password".into(),
        }],
    };
    let blue = container(
        &[("dso.secrets", "db"), (declared::LABEL_REFS, &refs.to_label())],
        "1000",
    );
    let names: Vec<String> = f.d.consumed(&blue).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["db", "compose:API_KEY", "compose:DB_PASSWORD_FILE"]);
    let b = bundle(&[
        ("db", "password", b"pw"),
        ("compose:API_KEY", "API_KEY", b"k1"),
        ("compose:DB_PASSWORD_FILE", "DB_PASSWORD_FILE", b"dbpw"),
    ]);
    let p = f.d.plan(&blue, Some(&b), "c1").unwrap().expect("a plan");
    let f0 = f.d.store().group_dir("c1", "f0").unwrap();
    assert_eq!(std::fs::read(f0.join("DB_PASSWORD_FILE")).unwrap(), b"dbpw");
    assert_eq!(std::fs::read(f0.join("password")).unwrap(), b"pw");
    let env = f.d.store().group_dir("c1", "env").unwrap();
    assert_eq!(std::fs::read(env.join("API_KEY")).unwrap(), b"k1");
    let entry = p.overrides.entrypoint.expect("the launcher wraps the entrypoint");
    assert_eq!(entry.0[0], LAUNCHER_PATH);

    // A label naming an unknown provider is skipped whole (logged), never half-used.
    let bad = container(
        &[(
            declared::LABEL_REFS,
            r#"{"env":[{"var":"X","provider":"nope","ref":"a"}]}"#,
        )],
        "",
    );
    assert!(f.d.consumed(&bad).is_empty());
}
