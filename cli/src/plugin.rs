//! The Docker CLI plugin protocol: installed as `docker-dso` in a `cli-plugins` directory,
//! the binary answers `docker-cli-plugin-metadata` and is then run by `docker dso ARGS...`.
//!
//! What Docker passes (docker/cli `cli-plugins/manager`, `PluginRunCommand`): the plugin is
//! executed with **all of docker's own arguments**, `os.Args[1:]`, so Docker's global
//! options stay in front of the plugin's name: `docker -H tcp://h:2375 --context x dso up`
//! runs `docker-dso -H tcp://h:2375 --context x dso up`. `docker help dso proxy` runs
//! `docker-dso help dso proxy`. Docker sets no `DOCKER_HOST`-style variable for them.
//!
//! dso parses those options (the same forms pflag accepts: `-H X`, `-HX`, `--host=X`,
//! `-D`, `--tlsverify=false`...), strips them, and maps each onto the environment variable
//! that the Docker clients dso uses read (bollard in the agent and doctor: `DOCKER_HOST`;
//! Compose and the `docker` CLI: all of them). When there is something to set, `main`
//! executes the binary again with that environment, so every Docker call of the process and
//! of its children sees the same engine (`std::env::set_var` is not safe in a running
//! program).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The argument Docker passes to ask a plugin for its metadata.
pub const METADATA_ARG: &str = "docker-cli-plugin-metadata";

/// The plugin's name: the command after `docker`.
pub const NAME: &str = "dso";

/// What to do with the process arguments.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Print the plugin metadata and exit.
    Metadata,
    /// Parse these arguments as a normal `dso` command line.
    Run(Vec<OsString>),
    /// Docker's global options were given: run `argv` again with these variables set
    /// (`Some`) or removed (`None`).
    Reexec {
        /// The arguments of the new run, Docker's options removed (still a plugin call).
        argv: Vec<OsString>,
        /// Environment changes, in order.
        env: Vec<(String, Option<String>)>,
    },
    /// A Docker global option dso cannot honour; the message says why and what to do.
    Invalid(String),
}

/// Decides from argv whether this is a plugin call, strips Docker's global options and the
/// plugin's name argument that Docker inserts (`docker dso proxy status` runs
/// `docker-dso dso proxy status`).
pub fn classify(args: Vec<OsString>) -> Invocation {
    let as_plugin = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "docker-dso");
    if args.get(1).is_some_and(|a| a == METADATA_ARG) {
        return Invocation::Metadata;
    }
    if !as_plugin {
        return Invocation::Run(args);
    }
    let (globals, rest) = match parse_globals(&args[1..]) {
        Ok(Some(found)) => found,
        // Not followed by the plugin's name: somebody ran `docker-dso ...` by hand; read it
        // as a plain dso command line.
        Ok(None) => return Invocation::Run(renamed(args)),
        Err(e) => return Invocation::Invalid(e),
    };
    let env = match globals.env() {
        Ok(env) => env,
        Err(e) => return Invocation::Invalid(e),
    };
    // `help dso X` (from `docker help dso X`) becomes `help X`; `dso X` becomes `X`.
    let help = rest.first().is_some_and(|a| a == "help");
    let command = &rest[1 + usize::from(help)..];
    let mut argv = vec![args[0].clone()];
    if env.is_empty() {
        argv.extend(help.then(|| OsString::from("help")));
        argv.extend(command.iter().cloned());
        return Invocation::Run(renamed(argv));
    }
    // The new run is the same plugin call without Docker's options.
    argv.extend(rest.iter().cloned());
    Invocation::Reexec { argv, env }
}

/// Help and errors then read `docker dso ...`, the way users type it.
fn renamed(mut args: Vec<OsString>) -> Vec<OsString> {
    if let Some(first) = args.first_mut() {
        *first = OsString::from("docker dso");
    }
    args
}

/// Docker's global options (docker/cli `cli/flags/options.go`), as given.
#[derive(Debug, Default, PartialEq, Eq)]
struct Globals {
    config: Option<String>,
    context: Option<String>,
    debug: bool,
    hosts: Vec<String>,
    log_level: Option<String>,
    tls: bool,
    tlsverify: Option<bool>,
    tlscacert: Option<String>,
    tlscert: Option<String>,
    tlskey: Option<String>,
}

/// One of Docker's options: its long name, short letter and whether it takes a value.
struct Opt {
    long: &'static str,
    short: Option<char>,
    value: bool,
}

const OPTIONS: &[Opt] = &[
    Opt {
        long: "config",
        short: None,
        value: true,
    },
    Opt {
        long: "context",
        short: Some('c'),
        value: true,
    },
    Opt {
        long: "debug",
        short: Some('D'),
        value: false,
    },
    Opt {
        long: "host",
        short: Some('H'),
        value: true,
    },
    Opt {
        long: "log-level",
        short: Some('l'),
        value: true,
    },
    Opt {
        long: "tls",
        short: None,
        value: false,
    },
    Opt {
        long: "tlsverify",
        short: None,
        value: false,
    },
    Opt {
        long: "tlscacert",
        short: None,
        value: true,
    },
    Opt {
        long: "tlscert",
        short: None,
        value: true,
    },
    Opt {
        long: "tlskey",
        short: None,
        value: true,
    },
];

/// Reads Docker's options up to the plugin's name (or `help` followed by it). `Ok(None)`
/// when the arguments are not options followed by that name.
fn parse_globals(args: &[OsString]) -> Result<Option<(Globals, &[OsString])>, String> {
    let mut g = Globals::default();
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        if arg == NAME || (arg == "help" && args.get(i + 1).is_some_and(|a| a == NAME)) {
            return Ok(Some((g, &args[i..])));
        }
        let Some(text) = arg.to_str().filter(|t| t.starts_with('-') && t.len() > 1) else {
            return Ok(None);
        };
        let next = args.get(i + 1).and_then(|a| a.to_str());
        let used_next = if let Some(long) = text.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            let Some(opt) = OPTIONS.iter().find(|o| o.long == name) else {
                return Ok(None);
            };
            g.set(opt, inline, next)?
        } else {
            // Short options, possibly grouped (`-Dl debug`, `-Hunix:///x`, `-c=x`).
            let letters = &text[1..];
            let mut used_next = false;
            for (at, c) in letters.char_indices() {
                let Some(opt) = OPTIONS.iter().find(|o| o.short == Some(c)) else {
                    return Ok(None);
                };
                if opt.value {
                    let inline = &letters[at + c.len_utf8()..];
                    let inline = inline.strip_prefix('=').unwrap_or(inline);
                    used_next = g.set(opt, (!inline.is_empty()).then_some(inline), next)?;
                    break;
                }
                g.set(opt, None, None)?;
            }
            used_next
        };
        i += 1 + usize::from(used_next);
    }
    Ok(None)
}

impl Globals {
    /// Records one option; returns whether its value was the next argument.
    fn set(&mut self, opt: &Opt, inline: Option<&str>, next: Option<&str>) -> Result<bool, String> {
        if !opt.value {
            let on = match inline {
                None => true,
                Some(v) => parse_bool(v).ok_or_else(|| {
                    format!(
                        "invalid value {v:?} for Docker's --{}: expected true or false",
                        opt.long
                    )
                })?,
            };
            match opt.long {
                "debug" => self.debug = on,
                "tls" => self.tls = on,
                _ => self.tlsverify = Some(on),
            }
            return Ok(false);
        }
        let (value, used_next) = match (inline, next) {
            (Some(v), _) => (v, false),
            (None, Some(v)) => (v, true),
            (None, None) => return Err(format!("Docker's --{} needs a value", opt.long)),
        };
        let value = value.to_owned();
        match opt.long {
            "config" => self.config = Some(value),
            "context" => self.context = Some(value),
            "host" => self.hosts.push(value),
            "log-level" => self.log_level = Some(value),
            "tlscacert" => self.tlscacert = Some(value),
            "tlscert" => self.tlscert = Some(value),
            _ => self.tlskey = Some(value),
        }
        Ok(used_next)
    }

    /// The environment that gives dso's Docker clients (bollard, Compose, `docker`) the
    /// same settings, or why that is impossible.
    fn env(&self) -> Result<Vec<(String, Option<String>)>, String> {
        let mut env: Vec<(String, Option<String>)> = Vec::new();
        let mut set = |k: &str, v: Option<String>| env.push((k.to_owned(), v));
        if self.hosts.len() > 1 {
            return Err(format!(
                "Docker's -H was given {} times; dso talks to one engine: give one -H (or DOCKER_HOST)",
                self.hosts.len()
            ));
        }
        if let (Some(_), Some(_)) = (&self.context, self.hosts.first()) {
            return Err("conflicting Docker options: give either --host or --context, not both".into());
        }
        if let Some(h) = self.hosts.first() {
            set("DOCKER_HOST", Some(h.clone()));
        }
        if let Some(c) = &self.context {
            // The flag overrides DOCKER_HOST; in a child's environment DOCKER_HOST would win
            // over DOCKER_CONTEXT, so it goes.
            set("DOCKER_CONTEXT", Some(c.clone()));
            set("DOCKER_HOST", None);
        }
        if let Some(c) = &self.config {
            set("DOCKER_CONFIG", Some(c.clone()));
        }
        if self.debug {
            set("RUST_LOG", Some("debug".into()));
        } else if let Some(l) = &self.log_level {
            set("RUST_LOG", Some(rust_log_level(l)?.into()));
        }
        if self.tls {
            set("DOCKER_TLS", Some("1".into()));
        }
        match self.tlsverify {
            Some(true) => set("DOCKER_TLS_VERIFY", Some("1".into())),
            // Given at all, --tlsverify turns TLS on; `=false` only skips verification, and
            // DOCKER_TLS_VERIFY can only turn verification on.
            Some(false) => {
                set("DOCKER_TLS_VERIFY", None);
                set("DOCKER_TLS", Some("1".into()));
            }
            None => {}
        }
        if let Some(dir) = self.cert_dir()? {
            set("DOCKER_CERT_PATH", Some(dir));
        }
        Ok(env)
    }

    /// `--tlscacert`, `--tlscert`, `--tlskey` as one `DOCKER_CERT_PATH`: the environment has
    /// only a directory holding `ca.pem`, `cert.pem` and `key.pem`.
    fn cert_dir(&self) -> Result<Option<String>, String> {
        let files = [
            ("tlscacert", &self.tlscacert, "ca.pem"),
            ("tlscert", &self.tlscert, "cert.pem"),
            ("tlskey", &self.tlskey, "key.pem"),
        ];
        let mut dir: Option<PathBuf> = None;
        for (flag, given, expected) in files {
            let Some(given) = given else { continue };
            let path = Path::new(given);
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let parent = if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent
            };
            if path.file_name().is_none_or(|n| n != expected) || dir.as_ref().is_some_and(|d| *d != parent) {
                return Err(format!(
                    "Docker's --{flag} {given}: dso hands TLS files to Docker's tools as one \
                     directory (DOCKER_CERT_PATH) holding ca.pem, cert.pem and key.pem; put the \
                     files there under those names and pass DIR/{expected}, or set DOCKER_CERT_PATH=DIR"
                ));
            }
            dir = Some(parent);
        }
        Ok(dir.map(|d| d.to_string_lossy().into_owned()))
    }
}

/// pflag's boolean spellings.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Docker's (logrus) level names onto dso's (`RUST_LOG`) ones.
fn rust_log_level(level: &str) -> Result<&'static str, String> {
    match level.to_ascii_lowercase().as_str() {
        "trace" => Ok("trace"),
        "debug" => Ok("debug"),
        "info" => Ok("info"),
        "warn" | "warning" => Ok("warn"),
        "error" | "fatal" | "panic" => Ok("error"),
        _ => Err(format!(
            "invalid Docker --log-level {level:?}: expected debug, info, warn, error or fatal"
        )),
    }
}

/// Executes this binary again as `argv` (its first element as the program name) with the
/// environment changes applied; returns only when that fails.
pub fn reexec(argv: &[OsString], env: &[(String, Option<String>)]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return e,
    };
    let mut cmd = std::process::Command::new(exe);
    if let Some((first, rest)) = argv.split_first() {
        cmd.arg0(first).args(rest);
    }
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.exec()
}

/// The Docker endpoint settings this process sees, for `dso version`: each variable that
/// is set.
pub fn docker_env() -> Vec<(&'static str, String)> {
    [
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_CONFIG",
        "DOCKER_TLS",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
    ]
    .into_iter()
    .filter_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()).map(|v| (k, v)))
    .collect()
}

/// Whether this process runs as `docker dso` (the name Docker executes).
pub fn as_plugin() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|a| Path::new(&a).file_name().is_some_and(|n| n == "docker-dso"))
}

/// The metadata JSON Docker reads.
pub fn metadata() -> String {
    serde_json::json!({
        "SchemaVersion": "0.1.0",
        "Vendor": "dso",
        "Version": env!("CARGO_PKG_VERSION"),
        "ShortDescription": "Zero-downtime backend swaps for the TCP ports of this host",
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN: &str = "/home/u/.docker/cli-plugins/docker-dso";

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn env(pairs: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn metadata_is_answered_under_any_name() {
        assert_eq!(classify(args(&["dso", METADATA_ARG])), Invocation::Metadata);
        assert_eq!(classify(args(&[PLUGIN, METADATA_ARG])), Invocation::Metadata);
        let v: serde_json::Value = serde_json::from_str(&metadata()).unwrap();
        assert_eq!(v["SchemaVersion"], "0.1.0");
    }

    #[test]
    fn plugin_name_argument_is_dropped() {
        let got = classify(args(&[PLUGIN, "dso", "proxy", "status"]));
        assert_eq!(got, Invocation::Run(args(&["docker dso", "proxy", "status"])));
        let plain = classify(args(&["dso", "dso"]));
        assert_eq!(plain, Invocation::Run(args(&["dso", "dso"])));
        // Run by hand without the name: a plain dso command line.
        let by_hand = classify(args(&[PLUGIN, "--socket", "/x", "status"]));
        assert_eq!(
            by_hand,
            Invocation::Run(args(&["docker dso", "--socket", "/x", "status"]))
        );
    }

    #[test]
    fn docker_help_is_dso_help() {
        let got = classify(args(&[PLUGIN, "help", "dso", "proxy"]));
        assert_eq!(got, Invocation::Run(args(&["docker dso", "help", "proxy"])));
        let got = classify(args(&[PLUGIN, "dso", "--help"]));
        assert_eq!(got, Invocation::Run(args(&["docker dso", "--help"])));
    }

    #[test]
    fn global_options_become_environment() {
        let got = classify(args(&[
            PLUGIN,
            "-H",
            "tcp://10.0.0.1:2375",
            "--config",
            "/c",
            "-l",
            "warn",
            "dso",
            "status",
            "-c",
            "x",
        ]));
        assert_eq!(
            got,
            Invocation::Reexec {
                argv: args(&[PLUGIN, "dso", "status", "-c", "x"]),
                env: env(&[
                    ("DOCKER_HOST", Some("tcp://10.0.0.1:2375")),
                    ("DOCKER_CONFIG", Some("/c")),
                    ("RUST_LOG", Some("warn")),
                ]),
            }
        );
        // Every pflag form: --k=v, -kv, -k=v, grouped shorts, booleans with a value.
        let got = classify(args(&[
            PLUGIN,
            "--context=prod",
            "-Dl",
            "error",
            "--tlsverify=false",
            "dso",
            "up",
            "-d",
        ]));
        assert_eq!(
            got,
            Invocation::Reexec {
                argv: args(&[PLUGIN, "dso", "up", "-d"]),
                env: env(&[
                    ("DOCKER_CONTEXT", Some("prod")),
                    ("DOCKER_HOST", None),
                    ("RUST_LOG", Some("debug")),
                    ("DOCKER_TLS_VERIFY", None),
                    ("DOCKER_TLS", Some("1")),
                ]),
            }
        );
        let got = classify(args(&[PLUGIN, "-Hunix:///run/d.sock", "help", "dso", "up"]));
        assert_eq!(
            got,
            Invocation::Reexec {
                argv: args(&[PLUGIN, "help", "dso", "up"]),
                env: env(&[("DOCKER_HOST", Some("unix:///run/d.sock"))]),
            }
        );
        // The re-executed argv classifies as a plain plugin run.
        assert_eq!(
            classify(args(&[PLUGIN, "help", "dso", "up"])),
            Invocation::Run(args(&["docker dso", "help", "up"]))
        );
        let got = classify(args(&[
            PLUGIN,
            "--tls",
            "--tlsverify",
            "--tlscacert",
            "/certs/ca.pem",
            "--tlscert=/certs/cert.pem",
            "--tlskey",
            "/certs/key.pem",
            "-c=ctx",
            "dso",
            "version",
        ]));
        let Invocation::Reexec { env: got, .. } = got else {
            panic!("{got:?}")
        };
        assert_eq!(
            got,
            env(&[
                ("DOCKER_CONTEXT", Some("ctx")),
                ("DOCKER_HOST", None),
                ("DOCKER_TLS", Some("1")),
                ("DOCKER_TLS_VERIFY", Some("1")),
                ("DOCKER_CERT_PATH", Some("/certs")),
            ])
        );
    }

    #[test]
    fn options_dso_cannot_honour_are_errors_that_say_why() {
        let invalid = |a: &[&str]| match classify(args(a)) {
            Invocation::Invalid(e) => e,
            other => panic!("{other:?}"),
        };
        assert!(invalid(&[PLUGIN, "-H", "a", "-H", "b", "dso", "status"]).contains("one -H"));
        assert!(invalid(&[PLUGIN, "-H", "a", "-c", "b", "dso", "status"]).contains("not both"));
        assert!(invalid(&[PLUGIN, "-l", "loud", "dso", "status"]).contains("--log-level"));
        assert!(invalid(&[PLUGIN, "--debug=maybe", "dso", "status"]).contains("true or false"));
        let e = invalid(&[
            PLUGIN,
            "--tlscacert",
            "/a/ca.pem",
            "--tlscert",
            "/b/cert.pem",
            "dso",
            "x",
        ]);
        assert!(e.contains("DOCKER_CERT_PATH") && e.contains("--tlscert"), "{e}");
        assert!(invalid(&[PLUGIN, "--tlskey", "/a/my.key", "dso", "x"]).contains("key.pem"));
        assert!(invalid(&[PLUGIN, "--context"]).contains("needs a value"));
    }

    #[test]
    fn options_that_only_look_like_docker_ones_are_left_alone() {
        // An unknown option before the name: not Docker's; read as dso's own line.
        let got = classify(args(&[PLUGIN, "--socket", "/s", "dso", "status"]));
        assert_eq!(
            got,
            Invocation::Run(args(&["docker dso", "--socket", "/s", "dso", "status"]))
        );
        // After the plugin name, every argument is the command's, even `-H` or `-c`.
        let got = classify(args(&[PLUGIN, "dso", "agent", "-c", "/etc/dso/dso.yaml"]));
        assert_eq!(
            got,
            Invocation::Run(args(&["docker dso", "agent", "-c", "/etc/dso/dso.yaml"]))
        );
    }
}
