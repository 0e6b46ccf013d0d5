//! The `dso-testsrv` binary: parses arguments, maps signals, runs [`dso_testsrv::Server`]
//! or a probe. Exit codes: 0 ok, 1 runtime failure or unhealthy probe, 2 usage error.

use std::process::ExitCode;

use dso_testsrv::config::{self, Command, ServeConfig};
use dso_testsrv::{Server, probe};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match config::parse(&args, |k| std::env::var(k).ok(), dso_testsrv::hostname) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dso-testsrv: {e}\n\n{}", config::USAGE);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", config::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("dso-testsrv {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Probe(p) => {
            let verdict = probe::probe(&p);
            println!("{verdict:?}");
            if verdict.is_healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Cat(path) => cat(&path),
        Command::Serve(c) => match serve(c) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dso-testsrv: {e}");
                ExitCode::from(1)
            }
        },
    }
}

/// `cat PATH`: the file's bytes on stdout (exit 0), or the error on stderr (exit 1).
fn cat(path: &std::path::Path) -> ExitCode {
    use std::io::Write;
    match std::fs::read(path) {
        Ok(bytes) => match std::io::stdout().write_all(&bytes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dso-testsrv: cat: writing stdout: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("dso-testsrv: cat {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

/// Runs the servers on a small runtime until SIGTERM or SIGINT.
fn serve(config: ServeConfig) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = Server::bind(&config).await?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let state = server.state();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                state.reload();
            }
        });
        eprintln!(
            "dso-testsrv {}: echo on {}, http on {}, healthy after {:?}{}",
            config.instance_id,
            server.echo_addr(),
            server
                .http_addr()
                .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            config.healthy_after,
            if config.never_healthy {
                " (never healthy)"
            } else {
                ""
            },
        );
        server
            .run(async {
                tokio::select! {
                    _ = term.recv() => eprintln!("dso-testsrv {}: SIGTERM, exiting", config.instance_id),
                    _ = int.recv() => eprintln!("dso-testsrv {}: SIGINT, exiting", config.instance_id),
                }
            })
            .await;
        Ok::<_, std::io::Error>(())
    })?;
    // Connections still open must not delay exit: a stopped container should stop now.
    rt.shutdown_background();
    Ok(())
}
