//! `dso`: the agent, its control API, and the commands that drive it.
//!
//! Where to start reading: `args.rs` is the command line; `main` dispatches to `agent.rs`
//! (the long-running process), `cmd/` (one module per command group, talking to the agent
//! through `client.rs`), and `config/` (the file format and its checks). `api/` is the
//! control API the agent serves.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or config error (clap's own usage
//! errors also exit 2).

mod agent;
mod api;
mod args;
mod client;
mod cmd;
mod compose;
mod config;
mod delivery;
mod docker;
mod duration;
mod events;
mod logwriter;
mod notify;
mod plugin;
mod reload;
mod sdnotify;
mod secrets;
mod swarm;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    let argv = match plugin::classify(std::env::args_os().collect()) {
        plugin::Invocation::Metadata => {
            println!("{}", plugin::metadata());
            return ExitCode::SUCCESS;
        }
        plugin::Invocation::Run(argv) => argv,
        plugin::Invocation::Reexec { argv, env } => {
            let e = plugin::reexec(&argv, &env);
            eprintln!("error: running dso again with Docker's global options as environment: {e}");
            return ExitCode::from(1);
        }
        plugin::Invocation::Invalid(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let result = match cli.command {
        Command::Agent(a) => agent::main(a, cli.socket),
        Command::Config(c) => cmd::config::run(c, cli.socket),
        Command::Proxy(p) => cmd::proxy::run(p, cmd::socket_path(cli.socket)),
        Command::Debug(d) => cmd::debug::run(d),
        Command::Rotate(r) => cmd::rotate::rotate(r, cmd::socket_path(cli.socket)),
        Command::Status(s) => cmd::rotate::status(s, cmd::socket_path(cli.socket)),
        Command::Init(i) => cmd::init::run(i),
        Command::Secret(s) => cmd::secret::run(s, cmd::socket_path(cli.socket)),
        Command::Setup(s) => cmd::setup::run(s),
        Command::System(s) => cmd::system::run(s),
        Command::Version(v) => cmd::version::run(v),
        Command::Watch(w) => cmd::watch::run(w, cmd::socket_path(cli.socket)),
        Command::Doctor(d) => cmd::doctor::run(d, cli.socket),
        Command::Up(a) => cmd::up::up(a, cli.socket),
        Command::Down(a) => cmd::up::down(a, cli.socket),
        Command::Compose(c) => cmd::up::compose(c, cli.socket),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The error and its causes on one line, like `{:#}`, but without repeating a cause that a
/// message already quotes (some library errors include their source in their own text).
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// 2 for errors the user fixes by changing the command or the file, 1 for the rest.
fn exit_code(e: &anyhow::Error) -> u8 {
    let usage = e.chain().any(|c| {
        c.is::<config::FileError>()
            || c.downcast_ref::<client::ApiFailure>()
                .is_some_and(|f| f.status.is_client_error())
    });
    if usage { 2 } else { 1 }
}
