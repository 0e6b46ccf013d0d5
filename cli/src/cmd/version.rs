//! `dso version`: what this binary is (version, commit, target, provider features) and the
//! Docker endpoint settings it sees (which is how `docker --context X dso version` shows
//! that Docker's global options arrived).

use clap::Args;
use serde::Serialize;

/// `dso version` options.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// The facts `dso version` prints.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Version {
    /// The package version.
    pub version: &'static str,
    /// The git commit it was built from, when known at build time.
    pub commit: Option<&'static str>,
    /// The target triple it was built for.
    pub target: &'static str,
    /// The secret providers compiled in.
    pub providers: Vec<&'static str>,
    /// Whether it runs as the Docker CLI plugin (`docker dso`).
    pub plugin: bool,
    /// The Docker endpoint variables set for this process (`DOCKER_HOST`...).
    pub docker: std::collections::BTreeMap<&'static str, String>,
}

impl Version {
    /// The facts of this binary and process.
    pub fn current() -> Version {
        let mut providers = vec!["local", "plugin"];
        if cfg!(feature = "vault") {
            providers.push("vault");
        }
        if cfg!(feature = "aws") {
            providers.push("aws");
        }
        if cfg!(feature = "azure") {
            providers.push("azure");
        }
        Version {
            version: env!("CARGO_PKG_VERSION"),
            commit: option_env!("DSO_GIT_COMMIT"),
            target: env!("DSO_BUILD_TARGET"),
            providers,
            plugin: crate::plugin::as_plugin(),
            docker: crate::plugin::docker_env().into_iter().collect(),
        }
    }

    /// The lines printed without `--json`.
    pub fn text(&self) -> String {
        let mut out = format!("dso {}\n", self.version);
        out += &format!(
            "commit:    {}\n",
            self.commit.unwrap_or("unknown (not built from git)")
        );
        out += &format!("target:    {}\n", self.target);
        out += &format!("providers: {}\n", self.providers.join(", "));
        if self.plugin {
            out += "plugin:    running as `docker dso`\n";
        }
        if self.docker.is_empty() {
            out += "docker:    default engine (no DOCKER_HOST or DOCKER_CONTEXT set)\n";
        }
        for (k, v) in &self.docker {
            out += &format!("docker:    {k}={v}\n");
        }
        out
    }
}

/// Runs `dso version`.
pub fn run(args: VersionArgs) -> anyhow::Result<()> {
    let v = Version::current();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", v.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_every_fact() {
        let v = Version {
            version: "1.2.3",
            commit: Some("abcdef123456"),
            target: "x86_64-unknown-linux-gnu",
            providers: vec!["local", "plugin", "aws"],
            plugin: true,
            docker: [("DOCKER_HOST", "tcp://10.0.0.1:2375".to_owned())]
                .into_iter()
                .collect(),
        };
        assert_eq!(
            v.text(),
            "dso 1.2.3\ncommit:    abcdef123456\ntarget:    x86_64-unknown-linux-gnu\n\
             providers: local, plugin, aws\nplugin:    running as `docker dso`\n\
             docker:    DOCKER_HOST=tcp://10.0.0.1:2375\n"
        );
    }

    #[test]
    fn the_build_facts_are_filled_in() {
        let v = Version::current();
        assert_eq!(v.version, env!("CARGO_PKG_VERSION"));
        assert!(v.target.contains("linux"), "{}", v.target);
        assert_eq!(v.providers.contains(&"aws"), cfg!(feature = "aws"));
    }
}
