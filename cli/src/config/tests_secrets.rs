//! The secret side of the schema: the README's three files, several instances of one
//! type, every rejection, and the bounds of issue 9.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dso_secrets::ProviderKind;
use dso_secrets::config::{EnvMode, InjectSpec, Mode, Strategy};
use dso_secrets::spec::{AwsAuth, ProviderSettings, VaultAuth};

use super::{Config, ConfigError, parse};

fn env(name: &str) -> Option<String> {
    match name {
        "HOME" => Some("/home/ann".to_owned()),
        "VAULT_TOKEN" => Some("s.Tok3nValue-for-tests".to_owned()),
        _ => None,
    }
}

fn ok(text: &str) -> Config {
    match parse(text, env) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn err(text: &str) -> String {
    parse(text, env).unwrap_err().to_string()
}

fn example(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn readme_aws_example_means_what_the_readme_says() {
    let cfg = ok(&example("dso-aws.yaml"));
    let s = &cfg.secrets;
    assert_eq!(s.mode, Mode::Agent);
    assert_eq!(s.providers.len(), 1);
    let p = &s.providers[0];
    assert_eq!((p.name.as_str(), p.kind()), ("aws", ProviderKind::Aws));
    let ProviderSettings::Aws(a) = &p.settings else {
        panic!("not aws")
    };
    assert_eq!(a.region.as_deref(), Some("us-east-1"));
    assert_eq!(a.auth, AwsAuth::IamRole);
    assert_eq!(p.limits.retry_attempts, 3);
    assert_eq!(p.limits.retry_backoff, Duration::from_secs(1));
    assert_eq!(s.watch.polling_interval, Duration::from_secs(30));
    assert_eq!(s.watch.max_interval, Duration::from_secs(120), "4x backoff");
    assert!(s.rotation.enabled);
    assert_eq!(s.rotation.strategy, Strategy::Rolling);
    assert_eq!(s.rotation.health_check_timeout, Duration::from_secs(30));
    let sec = &s.secrets[0];
    assert_eq!(sec.name, "database_credentials");
    assert_eq!(sec.provider, "aws");
    assert_eq!(sec.targets.containers, ["mysql"]);
    assert_eq!(
        sec.inject,
        InjectSpec::Env {
            env_mode: EnvMode::Launcher
        }
    );
    assert!(sec.rotation.enabled);
    assert_eq!(sec.rotation.strategy, Strategy::Rolling);
    let names: Vec<(&str, &str)> = sec
        .mappings
        .iter()
        .map(|(k, r)| (k.as_str(), r.object.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("MYSQL_ROOT_PASSWORD", "prod/mysql/root_password"),
            ("MYSQL_PASSWORD", "prod/mysql/app_password")
        ]
    );
}

#[test]
fn readme_vault_example_takes_the_token_from_the_environment() {
    let cfg = ok(&example("dso-vault.yaml"));
    let p = &cfg.secrets.providers[0];
    let ProviderSettings::Vault(v) = &p.settings else {
        panic!("not vault")
    };
    assert_eq!(v.address, "https://vault.example.com:8200");
    let VaultAuth::Token { token } = &v.auth else {
        panic!("not token")
    };
    assert_eq!(token.expose_str(), "s.Tok3nValue-for-tests");
    let sec = &cfg.secrets.secrets[0];
    let (k, r) = &sec.mappings[0];
    assert_eq!(k, "DB_PASSWORD");
    assert_eq!(
        (r.mount.as_deref(), r.object.as_str(), r.field.as_deref()),
        (Some("secret"), "prod/database", Some("password"))
    );
    // No inject key: the secure default, files.
    assert_eq!(sec.inject, InjectSpec::default_file());
    // Debug of the whole config shows no token.
    assert!(!format!("{cfg:?}").contains("Tok3n"));
    let e = parse(&example("dso-vault.yaml"), |_| None).unwrap_err();
    assert!(matches!(e, ConfigError::Env { line: 11, .. }), "{e}");
    assert!(e.to_string().contains("VAULT_TOKEN is not set"), "{e}");
}

#[test]
fn readme_local_example_expands_home_and_reads_empty_secrets_map() {
    let cfg = ok(&example("dso-local.yaml"));
    assert_eq!(cfg.secrets.mode, Mode::Local);
    assert!(cfg.secrets.secrets.is_empty());
    let ProviderSettings::Local(l) = &cfg.secrets.providers[0].settings else {
        panic!("not local")
    };
    assert_eq!(l.vault_file, PathBuf::from("/home/ann/.dso/vault.enc"));
    assert_eq!(
        l.master_key_file.as_deref(),
        Some(Path::new("/home/ann/.dso/master.key"))
    );
    let e = parse(&example("dso-local.yaml"), |_| None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("providers.local.vault_file") && e.contains("HOME is not set") && e.contains("line 8"),
        "{e}"
    );
}

#[test]
fn multi_instance_example_validates() {
    let cfg = ok(&example("dso-multi.yaml"));
    let kinds: Vec<(&str, ProviderKind)> = cfg
        .secrets
        .providers
        .iter()
        .map(|p| (p.name.as_str(), p.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("aws-east", ProviderKind::Aws),
            ("aws-west", ProviderKind::Aws),
            ("vault-prod", ProviderKind::Vault),
            ("vault-ops", ProviderKind::Vault),
            ("local", ProviderKind::Local),
            ("csms", ProviderKind::Plugin)
        ]
    );
    assert_eq!(cfg.secrets.secrets.len(), 6);
}

#[test]
fn local_vault_paths_default_by_mode() {
    let agent = ok("providers:\n  v:\n    type: local\n");
    let ProviderSettings::Local(l) = &agent.secrets.providers[0].settings else {
        panic!()
    };
    assert_eq!(l.vault_file, PathBuf::from("/var/lib/dso/vault.enc"));
    assert_eq!(
        l.master_key_file.as_deref(),
        Some(Path::new("/var/lib/dso/master.key"))
    );
    let local = ok("mode: local\nproviders:\n  v:\n    type: local\n");
    let ProviderSettings::Local(l) = &local.secrets.providers[0].settings else {
        panic!()
    };
    assert_eq!(l.vault_file, PathBuf::from("/home/ann/.dso/vault.enc"));
}

const MULTI: &str = "\
version: v1
providers:
  aws-east:
    type: aws
    region: us-east-1
  aws-west:
    type: aws
    region: us-west-2
    endpoint_url: http://127.0.0.1:5000
    auth: {method: env}
    rate_limit: 5
    concurrency: 2
    timeout: 3s
  vault-a:
    type: vault
    address: https://a.example:8200
    auth:
      method: token
      params:
        token: ${VAULT_TOKEN}
  vault-b:
    type: vault
    namespace: team
    auth:
      method: approle
      params:
        address: https://b.example:8200
        role_id: r-1
        secret_id_file: ~/sid
secrets:
  - name: east
    provider: aws-east
    mappings:
      PW: prod/db#password
  - name: west
    provider: aws-west
    mappings:
      PW: prod/db#password
  - name: files
    provider: vault-b
    inject: {type: file, path: /etc/app, mode: '0440', uid: 1000}
    rotation: {strategy: signal, signal: usr1}
    mappings:
      db.pw: kv/data/app/db#pw
";

#[test]
fn several_instances_of_one_type() {
    let cfg = ok(MULTI);
    let s = &cfg.secrets;
    let names: Vec<&str> = s.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["aws-east", "aws-west", "vault-a", "vault-b"]);
    let ProviderSettings::Aws(w) = &s.provider("aws-west").unwrap().settings else {
        panic!()
    };
    assert_eq!(w.region.as_deref(), Some("us-west-2"));
    assert_eq!(w.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
    assert_eq!(w.auth, AwsAuth::Env);
    let l = &s.provider("aws-west").unwrap().limits;
    assert_eq!(
        (l.rate_per_sec, l.concurrency, l.timeout),
        (5.0, 2, Duration::from_secs(3))
    );
    let ProviderSettings::Vault(b) = &s.provider("vault-b").unwrap().settings else {
        panic!()
    };
    assert_eq!(b.address, "https://b.example:8200");
    assert_eq!(b.namespace.as_deref(), Some("team"));
    assert_eq!(
        b.auth,
        VaultAuth::AppRole {
            role_id: "r-1".into(),
            secret_id_file: "/home/ann/sid".into(),
            mount: "approle".into()
        }
    );
    assert_eq!(s.secrets[0].mappings[0].1.provider, "aws-east");
    assert_eq!(s.secrets[1].mappings[0].1.provider, "aws-west");
    let f = &s.secrets[2];
    assert_eq!(
        f.inject,
        InjectSpec::File {
            path: "/etc/app".into(),
            mode: 0o440,
            uid: Some(1000),
            gid: None,
            env_pointers: false,
        }
    );
    assert_eq!(
        (f.rotation.strategy, f.rotation.signal.as_str()),
        (Strategy::Signal, "SIGUSR1")
    );
}

#[test]
fn defaults_apply_and_agent_rotation_is_the_master_switch() {
    let text = "\
providers: {l: {type: local}}
agent:
  rotation: {enabled: false}
defaults:
  inject: {type: file, path: /run/app, mode: 0400}
  rotation: {strategy: restart}
secrets:
  - name: a
    provider: l
    mappings: {pw: app/pw}
  - name: b
    provider: l
    inject: {type: env, env_mode: native}
    rotation: {strategy: none}
    mappings: {PW: app/pw}
";
    let cfg = ok(text);
    let [a, b] = &cfg.secrets.secrets[..] else {
        panic!()
    };
    assert_eq!(
        a.inject,
        InjectSpec::File {
            path: "/run/app".into(),
            mode: 0o400,
            uid: None,
            gid: None,
            env_pointers: false,
        }
    );
    assert_eq!(a.rotation.strategy, Strategy::Restart);
    assert!(!a.rotation.enabled && !b.rotation.enabled);
    assert_eq!(
        b.inject,
        InjectSpec::Env {
            env_mode: EnvMode::Native
        }
    );
    assert_eq!(b.rotation.strategy, Strategy::None);
}

#[test]
fn watch_settings_and_logging() {
    let cfg = ok(
        "agent:\n  watch:\n    polling_interval: 10s\n    debounce: 0s\n    jitter: false\nlogging:\n  level: debug\n",
    );
    let w = &cfg.secrets.watch;
    assert_eq!(
        (w.polling_interval, w.max_interval, w.debounce, w.jitter),
        (
            Duration::from_secs(10),
            Duration::from_secs(40),
            Duration::ZERO,
            false
        )
    );
    assert_eq!(cfg.logging.default_filter(), "debug");
    assert_eq!(ok("").logging.default_filter(), "info");
    let e = err("agent:\n  watch:\n    polling_interval: 10s\n    max_interval: 5s\n");
    assert!(
        e.contains("agent.watch.max_interval: 5s is out of range; expected 10s to") && e.contains("line 4"),
        "{e}"
    );
    let e = err("logging:\n  level: loud\n");
    assert!(e.contains("logging.level") && e.contains("line 2"), "{e}");
}

#[test]
fn versions_accepted_and_refused() {
    for v in ["v1", "v1.0", "v1.0.0", "1", "1.0", "'1.0.0'"] {
        ok(&format!("version: {v}\n"));
    }
    let e = err("version: v2\n");
    assert!(
        e.contains("unsupported version \"v2\"") && e.contains("line 1"),
        "{e}"
    );
}

#[test]
fn unsupported_settings_say_what_to_do_instead() {
    let e = err("agent:\n  cache: false\n");
    assert!(
        e.contains("agent.cache") && e.contains("in memory only") && e.contains("line 2"),
        "{e}"
    );
    ok("agent:\n  cache: true\n");
    let e = err("agent:\n  watch:\n    mode: webhook\n");
    assert!(
        e.contains("agent.watch.mode") && e.contains("only mode is `polling`") && e.contains("line 3"),
        "{e}"
    );
    let e = err("agent:\n  watch:\n    webhook: true\n");
    assert!(
        e.contains("unknown field `webhook`") && e.contains("polling_interval") && e.contains("line 3"),
        "{e}"
    );
    let e = err("providers:\n  a:\n    type: aws\n    access_key_id: AKIA\n");
    assert!(e.contains("never reads AWS keys") && e.contains("line 4"), "{e}");
    let e = err("secrets:\n  db: {provider: a}\n");
    assert!(e.contains("secrets is a list") && e.contains("line 2"), "{e}");
}

#[test]
fn provider_errors_name_key_and_line() {
    let e = err("providers:\n  v:\n    type: vault\n    region: us-east-1\n    address: https://v:8200\n");
    assert!(
        e.contains("providers.v.region: `region` is not a setting of a vault provider")
            && e.contains("line 4"),
        "{e}"
    );
    let e = err("providers:\n  v:\n    address: https://v:8200\n");
    assert!(
        e.contains("providers.v: missing `type`") && e.contains("line 2"),
        "{e}"
    );
    let e = err("providers:\n  v:\n    type: vaultt\n");
    assert!(
        e.contains("providers.v.type: unknown variant `vaultt`") && e.contains("line 3"),
        "{e}"
    );
    let e = err(
        "providers:\n  v:\n    type: vault\n    address: https://a:1\n    auth:\n      params:\n        address: https://b:1\n        token: x\n",
    );
    assert!(
        e.contains("the address is set twice") && e.contains("line 7"),
        "{e}"
    );
    let e = err(
        "providers:\n  v:\n    type: vault\n    auth:\n      method: token\n      params:\n        address: https://b:1\n",
    );
    assert!(
        e.contains("providers.v.auth.params.token: missing") && e.contains("line 6"),
        "{e}"
    );
    let e = err(
        "providers:\n  v:\n    type: vault\n    address: https://b:1\n    auth:\n      method: approle\n      params:\n        role_id: r\n        secret_id_file: /f\n        token: t\n",
    );
    assert!(
        e.contains("`token` is not a parameter of auth method approle") && e.contains("line 10"),
        "{e}"
    );
    let e = err("providers:\n  a:\n    type: aws\n    auth:\n      method: keys\n");
    assert!(
        e.contains("providers.a.auth.method: unknown auth method \"keys\"") && e.contains("line 5"),
        "{e}"
    );
    let e = err("providers:\n  a:\n    type: aws\n    auth: {method: profile}\n");
    assert!(e.contains("providers.a.profile: missing"), "{e}");
    let e = err(
        "providers:\n  z:\n    type: azure\n    vault_url: https://k.vault.azure.net\n    auth:\n      method: client_secret\n      params:\n        tenant_id: t\n        client_id: c\n",
    );
    assert!(
        e.contains("providers.z.auth.params.client_secret: missing"),
        "{e}"
    );
    let e = err("providers:\n  p:\n    type: plugin\n    command: /bin/x\n    sha256: abc\n");
    assert!(
        e.contains("providers.p.sha256: invalid SHA-256") && e.contains("line 5"),
        "{e}"
    );
    let e = err("providers:\n  p:\n    type: aws\n    concurrency: 0\n");
    assert!(
        e.contains("providers.p.concurrency: 0 is out of range") && e.contains("line 4"),
        "{e}"
    );
    let e = err("providers:\n  'a b':\n    type: aws\n");
    assert!(e.contains("invalid provider name \"a b\""), "{e}");
    let e = err("providers:\n  a:\n    type: aws\n  a:\n    type: aws\n");
    assert!(e.contains("duplicate"), "{e}");
    // Plugin config is opaque.
    let cfg = ok(
        "providers:\n  p:\n    type: plugin\n    command: /usr/lib/dso/csms\n    args: [--region, cn-north-4]\n    config: {project_id: x, nested: {a: [1, 2]}}\n",
    );
    let ProviderSettings::Plugin(p) = &cfg.secrets.providers[0].settings else {
        panic!()
    };
    assert_eq!(p.config["nested"]["a"][1], 2);
}

#[test]
fn secret_errors_name_key_and_line() {
    let base = "providers:\n  l:\n    type: local\n  v:\n    type: vault\n    address: https://v:1\n    auth: {params: {token: t}}\nsecrets:\n";
    let e = err(&format!(
        "{base}  - name: a\n    provider: nope\n    mappings: {{X: a/b}}\n"
    ));
    assert!(
        e.contains("secrets[0].provider: unknown provider \"nope\"; providers in this file: l, v")
            && e.contains("line 10"),
        "{e}"
    );
    let e = err("secrets:\n  - name: a\n    provider: x\n    mappings: {X: y}\n");
    assert!(e.contains("this file has no providers: section"), "{e}");
    let e = err(&format!(
        "{base}  - name: a\n    provider: v\n    mappings:\n      DB: secret/prod/db\n"
    ));
    assert!(
        e.contains("secrets[0].mappings.DB: provider v: invalid reference") && e.contains("line 12"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    inject: {{type: env}}\n    mappings:\n      1BAD: a/b\n"
    ));
    assert!(
        e.contains("\"1BAD\" is not an environment variable name") && e.contains("line 13"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    mappings:\n      ../x: a/b\n"
    ));
    assert!(e.contains("is not a file name") && e.contains("line 12"), "{e}");
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    mappings: {{}}\n"
    ));
    assert!(
        e.contains("secrets[0].mappings: secret \"a\" has no mappings"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    mappings: {{X: a}}\n  - name: a\n    provider: l\n    mappings: {{X: a}}\n"
    ));
    assert!(
        e.contains("secrets[1].name: duplicate secret name \"a\"") && e.contains("line 12"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    inject: {{type: env}}\n    rotation:\n      strategy: signal\n    mappings: {{X: a}}\n"
    ));
    assert!(
        e.contains("secrets[0].rotation.strategy: strategy signal cannot deliver a secret injected as env")
            && e.contains("line 13"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    rotation: {{strategy: rolling, signal: HUP}}\n    mappings: {{X: a}}\n"
    ));
    assert!(e.contains("`signal` is used by `strategy: signal` only"), "{e}");
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    rotation: {{strategy: blue}}\n    mappings: {{X: a}}\n"
    ));
    assert!(
        e.contains("unknown variant `blue`") && e.contains("line 11"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    inject:\n      type: env\n      mode: '0400'\n    mappings: {{X: a}}\n"
    ));
    assert!(
        e.contains("secrets[0].inject.mode: `mode` applies to `type: file` only") && e.contains("line 13"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    inject:\n      mode: '0999'\n    mappings: {{X: a}}\n"
    ));
    assert!(
        e.contains("invalid file mode \"0999\"") && e.contains("line 12"),
        "{e}"
    );
    let e = err(&format!(
        "{base}  - name: a\n    provider: l\n    mappings:\n      X: a\n      X: b\n"
    ));
    assert!(e.contains("duplicate key `X`"), "{e}");
}

#[test]
fn environment_values_never_appear_in_errors() {
    let text = "providers:\n  v:\n    type: vault\n    address: ${ADDR}\n    auth: {params: {token: t}}\n";
    let e = parse(text, |n| (n == "ADDR").then(|| "hunter2-secret-value".to_owned()))
        .unwrap_err()
        .to_string();
    assert!(!e.contains("hunter2"), "{e}");
    assert!(e.contains("${ADDR}") && e.contains("line 4"), "{e}");
}

// ---- issue 9: bounds where values enter (items 9, 11, 12, 14) ----

/// Item 9, through the whole pipeline the agent uses.
#[test]
fn alias_amplification_is_refused_by_parse() {
    let big = "x".repeat(64 << 10);
    let mut text = format!(
        "proxy:\n  listeners:\n    - name: a\n      listen: 127.0.0.1:1\n      backends:\n        - addr: 127.0.0.1:2\n          label: &big {big}\n"
    );
    for i in 0..2000 {
        text.push_str(&format!("        - {{addr: 127.0.0.1:{}, label: *big}}\n", i + 3));
    }
    let e = err(&text);
    assert!(e.contains("expands to more than") && e.contains("aliases"), "{e}");
}

/// Item 11: each of these passed and panicked later (agent exit 101, silent closes).
#[test]
fn values_that_panicked_later_are_refused() {
    let base = "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n";
    for (line, want) in [
        (
            "max_connections: 2305843009213693952",
            "max_connections: 2305843009213693952 is out of range; expected 1 to 1000000",
        ),
        ("idle_timeout: 18446744073709551615s", "idle_timeout"),
        ("close_window: 18446744073709551615s", "close_window"),
        ("drain_timeout: 400d", "drain_timeout"),
        ("hold_max: 9000h", "hold_max"),
        ("backlog: 4294967295", "backlog: 4294967295 is out of range"),
    ] {
        let e = err(&format!("{base}      {line}\n"));
        assert!(e.contains(want) && e.contains("line 5"), "{line}: {e}");
    }
    let e = err("proxy:\n  max_connections: 2305843009213693952\n");
    assert!(
        e.contains("proxy.max_connections: 2305843009213693952 is out of range") && e.contains("line 2"),
        "{e}"
    );
    let e = err("agent:\n  shutdown_timeout: 366d\n");
    assert!(e.contains("longest allowed, 365d") && e.contains("line 2"), "{e}");
    ok(&format!(
        "{base}      max_connections: 1000000\n      drain_timeout: 365d\n"
    ));
}

/// Item 12: the kernel takes 1-32767 whole seconds.
#[test]
fn keepalive_takes_whole_seconds_up_to_32767() {
    let base = "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n";
    for v in ["999ms", "1500ms", "10h", "1d", "32768s", "0s"] {
        let e = err(&format!("{base}      keepalive: {v}\n"));
        assert!(
            e.contains("proxy.listeners[0].keepalive: ") && e.contains("line 5"),
            "{v}: {e}"
        );
        assert!(e.contains("1s to 32767s"), "{v}: {e}");
    }
    for (v, secs) in [("1s", 1), ("32767s", 32_767), ("2m", 120)] {
        let cfg = ok(&format!("{base}      keepalive: {v}\n"));
        assert_eq!(cfg.listeners[0].keepalive, Some(Duration::from_secs(secs)));
    }
}

/// Item 14: 20k listeners took 14 s (a line scan per listener and a pairwise address
/// check). Asserts results only; the measured times are in the commit message.
#[test]
fn twenty_thousand_listeners_are_checked_in_one_pass() {
    let n = 20_000;
    let mut text = String::from("proxy:\n  listeners:\n");
    for i in 0..n {
        text.push_str(&format!(
            "    - name: l{i}\n      listen: 127.0.{}.{}:{}\n      backends: [10.0.0.1:5432]\n",
            i / 250,
            i % 250 + 1,
            1000 + i % 50_000
        ));
    }
    let cfg = ok(&text);
    assert_eq!(cfg.listeners.len(), n);
    assert_eq!(cfg.listeners[n - 1].name, format!("l{}", n - 1));
    // A clash at the very end is found, with its line.
    let mut clash = text;
    clash.push_str("    - name: last\n      listen: 0.0.0.0:1005\n");
    let e = err(&clash);
    assert!(
        e.contains(&format!(
            "proxy.listeners[{n}].listen: listen address 0.0.0.0:1005 is already used by proxy.listeners[5]"
        )),
        "{e}"
    );
    assert!(e.contains(&format!("line {}", 3 + 3 * n + 1)), "{e}");
}

/// A small deterministic fuzz of the whole parser: mutations (byte flips, insertions of
/// YAML punctuation, deletions, line duplication) of the README's files and of a proxy
/// file must give a config or an error, never a panic, and every error says something.
#[test]
fn mutated_files_never_panic() {
    let seeds = [
        example("dso-aws.yaml"),
        example("dso-vault.yaml"),
        example("dso-local.yaml"),
        MULTI.to_owned(),
        "proxy:\n  max_connections: 10\n  listeners:\n    - name: a\n      listen: 127.0.0.1:1\n      backends: [127.0.0.1:2]\n      keepalive: 30s\n".to_owned(),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    const PUNCT: &[&str] = &[
        ":", " ", "- ", "\n", "[", "]", "{", "}", "&a ", "*a", "#", "'", "\"", "${X}", "${", "0", "~", "\t",
        "|\n",
    ];
    for round in 0..3000 {
        let mut t = seeds[round % seeds.len()].clone().into_bytes();
        for _ in 0..1 + rnd(4) {
            let at = rnd(t.len() + 1);
            match rnd(4) {
                0 if at < t.len() => t[at] = b" :-[]{}#&*'\"\nab01"[rnd(17)],
                1 => {
                    let p = PUNCT[rnd(PUNCT.len())].as_bytes();
                    t.splice(at..at, p.iter().copied());
                }
                2 if at < t.len() => {
                    let end = (at + 1 + rnd(8)).min(t.len());
                    t.drain(at..end);
                }
                _ => {
                    let line: Vec<u8> = t[at.min(t.len())..]
                        .iter()
                        .take_while(|b| **b != b'\n')
                        .copied()
                        .collect();
                    t.splice(at..at, line.into_iter().chain([b'\n']));
                }
            }
        }
        let Ok(text) = String::from_utf8(t) else {
            continue;
        };
        if let Err(e) = parse(&text, env) {
            assert!(!e.to_string().is_empty(), "empty error for {text:?}");
        }
    }
}

#[test]
fn env_pointers_are_for_file_injection_only() {
    let cfg = ok(
        "providers: {l: {type: local}}\nsecrets:\n  - name: a\n    provider: l\n    inject: {type: file, env_pointers: true}\n    mappings: {POSTGRES_PASSWORD: app/pw}\n",
    );
    assert!(matches!(
        cfg.secrets.secrets[0].inject,
        InjectSpec::File {
            env_pointers: true,
            ..
        }
    ));
    let e = err(
        "providers: {l: {type: local}}\nsecrets:\n  - name: a\n    provider: l\n    inject: {type: env, env_pointers: true}\n    mappings: {PW: app/pw}\n",
    );
    assert!(
        e.contains("secrets[0].inject.env_pointers") && e.contains("type: file"),
        "{e}"
    );
}
