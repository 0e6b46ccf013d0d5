//! Every way a config file can be rejected, and what the message says.

use std::time::Duration;

use super::{ConfigError, parse};

fn no_env(_: &str) -> Option<String> {
    None
}

fn err(text: &str) -> String {
    parse(text, no_env).unwrap_err().to_string()
}

const GOOD: &str = "\
agent:
  socket: /tmp/x.sock
  shutdown_timeout: 1m
proxy:
  max_connections: 100
  listeners:
    - name: pg
      listen: 127.0.0.1:15432
      backends: [127.0.0.1:5432]
      drain_timeout: 45s
    - name: web
      listen: '[::1]:8080'
      backends:
        - addr: 127.0.0.1:8081
          label: blue
        - 127.0.0.1:8082
      close_window: 500ms
      hold_max: 2m
      connect_timeout: 1s
      dial_attempts: 5
      dial_budget: 3s
      idle_timeout: 1h
      max_connections: 10
      backlog: 64
      keepalive: off
";

#[test]
fn good_file_converts_with_defaults() {
    let cfg = parse(GOOD, no_env).unwrap();
    assert_eq!(cfg.agent.shutdown_timeout, Some(Duration::from_secs(60)));
    assert_eq!(cfg.proxy.max_connections, Some(100));
    let pg = &cfg.listeners[0];
    assert_eq!(pg.drain_timeout, Duration::from_secs(45));
    assert_eq!(pg.hold_max, Duration::from_secs(30), "default");
    assert_eq!(pg.keepalive, Some(Duration::from_secs(60)), "default");
    let web = &cfg.listeners[1];
    assert_eq!(web.listen.to_string(), "[::1]:8080");
    assert_eq!(web.backends[0].label.as_deref(), Some("blue"));
    assert_eq!(web.backends[1].label, None);
    assert_eq!(web.close_window, Duration::from_millis(500));
    assert_eq!(web.dial_attempts, 5);
    assert_eq!(web.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(web.max_connections, Some(10));
    assert_eq!(web.backlog, 64);
    assert_eq!(web.keepalive, None);
}

#[test]
fn empty_file_is_an_agent_without_listeners() {
    assert!(parse("", no_env).unwrap().listeners.is_empty());
    assert!(parse("# nothing yet\n", no_env).unwrap().listeners.is_empty());
}

#[test]
fn unknown_key_names_key_and_line() {
    let e = err("proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      drain: 30s\n");
    assert!(e.contains("proxy.listeners[0]"), "{e}");
    assert!(e.contains("unknown field `drain`"), "{e}");
    assert!(e.contains("line 5"), "{e}");
    let e = err("proxi:\n  listeners: []\n");
    assert!(e.contains("unknown field `proxi`") && e.contains("line 1"), "{e}");
}

#[test]
fn bad_listen_address_names_key_and_line() {
    let e = err("proxy:\n  listeners:\n    - name: pg\n      listen: localhost:5432\n");
    assert!(e.contains("proxy.listeners[0].listen"), "{e}");
    assert!(e.contains("expected IP:PORT"), "{e}");
    assert!(e.contains("line 4"), "{e}");
}

#[test]
fn bad_backend_names_key_and_line() {
    let e =
        err("proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      backends: [127.0.0.1]\n");
    assert!(e.contains("proxy.listeners[0].backends[0]"), "{e}");
    assert!(
        e.contains("invalid backend \"127.0.0.1\"; expected IP:PORT"),
        "{e}"
    );
    assert!(e.contains("line 5"), "{e}");
    let e = err(
        "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      backends:\n        - addr: 127.0.0.1:2\n          lable: x\n",
    );
    assert!(e.contains("unknown field `lable`"), "{e}");
}

#[test]
fn bad_duration_names_key_and_line() {
    let e = err("proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      drain_timeout: 30\n");
    assert!(e.contains("proxy.listeners[0].drain_timeout"), "{e}");
    assert!(e.contains("no unit"), "{e}");
    assert!(e.contains("line 5"), "{e}");
    let e = err("proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      hold_max: 3 weeks\n");
    assert!(e.contains("hold_max") && e.contains("line 5"), "{e}");
    let e = err("agent:\n  shutdown_timeout: soon\n");
    assert!(
        e.contains("agent.shutdown_timeout") && e.contains("line 2"),
        "{e}"
    );
    let e = err("proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      keepalive: on\n");
    assert!(e.contains("keepalive") && e.contains("off"), "{e}");
}

#[test]
fn wrong_type_names_key_and_line() {
    let e =
        err("proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n      dial_attempts: many\n");
    assert!(
        e.contains("proxy.listeners[0].dial_attempts") && e.contains("line 5"),
        "{e}"
    );
    let e = err("proxy:\n  listeners: pg\n");
    assert!(e.contains("proxy.listeners") && e.contains("line 2"), "{e}");
}

#[test]
fn yaml_syntax_error_has_line() {
    let e = err("proxy:\n  listeners:\n    - name: [pg\n");
    assert!(e.contains("line"), "{e}");
}

#[test]
fn missing_name_and_listen_name_the_entry_line() {
    let e =
        err("proxy:\n  listeners:\n    - name: a\n      listen: 127.0.0.1:1\n    - listen: 127.0.0.1:2\n");
    assert!(e.contains("proxy.listeners[1].name: missing"), "{e}");
    assert!(e.contains("line 5"), "{e}");
    let e = err("proxy:\n  listeners:\n    - name: pg\n");
    assert!(e.contains("proxy.listeners[0].listen: missing"), "{e}");
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn invalid_name_is_rejected() {
    let e = err("proxy:\n  listeners:\n    - name: 'my pg'\n      listen: 127.0.0.1:1\n");
    assert!(
        e.contains("proxy.listeners[0].name: invalid name \"my pg\""),
        "{e}"
    );
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn duplicate_name_points_at_second_line() {
    let e = err(
        "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n    - name: pg\n      listen: 127.0.0.1:2\n",
    );
    assert!(
        e.contains("proxy.listeners[1].name: duplicate listener name \"pg\""),
        "{e}"
    );
    assert!(e.contains("also proxy.listeners[0]"), "{e}");
    assert!(e.contains("line 5"), "{e}");
}

#[test]
fn duplicate_listen_points_at_second_line() {
    let e = err(
        "proxy:\n  listeners:\n    - name: a\n      listen: 127.0.0.1:1\n    - name: b\n      listen: 127.0.0.1:1\n",
    );
    assert!(
        e.contains("proxy.listeners[1].listen: listen address 127.0.0.1:1 is already used"),
        "{e}"
    );
    assert!(e.contains("line 6"), "{e}");
    let e = err(
        "proxy:\n  listeners:\n    - name: a\n      listen: 0.0.0.0:80\n    - name: b\n      listen: 127.0.0.1:80\n",
    );
    assert!(
        e.contains(
            "proxy.listeners[1].listen: listen address 127.0.0.1:80 is already used by proxy.listeners[0]"
        ),
        "{e}"
    );
    assert!(e.contains("line 6"), "{e}");
    // Port 0 means "any free port" and may repeat.
    parse("proxy:\n  listeners:\n    - name: a\n      listen: 127.0.0.1:0\n    - name: b\n      listen: 127.0.0.1:0\n", no_env).unwrap();
}

#[test]
fn zero_limits_and_durations_are_rejected() {
    let base = "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:1\n";
    for (line, key) in [
        ("dial_attempts: 0", "dial_attempts: must be at least 1"),
        ("backlog: 0", "backlog: must be at least 1"),
        ("max_connections: 0", "max_connections: must be at least 1"),
        ("hold_max: 0s", "hold_max: must be longer than 0s"),
        ("connect_timeout: 0s", "connect_timeout: must be longer than 0s"),
        ("dial_budget: 0ms", "dial_budget: must be longer than 0s"),
        ("idle_timeout: 0s", "idle_timeout: must be longer than 0s"),
    ] {
        let e = err(&format!("{base}      {line}\n"));
        assert!(e.contains(&format!("proxy.listeners[0].{key}")), "{e}");
        assert!(e.contains("line 5"), "{e}");
    }
    let e = err("proxy:\n  max_connections: 0\n");
    assert!(
        e.contains("proxy.max_connections: must be at least 1 at line 2"),
        "{e}"
    );
}

#[test]
fn env_is_expanded_and_unset_is_an_error() {
    let env = |n: &str| (n == "PG_PORT").then(|| "5433".to_owned());
    let text = "proxy:\n  listeners:\n    - name: pg\n      listen: 127.0.0.1:${LISTEN:-15432}\n      backends: [127.0.0.1:${PG_PORT}]\n";
    let cfg = parse(text, env).unwrap();
    assert_eq!(cfg.listeners[0].listen.port(), 15432);
    assert_eq!(cfg.listeners[0].backends[0].addr.port(), 5433);
    let e = parse("proxy:\n  listeners:\n    - name: ${NAME}\n", env).unwrap_err();
    assert!(matches!(e, ConfigError::Env { line: 3, .. }), "{e}");
    assert!(
        e.to_string().contains("environment variable NAME is not set"),
        "{e}"
    );
}

#[test]
fn unreadable_file_names_the_path() {
    let e = super::load(std::path::Path::new("/nonexistent/dso.yaml")).unwrap_err();
    assert_eq!(e.to_string(), "/nonexistent/dso.yaml");
    let cause = e.source.to_string();
    assert!(
        cause.contains("cannot read config /nonexistent/dso.yaml"),
        "{cause}"
    );
}

#[test]
fn a_backend_that_is_the_listener_itself_is_rejected_with_its_line() {
    let text = "\
proxy:
  listeners:
    - name: pg
      listen: 0.0.0.0:5432
      backends: [127.0.0.1:5432]
";
    assert_eq!(
        err(text),
        "proxy.listeners[0].backends: backend 127.0.0.1:5432 is this listener's own address \
0.0.0.0:5432; connections would loop through dso at line 5"
    );
}

#[test]
fn agent_api_keys_default_off_and_are_checked() {
    let c = parse("", no_env).unwrap();
    assert_eq!(c.agent.socket_group, None);
    assert!(!c.agent.allow_secret_read);
    let c = parse(
        "agent:\n  api:\n    socket_group: dso-ops\n    allow_secret_read: true\n",
        no_env,
    )
    .unwrap();
    assert_eq!(c.agent.socket_group.as_deref(), Some("dso-ops"));
    assert!(c.agent.allow_secret_read);
    let e = err("agent:\n  api:\n    socket_group: 'Dso Ops'\n");
    assert!(
        e.contains("agent.api.socket_group") && e.contains("line 3"),
        "{e}"
    );
    let e = err("agent:\n  api:\n    allow_secret_reads: true\n");
    assert!(e.contains("allow_secret_reads") && e.contains("line 3"), "{e}");
    let e = err("agent:\n  api:\n    allow_secret_read: maybe\n");
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn notify_webhooks_default_and_every_bad_key_is_named() {
    let c = parse(
        "agent:\n  notify:\n    webhooks:\n      - url: https://hooks.example.com/dso\n        secret_file: /etc/dso/hook.key\n",
        no_env,
    )
    .unwrap();
    let w = &c.agent.webhooks[0];
    assert_eq!(w.url, "https://hooks.example.com/dso");
    assert_eq!(w.events, super::WebhookSettings::DEFAULT_EVENTS);
    assert_eq!((w.timeout, w.max_attempts), (Duration::from_secs(10), 5));
    let c = parse(
        "agent:\n  notify:\n    webhooks:\n      - url: http://10.0.0.5:9000/x\n        allow_http: true\n        secret_file: /k\n        events: [rotation, provider.down]\n        timeout: 2s\n        max_attempts: 3\n",
        no_env,
    )
    .unwrap();
    let w = &c.agent.webhooks[0];
    assert_eq!(w.events, ["rotation", "provider.down"]);
    assert_eq!((w.timeout, w.max_attempts), (Duration::from_secs(2), 3));

    let hook = |extra: &str| format!("agent:\n  notify:\n    webhooks:\n      - secret_file: /k\n{extra}");
    let e = err(&hook("        url: http://hooks.example.com/\n"));
    assert!(
        e.contains("agent.notify.webhooks[0].url") && e.contains("allow_http: true") && e.contains("line 5"),
        "{e}"
    );
    let e = err(&hook("        url: ftp://hooks.example.com/\n"));
    assert!(e.contains("\"ftp\""), "{e}");
    let e = err(&hook("        url: https://user:pw@hooks.example.com/\n"));
    assert!(e.contains("credentials") && !e.contains("pw@"), "{e}");
    let e = err(&hook(
        "        url: https://h/\n        events: [rotation.succeded]\n",
    ));
    assert!(
        e.contains("agent.notify.webhooks[0].events[0]") && e.contains("rotation.succeeded"),
        "{e}"
    );
    let e = err(&hook("        url: https://h/\n        events: []\n"));
    assert!(e.contains("events") && e.contains("empty"), "{e}");
    let e = err(&hook("        url: https://h/\n        max_attempts: 0\n"));
    assert!(e.contains("max_attempts"), "{e}");
    let e = err("agent:\n  notify:\n    webhooks:\n      - url: https://h/\n");
    assert!(
        e.contains("agent.notify.webhooks[0].secret_file") && e.contains("missing"),
        "{e}"
    );
    let e = err("agent:\n  notify:\n    webhooks:\n      - url: https://h/\n        secret_file: rel/key\n");
    assert!(e.contains("absolute"), "{e}");
    let e = err("agent:\n  notify:\n    webhook: []\n");
    assert!(e.contains("webhook") && e.contains("line 3"), "{e}");
}
