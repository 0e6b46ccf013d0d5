//! Human durations (`500ms`, `30s`, `2m`, `1h`, `1m30s`) as written in config files, on the
//! command line and in control API bodies, and their display.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// What every duration error says it expected.
pub const EXPECTED: &str = "a duration like 500ms, 30s, 2m or 1h";

/// The longest duration dso reads anywhere (config keys, command-line flags, API bodies):
/// 365 days. [`parse`] refuses longer ones, so a deadline computed as `now + d` never
/// overflows an `Instant` or a timer (issue 9, item 11: `18446744073709551615s` used to
/// pass and panic later).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// A [`Duration`] read from and written as a human string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h`, `1d` or a concatenation such as `1m30s`, at most
/// [`MAX_DURATION`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("empty duration; expected {EXPECTED}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration {text:?}; expected {EXPECTED}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {text:?} is longer than the longest allowed, 365d"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "" => {
                return Err(format!("duration {text:?} has no unit; expected {EXPECTED}"));
            }
            other => {
                return Err(format!(
                    "unknown unit {other:?} in duration {text:?}; expected {EXPECTED}"
                ));
            }
        };
        total = total.saturating_add(part);
        if total > MAX_DURATION {
            return Err(format!(
                "duration {text:?} is longer than the longest allowed, 365d"
            ));
        }
    }
    Ok(total)
}

/// Formats a duration the way [`parse`] reads it, in its largest exact unit.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    match s {
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Formats milliseconds for people: `840ms`, `2.4s`, `3m05s`.
pub fn format_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// Formats microseconds for people: `85µs`, `1.2ms`, `2.4s`.
pub fn format_us(us: u64) -> String {
    match us {
        0..1000 => format!("{us}µs"),
        1000..1_000_000 => format!("{:.1}ms", us as f64 / 1000.0),
        _ => format!("{:.1}s", us as f64 / 1_000_000.0),
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse(s).map(HumanDuration)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse(v).map(HumanDuration).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "duration {v} has no unit; expected {EXPECTED}"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "duration {v} has no unit; expected {EXPECTED}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("30x").unwrap_err().contains("unknown unit \"x\""));
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("s").unwrap_err().contains("invalid duration"));
        assert!(parse("-1s").unwrap_err().contains("invalid duration"));
    }

    /// Issue 9 item 11: these parsed (saturating) and panicked later in timer arithmetic.
    #[test]
    fn refuses_durations_past_the_maximum() {
        assert_eq!(parse("365d"), Ok(MAX_DURATION));
        assert_eq!(parse("8760h"), Ok(MAX_DURATION));
        for t in [
            "366d",
            "365d1ms",
            "18446744073709551615s",
            "99999999999999999999999d",
            "9000h",
        ] {
            let e = parse(t).unwrap_err();
            assert!(e.contains("longest allowed, 365d"), "{t}: {e}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["500ms", "30s", "2m", "1h", "0s", "90s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
        assert_eq!(format_ms(840), "840ms");
        assert_eq!(format_ms(2400), "2.4s");
        assert_eq!(format_ms(10_000), "10s");
        assert_eq!(format_ms(185_000), "3m05s");
        assert_eq!(format_us(85), "85µs");
        assert_eq!(format_us(1200), "1.2ms");
    }
}
