//! The command line, as clap derive types. Help text is written to teach: each command's
//! long help says what it does to connections and shows examples.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::duration::HumanDuration;

/// Zero-downtime backend swaps for the TCP ports of a Docker host.
#[derive(Debug, Parser)]
#[command(
    name = "dso",
    version,
    about = "Zero-downtime backend swaps for the TCP ports of a Docker host",
    long_about = "dso owns TCP ports on this host and forwards them to backends (containers, \
databases, apps). The backend behind a port can be swapped atomically: new connections go \
to the new backend at once, open ones finish on the old one (drain), and a port can hold new \
connections while its backend restarts (pause/resume).\n\n\
Run `dso agent --config dso.yaml` once per host; every other command talks to that agent \
over its control socket.",
    after_long_help = "Examples:\n  \
dso agent --config examples/echo.yaml --socket /tmp/dso.sock\n  \
dso --socket /tmp/dso.sock proxy status\n  \
dso proxy swap pg 127.0.0.1:5433 --wait\n  \
dso config validate dso.yaml"
)]
pub struct Cli {
    /// Control socket of the agent [default: /run/dso/dso.sock].
    #[arg(long, global = true, env = "DSO_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: own the configured ports and serve the control API.
    #[command(
        long_about = "Run the agent in the foreground: bind every listener of the \
config file's `proxy:` section, forward connections to their backends, and serve the control \
API on a Unix socket (default /run/dso/dso.sock; --socket, DSO_SOCKET or the file's \
`agent.socket` change it).\n\n\
Signals: the first SIGTERM or SIGINT stops accepting, lets open connections finish for up to \
--shutdown-timeout, closes what is left and exits 0. A second one closes every connection at \
once. Logs go to stderr; set RUST_LOG (default `info`) to change the level.",
        after_long_help = "Examples:\n  \
dso agent --config /etc/dso/dso.yaml\n  \
dso agent --config examples/echo.yaml --socket /tmp/dso.sock\n  \
RUST_LOG=debug dso agent --config dso.yaml --shutdown-timeout 2m"
    )]
    Agent(AgentArgs),
    /// Check config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect and steer the proxy of a running agent.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Helpers for trying dso out on a machine with nothing else running.
    #[command(subcommand)]
    Debug(DebugCommand),
    /// Replace a managed container (or signal it) without a failed connection.
    #[command(
        long_about = "Rotate a service managed by an agent started with --docker: rolling \
(blue-green behind the proxy), restart (hold new connections while the container is \
replaced), signal, or none, as the container's dso.update.strategy label says or --strategy \
overrides. --refresh delivers the current values of the service's secrets (--force also \
retries versions whose rotation failed). Prints each step as it happens and the total time; exits 1 when the rotation \
failed (a failure before the swap leaves the old container serving). See docs/rotation.md.",
        after_long_help = "Examples:\n  dso rotate shop/web\n  dso rotate web --env-file ./new.env --strategy rolling\n  printf 'API_KEY=%s\\n' \"$KEY\" | dso rotate web --env-file -\n  dso rotate shop/web --refresh      # read the service's secrets from their providers now\n  dso rotate shop-db-1 --strategy restart --json"
    )]
    Rotate(crate::cmd::rotate::RotateArgs),
    /// Managed services: strategy, ports, container, last rotation.
    Status(crate::cmd::rotate::StatusArgs),
    /// Create the local encrypted vault and its key (works with no agent).
    #[command(
        long_about = "Create the local vault (AES-256-GCM) and a random 256-bit key file, \
both mode 0600, in ~/.dso/ unless --vault-file/--key-file, DSO_VAULT_FILE/DSO_MASTER_KEY_FILE \
or --system (/var/lib/dso/, the agent-mode vault, root only) say otherwise. With --passphrase \
the key is derived from a passphrase with Argon2id instead (read from stdin when it is not a \
terminal, else asked twice without echo). Never overwrites an existing vault or key. See \
docs/secrets.md.",
        after_long_help = "Examples:\n  dso init\n  sudo dso init --system\n  \
dso init --passphrase --vault-file ./vault.enc"
    )]
    Init(crate::cmd::init::InitArgs),
    /// Set, get, list and delete values of the local vault (works with no agent).
    Secret(crate::cmd::secret::SecretArgs),
    /// Create what dso needs on this host: group, config, directories, plugin link, unit.
    #[command(
        long_about = "Create, item by item, what a dso installation needs, and print what was \
done with each (created, updated, unchanged, kept, declined, skipped, conflict).\n\n\
--mode agent (root): group dso, /etc/dso (0775 root:dso), /etc/dso/dso.yaml (0664 root:dso, a \
starter config), /var/lib/dso (0700), /run/dso (0755), the docker-dso plugin link in \
/usr/local/lib/docker/cli-plugins, the launcher /usr/lib/dso/dso-init and the systemd unit \
/etc/systemd/system/dso-agent.service. --mode local (no root): ~/.dso (0700), the plugin link \
in ~/.docker/cli-plugins and ./dso.yaml.\n\n\
Running it again changes nothing that is already right. An existing dso.yaml is never \
rewritten: when it differs from the template, the template is written beside it as \
dso.yaml.new. On a terminal, each privileged change is asked for first; --non-interactive \
never asks. See docs/operations.md.",
        after_long_help = "Examples:\n  sudo dso setup --mode agent\n  sudo dso setup --mode agent --non-interactive --json\n  dso setup --mode local\n  docker dso setup --mode local --non-interactive"
    )]
    Setup(crate::cmd::setup::SetupArgs),
    /// Enable, disable, inspect and read the logs of the systemd service dso-agent.
    #[command(
        subcommand,
        long_about = "Wrappers of systemctl and journalctl for the unit `dso setup --mode agent` \
installs (dso-agent.service). Fails with a clear error where systemd does not run the host.",
        after_long_help = "Examples:\n  sudo dso system enable\n  dso system status\n  dso system logs -f\n  dso system logs --since 1h"
    )]
    System(crate::cmd::system::SystemCommand),
    /// Version, git commit, target, provider features and the Docker endpoint in use.
    #[command(after_long_help = "Examples:\n  dso version\n  docker dso version --json")]
    Version(crate::cmd::version::VersionArgs),
    /// Follow the agent's live events: rotation steps, secret changes, provider health,
    /// Docker events of managed containers.
    #[command(
        long_about = "Print the agent's events as they happen (GET /v1/events, server-sent \
events), one line each: the time (UTC), the kind and its fields. --json prints each event \
as the agent sent it, one JSON object per line. --kinds keeps only some kinds or kind \
prefixes. No event carries a secret value. Exits 0 on Ctrl-C, 1 when the agent stops (no \
automatic reconnect). Every kind and its fields: docs/api.md.",
        after_long_help = "Examples:\n  dso watch\n  dso watch --kinds rotation,provider\n  dso watch --json | jq 'select(.kind == \"rotation.failed\")'"
    )]
    Watch(crate::cmd::watch::WatchArgs),
    /// Check this host's setup: engine, Compose, agent socket, tmpfs, launcher, config,
    /// providers, state directory, clock; each check with what it found and the fix.
    #[command(
        long_about = "Check this host's dso setup and print one line per check: ok, WARN, FAIL or skipped, what was found, and the fix. Checks: the Docker engine and its API version (1.41 or newer), the clock against the engine's, Compose v2 and v1, the agent's socket (mode 0660, group) and the agent answering, the delivery tmpfs (agent.delivery.root), the launcher (agent.delivery.launcher: present, executable, static), the state directory, the config file, and each provider (metadata calls only). The basic level stays on this host (the local vault only); --level full also asks the remote providers. Exits 1 when a check failed (warnings do not fail). See docs/operations.md.",
        after_long_help = "Examples:
  dso doctor
  dso doctor --level full
  dso doctor --config ./dso.yaml --json | jq '.checks[] | select(.status != \"ok\")'"
    )]
    Doctor(crate::cmd::doctor::DoctorArgs),
    /// Start a Compose project whose environment holds dso:// and dsofile:// references.
    #[command(
        long_about = "Run Compose's `up` for a project whose services' `environment:` values \
are references: `dso://REF` (the variable holds the value, set by dso's launcher: never in \
`docker inspect`), `dsofile://REF` (the variable holds the path of a RAM-only file, mode 0400), \
`dso+NAME://REF` / `dsofile+NAME://REF` for provider NAME (default: `local`, else the agent's \
only provider). Each managed service (references, or the label dso.reloader: \"true\") gets \
an override given to Compose on stdin: its ports move to dso.host_ports (the agent's proxy \
owns them, bind IPs kept), the secret directories are bind-mounted, dso.* labels set. No \
value is written to a file on disk or passed in argv.\n\n\
Project options as Compose's: -f FILE (several), -p NAME, --project-directory DIR, \
--env-file FILE, --profile NAME; COMPOSE_FILE, COMPOSE_PROJECT_NAME and .env are honoured. \
dso's own: --compose v1|v2|PATH (default: detect, v2 first), --local (no agent: resolve from \
the local vault, write the files to a tmpfs here), --launcher PATH and --secrets-root DIR \
(local mode). Every other argument goes to Compose's `up` (-d, --build, services...). \
Running it again with unchanged inputs recreates nothing. See docs/compose.md.",
        after_long_help = "Examples:\n  dso up -d\n  docker dso up -d --build web\n  \
dso up -f compose.yaml -f compose.prod.yaml -p shop -d\n  dso up --local -d\n  \
dso up --compose v1 -d",
        disable_help_flag = false
    )]
    Up(crate::cmd::up::ComposeArgs),
    /// Stop a project started with `dso up`; release its ports and wipe its secret files.
    #[command(
        long_about = "Run Compose's `down` for the project (same project options as `dso up`; \
other arguments such as -v go to Compose), then ask the agent to remove the project's \
listeners and wipe its secret directories (`POST /v1/compose/down`), or, in local mode, wipe \
them here.",
        after_long_help = "Examples:\n  dso down\n  dso down -p shop -v\n  dso down --local"
    )]
    Down(crate::cmd::up::ComposeArgs),
    /// `dso compose up|down`: the same as `dso up` / `dso down`.
    #[command(subcommand)]
    Compose(crate::cmd::up::ComposeCommand),
}

/// `dso agent` options.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (YAML).
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// How long the first SIGTERM/SIGINT lets open connections finish [default: the file's
    /// `agent.shutdown_timeout`, else 30s].
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<HumanDuration>,
    /// Manage Docker containers labelled dso.reloader=true (the default): adopt their
    /// ports, follow events, serve `dso rotate` and `dso status`. An engine that does not
    /// answer is retried with backoff while the listeners and the API run. `--docker` is
    /// the explicit form; `DSO_DOCKER=0` turns it off.
    #[arg(
        long,
        env = "DSO_DOCKER",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub docker: Option<bool>,
    /// Do not manage Docker: only the configured listeners and the API (wins over
    /// `--docker` and `DSO_DOCKER`).
    #[arg(long)]
    pub no_docker: bool,
    /// Journal, rotation history and lock files of the Docker side.
    #[arg(
        long,
        env = "DSO_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/dso"
    )]
    pub state_dir: PathBuf,
    /// Manage only containers with this extra label (LABEL=VALUE), e.g. one agent per
    /// test run on a shared engine.
    #[arg(long, value_name = "LABEL=VALUE", hide = true, value_parser = parse_scope)]
    pub docker_scope: Option<(String, String)>,
    /// Do not start an agent: ask the running one (on the control socket of --socket or the
    /// config) for a hitless upgrade to its own binary path (or --binary), wait, and print
    /// the new PID and the time until it accepted; exits 1 when the upgrade failed (the
    /// running agent then serves on). Same as SIGUSR2 or `systemctl reload dso-agent`.
    /// See docs/operations.md.
    #[arg(long)]
    pub upgrade: bool,
    /// With --upgrade: the binary to start instead of the path the agent was started from
    /// (to roll back, give the old binary's path).
    #[arg(long, value_name = "PATH", requires = "upgrade")]
    pub binary: Option<PathBuf>,
    /// With --upgrade: how long the new process has to report ready [default: 30s].
    #[arg(long, value_name = "DURATION", requires = "upgrade")]
    pub ready_timeout: Option<HumanDuration>,
    /// With --upgrade: print the outcome as JSON.
    #[arg(long, requires = "upgrade")]
    pub json: bool,
}

impl AgentArgs {
    /// Whether the agent manages Docker: yes unless `--no-docker` or `DSO_DOCKER=0`.
    pub fn manages_docker(&self) -> bool {
        !self.no_docker && self.docker.unwrap_or(true)
    }
}

/// `dso config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file without binding anything; print its listeners.
    #[command(
        long_about = "Parse and check a config file exactly as `dso agent` would, \
without binding any port or socket. On success prints one line per listener; on error \
prints the key and line at fault and exits with status 2.\n\n\
`${VAR}` and `${VAR:-default}` are expanded from the environment first.",
        after_long_help = "Example:\n  dso config validate examples/echo.yaml"
    )]
    Validate {
        /// The file to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Also connect every provider and ask it for each reference's version (metadata
        /// only, never a value); report ok, missing, forbidden or unreachable per
        /// reference and exit 1 if any failed.
        #[arg(long)]
        check_providers: bool,
    },
    /// Make the running agent read its config file again and apply the difference.
    #[command(
        long_about = "Ask the running agent to read the config file it was started with \
again and apply the difference, as SIGHUP does: new listeners are bound, removed ones stop \
accepting and drain, changed backends are swapped (the old connections drain), changed \
listener settings apply to new connections. Listeners from Docker labels are not touched. \
Keys that cannot change live are listed as needing a restart. An invalid file changes \
nothing: the error names the key and the line, and the command exits with status 2.",
        after_long_help = "Examples:\n  dso config reload\n  dso config reload --json"
    )]
    Reload {
        /// Print the agent's whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `dso proxy ...`.
#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Show every listener: route, connections, bytes, errors, connect latency.
    #[command(
        long_about = "Show every listener of the agent: bind address, mode (forward or \
hold), route generation, backends, connections active / held / still draining from older \
generations, bytes in (client to backend) and out, errors (failed dials plus connections that \
found no backend) and connect latency p50/p99. Every figure is read from the running proxy.",
        after_long_help = "Examples:\n  dso proxy status\n  dso proxy status --json | jq '.listeners[].bind'"
    )]
    Status {
        /// Print the agent's full snapshot as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send new connections of a listener to other backends.
    #[command(
        long_about = "Install ADDR... as the listener's new route (the next generation). \
When the command returns, every new connection goes to the new backends. Connections already \
open keep flowing to the old ones until they close or the drain deadline passes; then the \
proxy closes them, spread over the listener's close_window.\n\n\
With --wait the command returns only once the old generation has drained, and prints how long \
that took and how many connections had to be closed.",
        after_long_help = "Examples:\n  \
dso proxy swap pg 127.0.0.1:5433\n  \
dso proxy swap pg 127.0.0.1:5433 --drain 2m --wait\n  \
dso proxy swap web 172.18.0.5:8080=green-1 172.18.0.6:8080=green-2"
    )]
    Swap {
        /// Listener name (see `dso proxy status`).
        listener: String,
        /// New backends as IP:PORT, optionally IP:PORT=LABEL.
        #[arg(required = true, value_name = "ADDR", value_parser = parse_backend)]
        addrs: Vec<BackendArg>,
        /// How long old connections may keep flowing [default: the listener's drain_timeout].
        #[arg(long, value_name = "DURATION")]
        drain: Option<HumanDuration>,
        /// Return only when the old generation has drained.
        #[arg(long)]
        wait: bool,
    },
    /// Hold new connections of a listener (accept, do not dial) until resume or swap.
    #[command(
        long_about = "Pause a listener: it keeps accepting, but new connections wait in \
the proxy instead of being dialed. `dso proxy resume` or `dso proxy swap` dials them. Clients \
see latency, not an error. Connections already forwarding are not affected.\n\n\
If the pause lasts longer than --max, held connections are closed cleanly and counted, and the \
listener forwards to its previous route again: a forgotten pause never blocks a port forever.",
        after_long_help = "Example (restart a database behind port pg):\n  \
dso proxy pause pg --max 1m\n  systemctl restart postgresql\n  dso proxy resume pg"
    )]
    Pause {
        /// Listener name.
        listener: String,
        /// Longest the hold may last [default: the listener's hold_max].
        #[arg(long, value_name = "DURATION")]
        max: Option<HumanDuration>,
    },
    /// End a pause; held connections are dialed now.
    #[command(
        long_about = "Resume a paused listener. Without ADDR, held and new connections go \
to the route the listener had before the pause. With ADDR..., they go to these new backends \
(a swap: older connections drain as usual).",
        after_long_help = "Examples:\n  dso proxy resume pg\n  dso proxy resume pg 127.0.0.1:5433"
    )]
    Resume {
        /// Listener name.
        listener: String,
        /// New backends as IP:PORT (optional).
        #[arg(value_name = "ADDR", value_parser = parse_backend)]
        addrs: Vec<BackendArg>,
    },
}

/// `dso debug ...`.
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Run a TCP echo server (a backend for trying dso with no other service).
    #[command(
        long_about = "Run a TCP server that echoes every byte back, prefixed by a greeting \
line naming it, so you can see which backend answered. Runs until interrupted.",
        after_long_help = "Example:\n  dso debug echo-server 127.0.0.1:7001 --name blue"
    )]
    EchoServer {
        /// Address to listen on, IP:PORT.
        #[arg(value_parser = parse_addr)]
        addr: SocketAddr,
        /// Name sent in the greeting line [default: the address].
        #[arg(long)]
        name: Option<String>,
    },
}

/// A backend given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendArg {
    /// Address to dial.
    pub addr: SocketAddr,
    /// Optional label.
    pub label: Option<String>,
}

/// Parses `IP:PORT` with an error that says what was expected.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?}; expected IP:PORT, like 127.0.0.1:5432 or [::1]:5432"))
}

/// Parses `IP:PORT` or `IP:PORT=LABEL`.
pub fn parse_backend(s: &str) -> Result<BackendArg, String> {
    let (addr, label) = match s.split_once('=') {
        Some((a, l)) if !l.is_empty() => (a, Some(l.to_owned())),
        _ => (s, None),
    };
    Ok(BackendArg {
        addr: parse_addr(addr)?,
        label,
    })
}

/// `LABEL=VALUE` for `--docker-scope`; anything else is a usage error rather than a scope
/// that silently matches every container.
fn parse_scope(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected LABEL=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn backend_args() {
        let b = parse_backend("127.0.0.1:5432=blue").unwrap();
        assert_eq!(b.label.as_deref(), Some("blue"));
        assert!(
            parse_backend("localhost:5432")
                .unwrap_err()
                .contains("expected IP:PORT")
        );
    }

    /// The agent manages Docker unless told not to; `--no-docker` wins over `--docker`.
    #[test]
    fn the_agent_manages_docker_by_default() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["dso", "agent", "--config", "x.yaml"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Agent(a) => a,
                other => panic!("{other:?}"),
            }
        };
        // The tests run without DSO_DOCKER in the environment (the default is asserted).
        if std::env::var_os("DSO_DOCKER").is_none() {
            assert!(parse(&[]).manages_docker());
        }
        assert!(parse(&["--docker"]).manages_docker());
        assert!(parse(&["--docker=true"]).manages_docker());
        assert!(!parse(&["--docker=false"]).manages_docker());
        assert!(!parse(&["--no-docker"]).manages_docker());
        assert!(!parse(&["--docker", "--no-docker"]).manages_docker());
        assert!(Cli::try_parse_from(["dso", "agent", "--config", "x", "--docker=maybe"]).is_err());
    }

    #[test]
    fn docker_scope_needs_label_and_value() {
        assert_eq!(super::parse_scope("run=42"), Ok(("run".into(), "42".into())));
        assert!(super::parse_scope("run").is_err());
        assert!(super::parse_scope("=42").is_err());
    }
}
