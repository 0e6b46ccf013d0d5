//! Secrets a container declares itself, in its label `dso.refs`: what `dso up` writes for a
//! Compose service whose `environment:` holds `dso://` and `dsofile://` references.
//!
//! The label is compact JSON naming variables, providers and references (never a value):
//!
//! ```json
//! {"env":[{"var":"API_KEY","provider":"local","ref":"shop/api_key"}],
//!  "files":[{"var":"DB_PASSWORD_FILE","provider":"local","ref":"shop/db#password"}]}
//! ```
//!
//! Each entry becomes one [`SecretSpec`] named `compose:VAR` with one mapping keyed `VAR`:
//! an `env` entry is injected through the launcher (the variable holds the value), a
//! `files` entry as the file `/run/secrets/VAR` (mode 0400, the container's user; the
//! variable itself holds that path, which `dso up` sets). From there delivery treats them
//! exactly like configured secrets: same store, same watcher, same rotations.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dso_secrets::config::{EnvMode, InjectSpec, RotationSpec, SecretSpec, Targets};
use dso_secrets::{ProviderKind, Reference};
use serde::{Deserialize, Serialize};

/// The label holding a container's declared references.
pub const LABEL_REFS: &str = "dso.refs";

/// Prefix of the names of declared secrets (`compose:VAR`).
pub const DECLARED_PREFIX: &str = "compose:";

/// Directory inside the container of declared files.
pub const DECLARED_FILE_DIR: &str = InjectSpec::DEFAULT_PATH;

/// The content of the `dso.refs` label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declared {
    /// Variables whose value is the secret (`dso://REF`), set by the launcher.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<DeclaredRef>,
    /// Variables whose value is the path of a RAM-only file holding the secret
    /// (`dsofile://REF`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<DeclaredRef>,
}

/// One declared reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredRef {
    /// The environment variable (also the file name of a `files` entry).
    pub var: String,
    /// Provider instance name (a key of the config's `providers:`).
    pub provider: String,
    /// The reference, in that provider's syntax.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// Why a `dso.refs` label cannot be used; names the variable, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclaredError {
    /// Not the JSON above.
    #[error("label dso.refs is not valid: {0}")]
    Syntax(String),
    /// A variable name that is not `[A-Za-z_][A-Za-z0-9_]*`, or one declared twice.
    #[error("label dso.refs: variable {var:?} {reason}")]
    Var {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A provider the config does not define.
    #[error(
        "label dso.refs: variable {var} names provider {provider:?}, which the agent's config does not define; add it under providers:"
    )]
    UnknownProvider {
        /// The variable.
        var: String,
        /// The provider named.
        provider: String,
    },
    /// A reference its provider's syntax refuses.
    #[error("label dso.refs: variable {var}: {reason}")]
    Reference {
        /// The variable.
        var: String,
        /// The provider's reason (names the reference).
        reason: String,
    },
}

impl Declared {
    /// Parses a label value.
    pub fn parse(label: &str) -> Result<Declared, DeclaredError> {
        let d: Declared = serde_json::from_str(label).map_err(|e| DeclaredError::Syntax(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for r in d.env.iter().chain(&d.files) {
            if !valid_var(&r.var) {
                return Err(DeclaredError::Var {
                    var: r.var.clone(),
                    reason: "is not a variable name (letters, digits and _, not starting with a digit)",
                });
            }
            if !seen.insert(r.var.as_str()) {
                return Err(DeclaredError::Var {
                    var: r.var.clone(),
                    reason: "is declared twice",
                });
            }
        }
        Ok(d)
    }

    /// The label value: compact JSON, entries in the order given (callers sort them for
    /// a stable label).
    pub fn to_label(&self) -> String {
        serde_json::to_string(self).expect("declared references serialize")
    }

    /// Whether nothing is declared.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.files.is_empty()
    }

    /// The secrets these declarations make, one per entry (`compose:VAR`), references
    /// parsed with the kind of their provider (`kinds`: provider name → kind).
    pub fn specs(&self, kinds: &BTreeMap<String, ProviderKind>) -> Result<Vec<SecretSpec>, DeclaredError> {
        let mut out = Vec::new();
        for (r, inject) in self
            .env
            .iter()
            .map(|r| {
                (
                    r,
                    InjectSpec::Env {
                        env_mode: EnvMode::Launcher,
                    },
                )
            })
            .chain(self.files.iter().map(|r| {
                (
                    r,
                    InjectSpec::File {
                        path: PathBuf::from(DECLARED_FILE_DIR),
                        mode: InjectSpec::DEFAULT_MODE,
                        uid: None,
                        gid: None,
                        env_pointers: false,
                    },
                )
            }))
        {
            let Some(kind) = kinds.get(&r.provider) else {
                return Err(DeclaredError::UnknownProvider {
                    var: r.var.clone(),
                    provider: r.provider.clone(),
                });
            };
            let reference =
                Reference::parse(*kind, &r.provider, &r.reference).map_err(|e| DeclaredError::Reference {
                    var: r.var.clone(),
                    reason: e.to_string(),
                })?;
            out.push(SecretSpec {
                name: declared_name(&r.var),
                provider: r.provider.clone(),
                mappings: vec![(r.var.clone(), reference)],
                targets: Targets::default(),
                inject,
                rotation: RotationSpec::default(),
            });
        }
        Ok(out)
    }
}

/// The secret name of a declared variable.
pub fn declared_name(var: &str) -> String {
    format!("{DECLARED_PREFIX}{var}")
}

/// The path, inside the container, of a declared file.
pub fn declared_file_path(var: &str) -> String {
    format!("{DECLARED_FILE_DIR}/{var}")
}

fn valid_var(v: &str) -> bool {
    let mut chars = v.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> BTreeMap<String, ProviderKind> {
        BTreeMap::from([
            ("local".to_string(), ProviderKind::Local),
            ("aws".to_string(), ProviderKind::Aws),
        ])
    }

    #[test]
    fn label_round_trips_and_makes_one_spec_per_variable() {
        let d = Declared {
            env: vec![DeclaredRef {
                var: "API_KEY".into(),
                provider: "local".into(),
                reference: "shop/api_key".into(),
            }],
            files: vec![DeclaredRef {
                var: "DB_PASSWORD_FILE".into(),
                provider: "aws".into(),
                reference: "prod/db#password".into(),
            }],
        };
        let label = d.to_label();
        assert_eq!(Declared::parse(&label).unwrap(), d);
        let specs = d.specs(&kinds()).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "compose:API_KEY");
        assert!(matches!(
            specs[0].inject,
            InjectSpec::Env {
                env_mode: EnvMode::Launcher
            }
        ));
        assert_eq!(specs[1].mappings[0].0, "DB_PASSWORD_FILE");
        assert_eq!(specs[1].mappings[0].1.field.as_deref(), Some("password"));
        assert!(
            matches!(&specs[1].inject, InjectSpec::File { path, .. } if path == &PathBuf::from("/run/secrets"))
        );
        assert_eq!(
            declared_file_path("DB_PASSWORD_FILE"),
            "/run/secrets/DB_PASSWORD_FILE"
        );
    }

    #[test]
    fn bad_labels_name_the_variable_or_provider() {
        assert!(matches!(Declared::parse("{"), Err(DeclaredError::Syntax(_))));
        assert!(matches!(
            Declared::parse(r#"{"env":[{"var":"1X","provider":"local","ref":"a"}]}"#),
            Err(DeclaredError::Var { .. })
        ));
        let twice = r#"{"env":[{"var":"X","provider":"local","ref":"a"}],"files":[{"var":"X","provider":"local","ref":"b"}]}"#;
        assert!(
            Declared::parse(twice)
                .unwrap_err()
                .to_string()
                .contains("declared twice")
        );
        let unknown = Declared::parse(r#"{"env":[{"var":"X","provider":"vault9","ref":"a"}]}"#).unwrap();
        let e = unknown.specs(&kinds()).unwrap_err().to_string();
        assert!(e.contains("vault9") && e.contains("providers:"), "{e}");
        let bad_ref = Declared::parse(r#"{"env":[{"var":"X","provider":"aws","ref":"has space"}]}"#).unwrap();
        assert!(matches!(
            bad_ref.specs(&kinds()),
            Err(DeclaredError::Reference { .. })
        ));
    }
}
