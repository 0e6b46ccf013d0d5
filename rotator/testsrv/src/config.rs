//! Command line and environment, turned into a [`Command`].
//!
//! Flags win over environment variables, which win over defaults. Parsing is by hand: the
//! binary stays small and static, and the grammar is a handful of flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default address of the TCP echo listener.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Default address of the HTTP control listener.
pub const DEFAULT_HTTP: &str = "0.0.0.0:8081";

/// Usage text printed by `--help` and after a usage error.
pub const USAGE: &str = "\
usage: dso-testsrv [--listen ADDR] [--http ADDR|off] [--healthy-after DUR] [--unhealthy] [--id ID]
       dso-testsrv probe HOST:PORT[/PATH] [--timeout DUR]
       dso-testsrv cat PATH

Serve:  TCP echo on --listen (env LISTEN, default 0.0.0.0:8080): writes the line
        `dso-testsrv <INSTANCE_ID>` then echoes. HTTP on --http (env HTTP_LISTEN, default
        0.0.0.0:8081): GET /health, POST /health/fail, POST /health/ok, GET /id, GET /pid,
        GET /uid, GET /reloads, GET /reloaded, GET /env/NAME, GET /file?path=P,
        GET /stat?path=P.
        --healthy-after (env HEALTHY_AFTER, e.g. 500ms, 2s): unhealthy until then.
        --unhealthy (env UNHEALTHY=1): never healthy. --id (env INSTANCE_ID): the instance
        id, else the hostname (a container's short id).
        Env HEALTH_FILE=PATH with UNHEALTHY_IF=TEXT: /health answers 503 while PATH's
        content (trimmed) equals TEXT.
        SIGTERM/SIGINT: exit at once. SIGHUP: log `reloaded`, count it at GET /reloads; with
        env RELOAD_FILE=PATH, read PATH then: GET /reloaded answers what was read at the last
        SIGHUP (404 before any).
Probe:  GET http://HOST:PORT/PATH (default /health); exit 0 on 2xx, 1 otherwise, 2 on usage.
        HOST must be an IP address (no resolver in a scratch image).
Cat:    print PATH to stdout, exit 0; on error (e.g. permission denied) print it to stderr,
        exit 1 (a scratch image has no cat: `docker exec -u UID ... cat PATH`).
";

/// What the process was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the servers.
    Serve(ServeConfig),
    /// Probe an HTTP endpoint once and exit with its verdict.
    Probe(ProbeConfig),
    /// Print a file to stdout.
    Cat(PathBuf),
    /// Print [`USAGE`] and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
}

/// Settings of the servers, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Where the TCP echo server listens.
    pub listen: SocketAddr,
    /// Where the HTTP control server listens; `None` turns it off.
    pub http: Option<SocketAddr>,
    /// The health endpoint answers 503 until this long after start.
    pub healthy_after: Duration,
    /// The health endpoint never answers 200 (for rollback tests).
    pub never_healthy: bool,
    /// The name this instance gives in its greeting and at `GET /id`.
    pub instance_id: String,
    /// Read at every SIGHUP; `GET /reloaded` shows what was read (env `RELOAD_FILE`).
    pub reload_file: Option<PathBuf>,
    /// Unhealthy while this file's trimmed content equals the text (env `HEALTH_FILE` and
    /// `UNHEALTHY_IF`, given together).
    pub health_file: Option<(PathBuf, String)>,
}

/// Settings of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The server to ask.
    pub addr: SocketAddr,
    /// The path to GET, starting with `/`.
    pub path: String,
    /// Bound on connect plus response.
    pub timeout: Duration,
}

/// A usage error, with a message naming the offending argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parses the arguments after the program name. `env` looks up environment variables and
/// `hostname` supplies the fallback instance id (both injected so tests need no process state).
pub fn parse(
    args: &[String],
    env: impl Fn(&str) -> Option<String>,
    hostname: impl FnOnce() -> String,
) -> Result<Command, UsageError> {
    match args.first().map(String::as_str) {
        Some("probe") => return parse_probe(&args[1..]).map(Command::Probe),
        Some("cat") => {
            return match &args[1..] {
                [path] => Ok(Command::Cat(PathBuf::from(path))),
                _ => Err(UsageError("cat needs exactly one PATH".into())),
            };
        }
        Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("-V" | "--version") => return Ok(Command::Version),
        _ => {}
    }
    let mut listen = env("LISTEN").unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let mut http = env("HTTP_LISTEN").unwrap_or_else(|| DEFAULT_HTTP.to_owned());
    let mut healthy_after = env("HEALTHY_AFTER").unwrap_or_else(|| "0s".to_owned());
    let mut never_healthy = env("UNHEALTHY").is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
    let mut instance_id = env("INSTANCE_ID").filter(|v| !v.is_empty());
    let reload_file = env("RELOAD_FILE").filter(|v| !v.is_empty()).map(PathBuf::from);
    let health_file = match (env("HEALTH_FILE").filter(|v| !v.is_empty()), env("UNHEALTHY_IF")) {
        (Some(path), Some(text)) => Some((PathBuf::from(path), text)),
        (None, None) => None,
        _ => {
            return Err(UsageError(
                "HEALTH_FILE and UNHEALTHY_IF must be set together".into(),
            ));
        }
    };

    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))
        };
        match flag {
            "--listen" => listen = value()?,
            "--http" => http = value()?,
            "--healthy-after" => healthy_after = value()?,
            "--id" => instance_id = Some(value()?),
            "--unhealthy" => never_healthy = true,
            other => return Err(UsageError(format!("unknown argument {other:?}"))),
        }
    }

    Ok(Command::Serve(ServeConfig {
        listen: parse_addr("--listen", &listen)?,
        http: match http.as_str() {
            "off" | "none" | "" => None,
            addr => Some(parse_addr("--http", addr)?),
        },
        healthy_after: parse_duration(&healthy_after)
            .ok_or_else(|| UsageError(format!("--healthy-after: bad duration {healthy_after:?}")))?,
        never_healthy,
        instance_id: instance_id.unwrap_or_else(hostname),
        reload_file,
        health_file,
    }))
}

/// Parses `probe HOST:PORT[/PATH] [--timeout DUR]` (the words after `probe`).
fn parse_probe(args: &[String]) -> Result<ProbeConfig, UsageError> {
    let mut target = None;
    let mut timeout = Duration::from_secs(2);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--timeout" {
            let v = it
                .next()
                .ok_or_else(|| UsageError("--timeout needs a value".into()))?;
            timeout =
                parse_duration(v).ok_or_else(|| UsageError(format!("--timeout: bad duration {v:?}")))?;
        } else if target.is_none() {
            target = Some(arg.clone());
        } else {
            return Err(UsageError(format!("probe: unexpected argument {arg:?}")));
        }
    }
    let target = target.ok_or_else(|| UsageError("probe needs HOST:PORT[/PATH]".into()))?;
    let rest = target.strip_prefix("http://").unwrap_or(&target);
    let (addr, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/health".to_owned()),
    };
    Ok(ProbeConfig {
        addr: parse_addr("probe", addr)?,
        path,
        timeout,
    })
}

/// Parses an `IP:PORT` socket address, naming `what` in the error.
fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, UsageError> {
    s.parse()
        .map_err(|_| UsageError(format!("{what}: expected IP:PORT, got {s:?}")))
}

/// Parses a human duration: `250ms`, `2s`, `1m`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn serve(s: &str, env: &[(&str, &str)]) -> Result<ServeConfig, UsageError> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match parse(&args(s), lookup, || "host123".into())? {
            Command::Serve(c) => Ok(c),
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn defaults_use_hostname_and_standard_ports() {
        let c = serve("", &[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.http, Some("0.0.0.0:8081".parse().unwrap()));
        assert_eq!(c.instance_id, "host123");
        assert_eq!(c.healthy_after, Duration::ZERO);
        assert!(!c.never_healthy);
    }

    #[test]
    fn flags_override_environment() {
        let env = [
            ("LISTEN", "127.0.0.1:1"),
            ("INSTANCE_ID", "blue"),
            ("HEALTHY_AFTER", "2s"),
        ];
        let c = serve(
            "--listen 127.0.0.1:2 --healthy-after=500ms --http off --unhealthy",
            &env,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.http, None);
        assert_eq!(c.instance_id, "blue");
        assert_eq!(c.healthy_after, Duration::from_millis(500));
        assert!(c.never_healthy);
    }

    #[test]
    fn usage_errors_name_the_argument() {
        assert!(serve("--bogus", &[]).unwrap_err().0.contains("--bogus"));
        assert!(serve("--listen", &[]).unwrap_err().0.contains("needs a value"));
        assert!(
            serve("--listen localhost:80", &[])
                .unwrap_err()
                .0
                .contains("IP:PORT")
        );
        assert!(
            serve("--healthy-after 5x", &[])
                .unwrap_err()
                .0
                .contains("duration")
        );
    }

    #[test]
    fn probe_target_forms() {
        let p = |s: &str| match parse(&args(s), |_| None, String::new).unwrap() {
            Command::Probe(p) => p,
            other => panic!("expected probe, got {other:?}"),
        };
        let a = p("probe 127.0.0.1:8081/health");
        assert_eq!((a.addr.port(), a.path.as_str()), (8081, "/health"));
        let b = p("probe http://127.0.0.1:9/ready --timeout 100ms");
        assert_eq!(
            (b.path.as_str(), b.timeout),
            ("/ready", Duration::from_millis(100))
        );
        assert_eq!(p("probe 10.0.0.1:1").path, "/health");
        assert!(parse(&args("probe"), |_| None, String::new).is_err());
    }

    #[test]
    fn reload_and_health_files_from_the_environment() {
        let c = serve(
            "",
            &[
                ("RELOAD_FILE", "/run/secrets/conf"),
                ("HEALTH_FILE", "/run/secrets/pw"),
                ("UNHEALTHY_IF", "bad"),
            ],
        )
        .unwrap();
        assert_eq!(c.reload_file, Some(PathBuf::from("/run/secrets/conf")));
        assert_eq!(
            c.health_file,
            Some((PathBuf::from("/run/secrets/pw"), "bad".into()))
        );
        let c = serve("", &[]).unwrap();
        assert_eq!((c.reload_file, c.health_file), (None, None));
        let e = serve("", &[("HEALTH_FILE", "/x")]).unwrap_err().0;
        assert!(e.contains("UNHEALTHY_IF"), "{e}");
    }

    #[test]
    fn cat_takes_one_path() {
        assert_eq!(
            parse(&args("cat /run/secrets/db"), |_| None, String::new).unwrap(),
            Command::Cat(PathBuf::from("/run/secrets/db"))
        );
        assert!(parse(&args("cat"), |_| None, String::new).is_err());
        assert!(parse(&args("cat /a /b"), |_| None, String::new).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("ms"), None);
        assert_eq!(parse_duration("10"), None);
    }
}
