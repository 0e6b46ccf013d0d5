//! The Docker CLI plugin protocol: installed as `~/.docker/cli-plugins/docker-dso`, the
//! binary answers `docker-cli-plugin-metadata` and is then run as `docker-dso dso ARGS...`.

use std::ffi::OsString;
use std::path::Path;

/// The argument Docker passes to ask a plugin for its metadata.
pub const METADATA_ARG: &str = "docker-cli-plugin-metadata";

/// What to do with the process arguments.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Print the plugin metadata and exit.
    Metadata,
    /// Parse these arguments as a normal `dso` command line.
    Run(Vec<OsString>),
}

/// Decides from argv whether this is a plugin call, and strips the plugin's name argument
/// that Docker inserts (`docker dso proxy status` runs `docker-dso dso proxy status`).
pub fn classify(mut args: Vec<OsString>) -> Invocation {
    let as_plugin = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "docker-dso");
    if args.get(1).is_some_and(|a| a == METADATA_ARG) {
        return Invocation::Metadata;
    }
    if as_plugin && args.get(1).is_some_and(|a| a == "dso") {
        args.remove(1);
    }
    if as_plugin && let Some(first) = args.first_mut() {
        // Help and errors then read `dso ...`, the way users type it after `docker`.
        *first = OsString::from("docker dso");
    }
    Invocation::Run(args)
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

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn metadata_is_answered_under_any_name() {
        assert_eq!(classify(args(&["dso", METADATA_ARG])), Invocation::Metadata);
        assert_eq!(
            classify(args(&["/x/docker-dso", METADATA_ARG])),
            Invocation::Metadata
        );
        let v: serde_json::Value = serde_json::from_str(&metadata()).unwrap();
        assert_eq!(v["SchemaVersion"], "0.1.0");
    }

    #[test]
    fn plugin_name_argument_is_dropped() {
        let got = classify(args(&[
            "/home/u/.docker/cli-plugins/docker-dso",
            "dso",
            "proxy",
            "status",
        ]));
        assert_eq!(got, Invocation::Run(args(&["docker dso", "proxy", "status"])));
        let plain = classify(args(&["dso", "dso"]));
        assert_eq!(plain, Invocation::Run(args(&["dso", "dso"])));
    }
}
