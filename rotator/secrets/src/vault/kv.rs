//! KV v2 answers: the metadata and data envelopes, and what makes a version unusable.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::provider::Version;
use crate::reference::Reference;
use crate::value::SecretValue;

/// The envelope every Vault answer comes in; only `data` matters here.
#[derive(Deserialize)]
struct Envelope<T> {
    data: Option<T>,
}

/// `GET MOUNT/metadata/PATH`'s `data`.
#[derive(Deserialize)]
struct Metadata {
    current_version: u64,
    #[serde(default)]
    versions: HashMap<String, VersionMetadata>,
}

/// One version's metadata (in the metadata answer, and beside a data read).
#[derive(Deserialize)]
struct VersionMetadata {
    #[serde(default)]
    deletion_time: String,
    #[serde(default)]
    destroyed: bool,
}

/// `GET MOUNT/data/PATH?version=N`'s `data`, borrowed from the body: the secret's JSON is
/// copied once, into a [`SecretValue`].
#[derive(Deserialize)]
struct Data<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    metadata: DataMetadata,
}

#[derive(Deserialize)]
struct DataMetadata {
    version: u64,
    #[serde(flatten)]
    state: VersionMetadata,
}

/// `sys/health`'s answer (any status code carries it).
#[derive(Deserialize)]
pub(super) struct Health {
    #[serde(default = "yes")]
    pub(super) initialized: bool,
    #[serde(default)]
    pub(super) sealed: bool,
    #[serde(default)]
    pub(super) version: String,
}

fn yes() -> bool {
    true
}

/// The reference's KV v2 mount (every parsed vault reference has one).
pub(super) fn mount<'r>(provider: &str, reference: &'r Reference) -> Result<&'r str> {
    reference.mount.as_deref().ok_or_else(|| {
        bad_reference(
            provider,
            reference,
            "no KV v2 mount; expected MOUNT/data/PATH#FIELD".to_string(),
        )
    })
}

pub(super) fn bad_reference(provider: &str, reference: &Reference, reason: String) -> Error {
    Error::InvalidReference {
        provider: provider.to_string(),
        reference: reference.raw.clone(),
        reason,
    }
}

fn protocol(provider: &str, detail: String) -> Error {
    Error::Protocol {
        provider: provider.to_string(),
        detail,
    }
}

/// The change token from a metadata answer: `current_version`, unless that version is
/// deleted or destroyed.
pub(super) fn current_version(provider: &str, reference: &Reference, body: &[u8]) -> Result<Version> {
    let envelope: Envelope<Metadata> = serde_json::from_slice(body)
        .map_err(|e| protocol(provider, format!("KV v2 metadata of {:?}: {e}", reference.raw)))?;
    let metadata = envelope.data.ok_or_else(|| {
        protocol(
            provider,
            format!("KV v2 metadata of {:?} has no data", reference.raw),
        )
    })?;
    if metadata.current_version == 0 {
        // Metadata without any version (written with `kv metadata put` only).
        return Err(Error::NotFound {
            provider: provider.to_string(),
            reference: reference.raw.clone(),
        });
    }
    let number = metadata.current_version;
    if let Some(state) = metadata.versions.get(&number.to_string())
        && let Some(reason) = unusable_reason(number, state)
    {
        return Err(unusable(provider, reference, reason));
    }
    Ok(Version::new(number.to_string()))
}

/// The value from a data read of version `number`: `None` when the body is not a KV v2
/// data envelope (the caller maps the status), `Some(Err(Unusable))` for a deleted or
/// destroyed version.
pub(super) fn version_data(
    provider: &str,
    reference: &Reference,
    number: u64,
    body: &[u8],
) -> Option<Result<SecretValue>> {
    let envelope: Envelope<Data<'_>> = serde_json::from_slice(body).ok()?;
    let data = envelope.data?;
    if data.metadata.version != number {
        return Some(Err(protocol(
            provider,
            format!(
                "asked {:?} for version {number}, got version {}",
                reference.raw, data.metadata.version
            ),
        )));
    }
    if let Some(reason) = unusable_reason(number, &data.metadata.state) {
        return Some(Err(unusable(provider, reference, reason)));
    }
    match data.data {
        Some(raw) if raw.get().trim_start().starts_with('{') => {
            Some(Ok(SecretValue::from_slice(raw.get().as_bytes())))
        }
        _ => Some(Err(unusable(
            provider,
            reference,
            format!("version {number} has no data"),
        ))),
    }
}

fn unusable(provider: &str, reference: &Reference, reason: String) -> Error {
    Error::Unusable {
        provider: provider.to_string(),
        reference: reference.raw.clone(),
        reason,
    }
}

/// Why version `number` cannot be read, if it cannot. A `deletion_time` in the future is a
/// scheduled deletion (`delete_version_after`): the version is still readable.
fn unusable_reason(number: u64, state: &VersionMetadata) -> Option<String> {
    if state.destroyed {
        return Some(format!("version {number} is destroyed"));
    }
    if state.deletion_time.is_empty() {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    match rfc3339_seconds(&state.deletion_time) {
        Some(at) if at > now => None,
        _ => Some(format!("version {number} was deleted at {}", state.deletion_time)),
    }
}

/// Seconds since the Unix epoch of an RFC 3339 time like `2018-03-22T02:36:43.98Z` or
/// `...+02:00` (fractions ignored). `None` when it does not parse.
pub(super) fn rfc3339_seconds(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        rest = frac.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        tz if tz.len() == 6 => {
            let sign = match &tz[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            sign * (tz[1..3].parse::<i64>().ok()? * 3600 + tz[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_seconds("2018-03-22T02:36:43.986212308Z"),
            Some(1_521_686_203)
        );
        assert_eq!(rfc3339_seconds("2018-03-22T04:36:43+02:00"), Some(1_521_686_203));
        assert_eq!(rfc3339_seconds(""), None);
        assert_eq!(rfc3339_seconds("yesterday"), None);
    }

    #[test]
    fn deletion_in_the_future_is_still_usable() {
        let later = VersionMetadata {
            deletion_time: "2999-01-01T00:00:00Z".to_string(),
            destroyed: false,
        };
        assert_eq!(unusable_reason(3, &later), None);
        let past = VersionMetadata {
            deletion_time: "2020-01-01T00:00:00Z".to_string(),
            destroyed: false,
        };
        assert!(unusable_reason(3, &past).unwrap().contains("deleted at 2020"));
        let destroyed = VersionMetadata {
            deletion_time: String::new(),
            destroyed: true,
        };
        assert!(unusable_reason(3, &destroyed).unwrap().contains("destroyed"));
    }
}
