//! The plugin's pin: before every start, the executable's SHA-256 must equal the pin from
//! `providers.NAME.sha256` or from its entry in `dso-plugins-sha256.json`.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::spec::PluginSettings;

/// Resolves the command to a file: a path with a `/` as given, a bare name through `PATH`.
pub(crate) fn resolve(provider: &str, command: &Path, path_env: Option<&str>) -> Result<PathBuf> {
    let cfg = |detail: String| Error::Config {
        provider: provider.to_string(),
        detail,
    };
    if command.as_os_str().is_empty() {
        return Err(cfg("providers.NAME.command is empty".to_string()));
    }
    let candidates: Vec<PathBuf> = if command.components().count() > 1 || command.is_absolute() {
        vec![command.to_path_buf()]
    } else {
        path_env
            .unwrap_or("/usr/local/bin:/usr/bin:/bin")
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(command))
            .collect()
    };
    for c in &candidates {
        if c.is_file() {
            return c
                .canonicalize()
                .map_err(|e| cfg(format!("plugin {}: {e}", c.display())));
        }
    }
    Err(cfg(format!(
        "plugin executable {} not found{}",
        command.display(),
        if candidates.len() > 1 { " in PATH" } else { "" }
    )))
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks `exe` (the resolved command) against its pin; the error names both hashes.
pub(crate) fn verify(provider: &str, settings: &PluginSettings, exe: &Path) -> Result<()> {
    let cfg = |detail: String| Error::Config {
        provider: provider.to_string(),
        detail,
    };
    let (pin, from) = match &settings.sha256 {
        Some(p) => (Some(p.clone()), format!("providers.{provider}.sha256")),
        None => match &settings.pins_file {
            Some(file) => (
                lookup(provider, file, &settings.command, exe)?,
                file.display().to_string(),
            ),
            None => (None, String::new()),
        },
    };
    let Some(pin) = pin else {
        return Err(cfg(format!(
            "plugin {} is not pinned, so it is not run: compute its hash with `sha256sum {}` and set providers.{provider}.sha256 (or add \"{}\": \"HASH\" to dso-plugins-sha256.json and set pins_file)",
            exe.display(),
            exe.display(),
            exe.display()
        )));
    };
    let pin = normalize(&pin);
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(cfg(format!(
            "the pin for plugin {} in {from} is not a SHA-256 (64 hex digits, as `sha256sum` prints)",
            exe.display()
        )));
    }
    let actual = sha256_file(exe).map_err(|e| cfg(format!("plugin {}: {e}", exe.display())))?;
    if actual != pin {
        return Err(cfg(format!(
            "plugin {} has sha256 {actual} but the pin in {from} is {pin}; it is not run. If you trust this file, pin it again (`sha256sum {}`)",
            exe.display(),
            exe.display()
        )));
    }
    Ok(())
}

/// The pin for the plugin in a `dso-plugins-sha256.json` file: a JSON object from the
/// command as written, the resolved path, or the file name, to the hex SHA-256.
fn lookup(provider: &str, file: &Path, command: &Path, exe: &Path) -> Result<Option<String>> {
    let cfg = |detail: String| Error::Config {
        provider: provider.to_string(),
        detail,
    };
    let text = std::fs::read_to_string(file).map_err(|e| cfg(format!("pin file {}: {e}", file.display())))?;
    let pins: HashMap<String, String> = serde_json::from_str(&text).map_err(|e| {
        cfg(format!(
            "pin file {} is not a JSON object of \"path or name\": \"sha256 hex\" ({e})",
            file.display()
        ))
    })?;
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
    let keys = [
        Some(command.to_string_lossy().into_owned()),
        Some(exe.to_string_lossy().into_owned()),
        name,
    ];
    Ok(keys.into_iter().flatten().find_map(|k| pins.get(&k).cloned()))
}

/// `sha256:ABC` and `ABC  file` (as `sha256sum` prints) both give `abc`.
fn normalize(pin: &str) -> String {
    let pin = pin.trim();
    let pin = pin.strip_prefix("sha256:").unwrap_or(pin);
    pin.split_whitespace().next().unwrap_or("").to_ascii_lowercase()
}
