//! One service of the Compose model as `dso up` reads it: its `dso://` / `dsofile://`
//! references, its ports turned into a `dso.host_ports` label, and the facts prepare needs.
//!
//! The model is what `<compose> config` printed, as JSON values: Compose v2's JSON, or
//! Compose v1's YAML read into the same shape. Both print strings with `$` escaped as `$$`
//! (they are meant to be read by Compose again), so a value read from the model is
//! unescaped before it is used and escaped again when it is written.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use dso_rotator::delivery::declared::{Declared, DeclaredRef};
use serde_json::Value;

/// The label that makes a service managed without any reference.
pub const LABEL_RELOADER: &str = "dso.reloader";
/// The label listing the ports the agent's proxy owns.
pub const LABEL_HOST_PORTS: &str = "dso.host_ports";

/// The provider `dso://` means when the agent has no provider named so (and in local mode).
pub const LOCAL_PROVIDER: &str = "local";

/// How a reference is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// `dso://`: the variable holds the value (set by the launcher).
    Env,
    /// `dsofile://`: the variable holds the path of a RAM-only file.
    File,
}

/// One reference found in `environment:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRef {
    /// The variable.
    pub var: String,
    /// Env or file.
    pub kind: RefKind,
    /// The provider named with `dso+NAME://`, `None` for the default one.
    pub provider: Option<String>,
    /// The reference text after `://`.
    pub reference: String,
}

/// `$$` → `$`: a string of the printed model as Compose will use it.
pub fn unescape(s: &str) -> String {
    s.replace("$$", "$")
}

/// `$` → `$$`: a string written for Compose, which interpolates `$VAR` in every value.
pub fn escape(s: &str) -> String {
    s.replace('$', "$$")
}

/// Parses `dso://REF`, `dsofile://REF`, `dso+NAME://REF` and `dsofile+NAME://REF`;
/// `Ok(None)` for any other value. `value` is already unescaped.
pub fn parse_reference(var: &str, value: &str) -> anyhow::Result<Option<FoundRef>> {
    let Some((scheme, reference)) = value.split_once("://") else {
        return Ok(None);
    };
    let (base, provider) = match scheme.split_once('+') {
        Some((b, p)) => (b, Some(p)),
        None => (scheme, None),
    };
    let kind = match base {
        "dso" => RefKind::Env,
        "dsofile" => RefKind::File,
        _ => return Ok(None),
    };
    if let Some(p) = provider
        && (p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        bail!(
            "variable {var}: {scheme}:// names provider {p:?}, which is not a provider name \
             (letters, digits, `_` and `-`); write {base}+NAME://REF with NAME a key of the \
             agent's providers:"
        );
    }
    if reference.trim().is_empty() {
        bail!(
            "variable {var}: {scheme}:// has no reference; write {scheme}://NAME, e.g. {scheme}://myapp/db_password"
        );
    }
    Ok(Some(FoundRef {
        var: var.to_owned(),
        kind,
        provider: provider.map(str::to_owned),
        reference: reference.to_owned(),
    }))
}

/// What `dso up` reads of one service.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// The service name.
    pub name: String,
    /// Its references, sorted by variable.
    pub refs: Vec<FoundRef>,
    /// Its labels (unescaped).
    pub labels: BTreeMap<String, String>,
    /// `dso.host_ports` built from `ports:` (and any `dso.host_ports` label it had), when
    /// there are ports.
    pub host_ports: Option<String>,
    /// Whether it has a `ports:` entry to remove.
    pub has_ports: bool,
    /// `image:` (unescaped).
    pub image: Option<String>,
    /// Whether it has `build:`.
    pub builds: bool,
    /// `user:`, `entrypoint:`, `command:` when set.
    pub user: Option<String>,
    /// The service's entrypoint, when set.
    pub entrypoint: Option<Vec<String>>,
    /// The service's command, when set.
    pub command: Option<Vec<String>>,
    /// `environment:` as printed (`$`-escaped), `None` for a variable without a value.
    pub environment: BTreeMap<String, Option<String>>,
}

impl ServiceView {
    /// Reads service `name` of the printed model.
    pub fn read(name: &str, svc: &Value) -> anyhow::Result<ServiceView> {
        let mut refs = Vec::new();
        let env = environment(svc);
        for (var, value) in env.clone() {
            if let Some(v) = value
                && let Some(r) =
                    parse_reference(&var, &unescape(&v)).with_context(|| format!("service {name}"))?
            {
                refs.push(r);
            }
        }
        refs.sort_by(|a, b| a.var.cmp(&b.var));
        let labels = string_map(svc.get("labels"));
        let ports = svc
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut maps = Vec::new();
        for p in &ports {
            maps.push(port_entry(p).with_context(|| format!("service {name}: ports"))?);
        }
        let mut host_ports: Vec<String> = labels
            .get(LABEL_HOST_PORTS)
            .map(|l| {
                l.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        host_ports.extend(maps);
        Ok(ServiceView {
            name: name.to_owned(),
            refs,
            host_ports: (!host_ports.is_empty()).then(|| host_ports.join(",")),
            has_ports: !ports.is_empty(),
            labels,
            image: svc.get("image").and_then(Value::as_str).map(unescape),
            builds: svc.get("build").is_some_and(|b| !b.is_null()),
            user: svc.get("user").and_then(scalar).map(|u| unescape(&u)),
            entrypoint: words(svc.get("entrypoint")),
            command: words(svc.get("command")),
            environment: env.into_iter().collect(),
        })
    }

    /// Whether `dso up` manages it: it has references or `dso.reloader: "true"`.
    pub fn managed(&self) -> bool {
        !self.refs.is_empty() || self.labels.get(LABEL_RELOADER).is_some_and(|v| v == "true")
    }

    /// The `dso.refs` content, `default` naming the provider of `dso://` references.
    pub fn declared(&self, default: &str) -> Declared {
        let entry = |r: &FoundRef| DeclaredRef {
            var: r.var.clone(),
            provider: r.provider.clone().unwrap_or_else(|| default.to_owned()),
            reference: r.reference.clone(),
        };
        Declared {
            env: self
                .refs
                .iter()
                .filter(|r| r.kind == RefKind::Env)
                .map(entry)
                .collect(),
            files: self
                .refs
                .iter()
                .filter(|r| r.kind == RefKind::File)
                .map(entry)
                .collect(),
        }
    }
}

/// `environment:` as a map (v2 prints a map; a list `KEY=VALUE` is read too). A `None`
/// value is a variable without a value.
fn environment(svc: &Value) -> Vec<(String, Option<String>)> {
    match svc.get("environment") {
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), scalar(v))).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (s.to_owned(), None),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A string, number or boolean as text; `None` for null and the rest.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Labels as a map (a list `KEY=VALUE` is read too), unescaped.
fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    match v {
        Some(Value::Object(m)) => m
            .iter()
            .filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), unescape(&v))))
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (k.to_owned(), unescape(v)),
                None => (s.to_owned(), String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `entrypoint:` / `command:`: a list (v2 always prints one), or a string (v1 prints it as
/// written) split like a shell would split it (quotes, no expansion).
fn words(v: Option<&Value>) -> Option<Vec<String>> {
    match v? {
        Value::Array(a) => Some(a.iter().filter_map(scalar).map(|s| unescape(&s)).collect()),
        Value::String(s) => Some(shell_words(&unescape(s))),
        _ => None,
    }
}

/// Splits a command string on blanks, honouring single and double quotes and backslashes.
pub fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// One `ports:` entry of the printed model as a `dso.host_ports` item, keeping the bind IP.
/// v2 prints the long syntax (`host_ip`, `target` number, `published` string, ranges
/// expanded); v1 prints `IP:HOST:CONTAINER/PROTO` strings (IPv6 unbracketed) or maps with
/// numbers. A UDP (or SCTP) port is refused: the proxy is TCP only.
pub fn port_entry(p: &Value) -> anyhow::Result<String> {
    let (ip, host, container, proto) = match p {
        Value::Object(m) => {
            let text = |k: &str| m.get(k).and_then(scalar).filter(|s| !s.is_empty());
            (
                text("host_ip"),
                text("published"),
                text("target"),
                text("protocol"),
            )
        }
        Value::String(s) => short_port(s)?,
        Value::Number(n) => (None, None, Some(n.to_string()), None),
        other => bail!("{other} is not a port"),
    };
    let Some(container) = container else {
        bail!("{p} has no container port (target)");
    };
    let shown = match &host {
        Some(h) => format!("{h}:{container}"),
        None => container.clone(),
    };
    if let Some(proto) = proto.as_deref()
        && !proto.eq_ignore_ascii_case("tcp")
    {
        bail!(
            "port {shown}/{proto} cannot be managed: dso's proxy forwards TCP only; publish it \
             from a service without dso references, or drop /{proto}"
        );
    }
    if container.contains('-') || host.as_deref().is_some_and(|h| h.contains('-')) {
        bail!(
            "port range {shown} cannot be managed as one port: write one host port per container port (8000-8001:80-81)"
        );
    }
    container
        .parse::<u16>()
        .ok()
        .filter(|c| *c != 0)
        .with_context(|| format!("port {shown}: {container:?} is not a container port"))?;
    let host = host.unwrap_or_else(|| "0".to_owned());
    host.parse::<u16>()
        .with_context(|| format!("port {shown}: {host:?} is not a host port"))?;
    Ok(match ip.as_deref() {
        None | Some("") => format!("{host}:{container}"),
        Some(ip) if ip.contains(':') => format!("[{}]:{host}:{container}", ip.trim_matches(['[', ']'])),
        Some(ip) => format!("{ip}:{host}:{container}"),
    })
}

type PortParts = (Option<String>, Option<String>, Option<String>, Option<String>);

/// `[IP:][HOST:]CONTAINER[/PROTO]`, IPv6 bracketed or not (v1 prints `::1:9002:8080/tcp`).
fn short_port(s: &str) -> anyhow::Result<PortParts> {
    let (rest, proto) = match s.rsplit_once('/') {
        Some((r, p)) => (r, Some(p.to_owned())),
        None => (s, None),
    };
    let Some((front, container)) = rest.rsplit_once(':') else {
        return Ok((None, None, Some(rest.to_owned()), proto));
    };
    let (ip, host) = match front.rsplit_once(':') {
        Some((ip, host)) => (Some(ip.trim_matches(['[', ']']).to_owned()), host),
        None => (None, front),
    };
    let host = (!host.is_empty()).then(|| host.to_owned());
    Ok((ip, host, Some(container.to_owned()), proto))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_and_providers() {
        let r = parse_reference("A", "dso://app/a").unwrap().unwrap();
        assert_eq!(
            (r.kind, r.provider, r.reference.as_str()),
            (RefKind::Env, None, "app/a")
        );
        let r = parse_reference("B", "dsofile+aws-prod://db#password")
            .unwrap()
            .unwrap();
        assert_eq!(r.kind, RefKind::File);
        assert_eq!(r.provider.as_deref(), Some("aws-prod"));
        assert_eq!(r.reference, "db#password");
        assert!(parse_reference("C", "https://example.com").unwrap().is_none());
        assert!(parse_reference("C", "plain").unwrap().is_none());
        let e = parse_reference("D", "dso+bad name://x").unwrap_err().to_string();
        assert!(e.contains("D") && e.contains("provider"), "{e}");
        assert!(parse_reference("E", "dso://").is_err());
    }

    #[test]
    fn ports_keep_the_bind_ip_in_both_printed_forms() {
        // Compose v2's long syntax.
        let v2 =
            json!({"mode":"ingress","host_ip":"127.0.0.1","target":80,"published":"8000","protocol":"tcp"});
        assert_eq!(port_entry(&v2).unwrap(), "127.0.0.1:8000:80");
        let v6 = json!({"host_ip":"::1","target":8080,"published":"9002","protocol":"tcp"});
        assert_eq!(port_entry(&v6).unwrap(), "[::1]:9002:8080");
        assert_eq!(
            port_entry(&json!({"target":8082,"protocol":"tcp"})).unwrap(),
            "0:8082"
        );
        // Compose v1's strings and maps.
        assert_eq!(
            port_entry(&json!("127.0.0.1:8001:81/tcp")).unwrap(),
            "127.0.0.1:8001:81"
        );
        assert_eq!(
            port_entry(&json!("::1:9002:8080/tcp")).unwrap(),
            "[::1]:9002:8080"
        );
        assert_eq!(
            port_entry(&json!({"published":9000,"target":8080})).unwrap(),
            "9000:8080"
        );
        let udp = port_entry(&json!({"target":53,"published":"53","protocol":"udp"}))
            .unwrap_err()
            .to_string();
        assert!(udp.contains("53:53/udp") && udp.contains("TCP only"), "{udp}");
        for ok in ["127.0.0.1:8000:80", "[::1]:9002:8080", "0:8082", "9000:8080"] {
            dso_rotator::labels::parse_ports(ok).unwrap();
        }
    }

    #[test]
    fn a_service_reads_refs_ports_and_commands() {
        let svc = json!({
            "image": "app:1",
            "environment": {"Z": "dso://z", "A": "dsofile+aws://a$$b", "P": "x", "N": null},
            "labels": {"dso.host_ports": "127.0.0.1:7000:7000"},
            "ports": [{"target": 80, "published": "8080", "protocol": "tcp"}],
            "command": "serve --name 'a b'",
        });
        let s = ServiceView::read("web", &svc).unwrap();
        assert!(s.managed());
        assert_eq!(
            s.refs.iter().map(|r| r.var.as_str()).collect::<Vec<_>>(),
            ["A", "Z"]
        );
        assert_eq!(s.refs[0].reference, "a$b");
        assert_eq!(s.host_ports.as_deref(), Some("127.0.0.1:7000:7000,8080:80"));
        assert_eq!(s.command.as_deref().unwrap(), ["serve", "--name", "a b"]);
        let d = s.declared("local");
        assert_eq!(d.env[0].provider, "local");
        assert_eq!(d.files[0].provider, "aws");
        let plain = ServiceView::read("db", &json!({"image": "pg"})).unwrap();
        assert!(!plain.managed());
    }
}
