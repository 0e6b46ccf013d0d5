//! The container labels dso reads, parsed into a checked [`ServiceSpec`].
//!
//! Label names match the original DSO (`dso.reloader`, `dso.host_ports`,
//! `dso.update.strategy`) so existing Compose files keep working. Errors name the label,
//! the value and the container.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `true` marks a container as managed.
pub const RELOADER: &str = "dso.reloader";
/// Ports the proxy owns: `HOST:CONTAINER` or `IP:HOST:CONTAINER`, comma-separated.
pub const HOST_PORTS: &str = "dso.host_ports";
/// `rolling`, `restart`, `signal`, `none` or `auto`.
pub const STRATEGY: &str = "dso.update.strategy";
/// Network whose container IP the proxy dials.
pub const NETWORK: &str = "dso.network";
/// Longest wait for a new container to become healthy (`60s`).
pub const HEALTH_TIMEOUT: &str = "dso.health.timeout";
/// Command run in the container as an extra probe; must exit 0 (`["probe","--port","8080"]`
/// as JSON, or words separated by spaces).
pub const HEALTH_EXEC: &str = "dso.health.exec";
/// How long replaced connections may keep flowing after a swap (`30s`).
pub const DRAIN_TIMEOUT: &str = "dso.drain.timeout";
/// Signal of the `signal` strategy (`SIGHUP`).
pub const SIGNAL: &str = "dso.signal";
/// `true`/`false`: overrides the stateful guess (which refuses `rolling`).
pub const STATEFUL: &str = "dso.stateful";
/// Set by dso on a container it creates: the rotation that created it.
pub const ROTATION_ID: &str = "dso.rotation.id";
/// Set by dso on a container it creates for a container outside Compose: the service (the
/// original container name) it belongs to, so that a green container under its temporary
/// name is not taken for a service of its own.
pub const SERVICE: &str = "dso.service";
/// Compose's project label (v1 and v2).
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// Compose's service label (v1 and v2).
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// Default of [`HEALTH_TIMEOUT`].
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`DRAIN_TIMEOUT`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`SIGNAL`].
pub const DEFAULT_SIGNAL: &str = "SIGHUP";

/// A label that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container}: label {label}={value:?}: {reason}")]
pub struct LabelError {
    /// Container name.
    pub container: String,
    /// Label name.
    pub label: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Which service a container belongs to: Compose project and service, or the container
/// name for a container started without Compose.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Compose project; empty without Compose.
    pub project: String,
    /// Compose service, else the container name.
    pub service: String,
}

impl ServiceKey {
    /// The key of a container from its labels and name.
    pub fn of(name: &str, labels: &BTreeMap<String, String>) -> ServiceKey {
        match (labels.get(COMPOSE_PROJECT), labels.get(COMPOSE_SERVICE)) {
            (Some(p), Some(s)) => ServiceKey {
                project: p.clone(),
                service: s.clone(),
            },
            _ => ServiceKey {
                project: String::new(),
                service: labels.get(SERVICE).map_or(name, String::as_str).to_owned(),
            },
        }
    }

    /// A file name for the service's journal, lock and history files; injective, so two
    /// services never share a file: every byte outside `[A-Za-z0-9.-]` of project and
    /// service is written `%XX` (`_` too), and `_` separates the two (`a_b/c` is
    /// `a%5Fb_c`, `a/b_c` is `a_b%5Fc`). A leading `.` is escaped as well, so no name is
    /// hidden or `..`.
    pub fn file_stem(&self) -> String {
        if self.project.is_empty() {
            escape(&self.service)
        } else {
            format!("{}_{}", escape(&self.project), escape(&self.service))
        }
    }

    /// The file name dso used before names were escaped (`project_service`, other
    /// characters replaced by `_`): not injective, read only to finish old journals.
    pub fn legacy_file_stem(&self) -> String {
        let raw = if self.project.is_empty() {
            self.service.clone()
        } else {
            format!("{}_{}", self.project, self.service)
        };
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// `%XX`-escapes every byte outside `[A-Za-z0-9.-]`, and a leading `.`.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.project.is_empty() {
            f.write_str(&self.service)
        } else {
            write!(f, "{}/{}", self.project, self.service)
        }
    }
}

/// One port the proxy owns for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortMap {
    /// Bind address; `0.0.0.0` when the label gives none.
    pub bind: IpAddr,
    /// Host port (0: the OS picks one).
    pub host: u16,
    /// Container port the proxy dials.
    pub container: u16,
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bind {
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}:{}", self.host, self.container),
            ip => write!(f, "{ip}:{}:{}", self.host, self.container),
        }
    }
}

/// How a service is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Blue-green behind the proxy.
    Rolling,
    /// Stop, replace and start with the proxy holding new connections.
    Restart,
    /// Signal the running container.
    Signal,
    /// Do nothing to the container.
    None,
    /// Restart when the container looks stateful, rolling otherwise.
    Auto,
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "rolling" => Strategy::Rolling,
            "restart" => Strategy::Restart,
            "signal" => Strategy::Signal,
            "none" => Strategy::None,
            "auto" | "" => Strategy::Auto,
            _ => return Err("expected rolling, restart, signal, none or auto".to_owned()),
        })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Rolling => "rolling",
            Strategy::Restart => "restart",
            Strategy::Signal => "signal",
            Strategy::None => "none",
            Strategy::Auto => "auto",
        })
    }
}

/// The checked settings of a managed container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Ports the proxy owns.
    pub ports: Vec<PortMap>,
    /// Strategy from the label (`auto` when absent).
    pub strategy: Strategy,
    /// Network label, if set.
    pub network: Option<String>,
    /// Health wait limit.
    pub health_timeout: Duration,
    /// Optional exec probe.
    pub health_exec: Option<Vec<String>>,
    /// Drain deadline after a swap.
    pub drain_timeout: Duration,
    /// Signal of the `signal` strategy.
    pub signal: String,
    /// Explicit stateful override.
    pub stateful: Option<bool>,
}

/// Whether `labels` mark a managed container.
pub fn is_managed(labels: &BTreeMap<String, String>) -> bool {
    labels
        .get(RELOADER)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Parses the dso labels of container `name`.
pub fn parse(name: &str, labels: &BTreeMap<String, String>) -> Result<ServiceSpec, LabelError> {
    let fail = |label: &str, value: &str, reason: String| LabelError {
        container: name.to_owned(),
        label: label.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let get = |k: &str| labels.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());

    let ports = match get(HOST_PORTS) {
        None => Vec::new(),
        Some(v) => parse_ports(v).map_err(|r| fail(HOST_PORTS, v, r))?,
    };
    let strategy = match get(STRATEGY) {
        None => Strategy::Auto,
        Some(v) => v.parse().map_err(|r| fail(STRATEGY, v, r))?,
    };
    let duration = |k: &str, d: Duration| match get(k) {
        None => Ok(d),
        Some(v) => parse_duration(v).map_err(|r| fail(k, v, r)),
    };
    let health_exec = match get(HEALTH_EXEC) {
        None => None,
        Some(v) if v.starts_with('[') => Some(
            serde_json::from_str::<Vec<String>>(v)
                .map_err(|e| fail(HEALTH_EXEC, v, format!("not a JSON array of strings: {e}")))?,
        ),
        Some(v) => Some(v.split_whitespace().map(str::to_owned).collect()),
    };
    let stateful = match get(STATEFUL) {
        None => None,
        Some(v) => Some(
            v.parse::<bool>()
                .map_err(|_| fail(STATEFUL, v, "expected true or false".to_owned()))?,
        ),
    };
    let signal = get(SIGNAL).unwrap_or(DEFAULT_SIGNAL).to_owned();
    Ok(ServiceSpec {
        ports,
        strategy,
        network: get(NETWORK).map(str::to_owned),
        health_timeout: duration(HEALTH_TIMEOUT, DEFAULT_HEALTH_TIMEOUT)?,
        health_exec,
        drain_timeout: duration(DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT)?,
        signal,
        stateful,
    })
}

/// Parses `HOST:CONTAINER` / `IP:HOST:CONTAINER` items, comma-separated.
pub fn parse_ports(v: &str) -> Result<Vec<PortMap>, String> {
    let mut out: Vec<PortMap> = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (rest, container) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("{item:?}: expected HOST:CONTAINER or IP:HOST:CONTAINER"))?;
        let (ip, host) = match rest.rsplit_once(':') {
            Some((ip, host)) => (Some(ip), host),
            None => (None, rest),
        };
        let port = |p: &str, what: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{item:?}: {what} port {p:?} is not a number from 0 to 65535"))
        };
        let bind = match ip {
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(ip) => ip
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| format!("{item:?}: {ip:?} is not an IP address"))?,
        };
        let map = PortMap {
            bind,
            host: port(host, "host")?,
            container: port(container, "container")?,
        };
        if map.container == 0 {
            return Err(format!("{item:?}: container port 0 is not a port"));
        }
        if map.host != 0 && out.iter().any(|o| o.host == map.host && o.bind == map.bind) {
            return Err(format!("{item:?}: host port {} listed twice", map.host));
        }
        out.push(map);
    }
    if out.is_empty() {
        return Err("no port listed".to_owned());
    }
    Ok(out)
}

/// The longest duration a label may give (a week): longer values are typos, and every
/// sum of label durations stays far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `250ms`, `2s`, `5m`, `1h`, or a plain number of seconds, up to [`MAX_DURATION`].
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let too_long = || format!("longer than the maximum of {}h", MAX_DURATION.as_secs() / 3600);
    let n: u64 = num.parse().map_err(|e: std::num::ParseIntError| {
        if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) {
            too_long()
        } else {
            "expected a duration like 500ms, 30s, 5m or 1h".to_owned()
        }
    })?;
    let d = match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        u => return Err(format!("unknown unit {u:?}; use ms, s, m or h")),
    };
    match d {
        Some(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(too_long()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_green_container_outside_compose_belongs_to_its_service() {
        let blue = ServiceKey::of("web", &labels(&[]));
        let green = ServiceKey::of("web-dso-1a2b", &labels(&[(SERVICE, "web")]));
        assert_eq!(blue, green);
        let compose = labels(&[
            (COMPOSE_PROJECT, "shop"),
            (COMPOSE_SERVICE, "api"),
            (SERVICE, "x"),
        ]);
        assert_eq!(ServiceKey::of("shop-api-1", &compose).service, "api");
    }

    #[test]
    fn ports_keep_the_bind_ip() {
        let p = parse_ports("8080:80, 127.0.0.1:5432:5432,[::1]:0:9000").unwrap();
        assert_eq!(p[0].bind.to_string(), "0.0.0.0");
        assert_eq!((p[0].host, p[0].container), (8080, 80));
        assert_eq!(p[1].bind.to_string(), "127.0.0.1");
        assert_eq!((p[1].host, p[1].container), (5432, 5432));
        assert_eq!(p[2].bind.to_string(), "::1");
        assert_eq!(p[2].to_string(), "[::1]:0:9000");
    }

    #[test]
    fn bad_ports_name_label_and_container() {
        let l = labels(&[(HOST_PORTS, "80"), (RELOADER, "true")]);
        let e = parse("web-1", &l).unwrap_err().to_string();
        assert!(
            e.contains("web-1") && e.contains("dso.host_ports") && e.contains("HOST:CONTAINER"),
            "{e}"
        );
        for bad in ["x:80", "1.2.3:80:80", "80:99999", "80:0", "8080:80,8080:81"] {
            assert!(parse_ports(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn strategy_and_durations() {
        let l = labels(&[
            (STRATEGY, "restart"),
            (HEALTH_TIMEOUT, "1500ms"),
            (DRAIN_TIMEOUT, "2m"),
            (HEALTH_EXEC, r#"["/probe","--port","8081"]"#),
        ]);
        let s = parse("db", &l).unwrap();
        assert_eq!(s.strategy, Strategy::Restart);
        assert_eq!(s.health_timeout, Duration::from_millis(1500));
        assert_eq!(s.drain_timeout, Duration::from_secs(120));
        assert_eq!(s.health_exec.unwrap(), vec!["/probe", "--port", "8081"]);
        assert_eq!(parse("db", &labels(&[])).unwrap().strategy, Strategy::Auto);
        let e = parse("db", &labels(&[(STRATEGY, "blue-green")])).unwrap_err();
        assert_eq!(e.label, STRATEGY);
        assert!(parse("db", &labels(&[(HEALTH_TIMEOUT, "5 weeks")])).is_err());
    }

    #[test]
    fn service_key_from_compose_or_name() {
        let k = ServiceKey::of(
            "p-web-1",
            &labels(&[(COMPOSE_PROJECT, "p"), (COMPOSE_SERVICE, "web")]),
        );
        assert_eq!(k.to_string(), "p/web");
        assert_eq!(k.file_stem(), "p_web");
        assert_eq!(k.legacy_file_stem(), "p_web");
        assert_eq!(ServiceKey::of("solo", &labels(&[])).to_string(), "solo");
    }

    #[test]
    fn file_stems_are_injective() {
        let k = |p: &str, s: &str| ServiceKey {
            project: p.into(),
            service: s.into(),
        };
        let keys = [
            k("a_b", "c"),
            k("a", "b_c"),
            k("", "a_b_c"),
            k("", "a/b"),
            k("a", "b"),
            k("", ".."),
            k("", "%2E."),
        ];
        let stems: std::collections::BTreeSet<String> = keys.iter().map(ServiceKey::file_stem).collect();
        assert_eq!(stems.len(), keys.len(), "{stems:?}");
        assert_eq!(k("a_b", "c").file_stem(), "a%5Fb_c");
        assert_eq!(k("", "..").file_stem(), "%2E.");
        assert!(stems.iter().all(|s| !s.contains('/') && !s.starts_with('.')));
        // The old encoding did collide.
        assert_eq!(k("a_b", "c").legacy_file_stem(), k("a", "b_c").legacy_file_stem());
    }

    #[test]
    fn overflowing_durations_are_errors_not_panics() {
        for v in [
            "18446744073709551615s",
            "18446744073709551616s",
            "18446744073709551615m",
            "18446744073709551615h",
            "18446744073709551615ms",
            "8d",
            "169h",
        ] {
            let e = parse_duration(v).unwrap_err();
            assert!(e.contains("maximum") || e.contains("unit"), "{v}: {e}");
        }
        assert_eq!(parse_duration("168h").unwrap(), MAX_DURATION);
        let l = labels(&[(HEALTH_TIMEOUT, "18446744073709551615s")]);
        let e = parse("db-1", &l).unwrap_err();
        assert_eq!(e.label, HEALTH_TIMEOUT);
        assert!(e.to_string().contains("db-1"), "{e}");
    }
}
