//! `dso config validate`.

use crate::args::ConfigCommand;
use crate::config;
use crate::duration::format;

/// Runs a `dso config` command.
pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Validate { file } => {
            let cfg = config::load(&file)?;
            println!("{}: ok, {} listener(s)", file.display(), cfg.listeners.len());
            for l in &cfg.listeners {
                let backends = if l.backends.is_empty() {
                    "(no backend)".to_owned()
                } else {
                    l.backends
                        .iter()
                        .map(|b| match &b.label {
                            Some(label) => format!("{} ({label})", b.addr),
                            None => b.addr.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "  {}  {} -> {}  drain {}, hold max {}",
                    l.name,
                    l.listen,
                    backends,
                    format(l.drain_timeout),
                    format(l.hold_max)
                );
            }
            Ok(())
        }
    }
}
