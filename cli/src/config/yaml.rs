//! Bounds on the YAML itself, checked before the file is converted (issue 9, items 9 and 14).
//!
//! - **Aliases.** serde_yaml replays an anchored node at every `*alias`, and the struct it
//!   fills copies the replayed strings: one anchored 1 MB label referenced 2,000 times (a
//!   1.1 MB file) made 2 GB of strings. serde_yaml's own guard counts alias jumps (at most
//!   100 per event), not bytes, so it lets that file through. [`check_expansion`] walks the
//!   document once without allocating and stops as soon as the expanded scalars pass
//!   [`expansion_limit`]; a file without aliases never expands, so it never trips.
//! - **Nesting.** [`check_depth`] refuses flow or block nesting deeper than [`MAX_DEPTH`]
//!   with one linear scan of the text, before the YAML parser (which is slow on very deep
//!   input) sees it.

use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::ConfigError;

/// Most nesting levels (maps, lists, flow brackets) a config may have; dso's deepest key is
/// 5 levels down.
pub const MAX_DEPTH: usize = 64;

/// Largest config file read, in bytes.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// Most bytes of scalar text a document may hold once its aliases are expanded:
/// 4 × the file's size + 1 MiB.
pub fn expansion_limit(file_len: usize) -> usize {
    file_len.saturating_mul(4).saturating_add(1 << 20)
}

/// Refuses a document whose aliases expand past [`expansion_limit`].
pub fn check_expansion(text: &str) -> Result<(), ConfigError> {
    // No `*`, no alias: skip the extra pass (a `*` inside a string only costs the pass).
    if !text.contains('*') {
        return Ok(());
    }
    let limit = expansion_limit(text.len());
    let mut budget = Budget { left: limit, limit };
    let de = serde_yaml::Deserializer::from_str(text);
    match de.deserialize_any(Count(&mut budget)) {
        Ok(()) => Ok(()),
        Err(e) => Err(ConfigError::Parse(e)),
    }
}

/// Refuses nesting deeper than [`MAX_DEPTH`], by indentation levels and by open flow
/// brackets, in one pass. Quoted text and comments are skipped.
pub fn check_depth(text: &str) -> Result<(), ConfigError> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if flow == 0 {
            let mut col = raw.len() - trimmed.len();
            let mut rest = trimmed;
            // `- - - x`: each dash is a level.
            loop {
                while indents.last().is_some_and(|&i| i > col) {
                    indents.pop();
                }
                if indents.last() != Some(&col) {
                    indents.push(col);
                }
                match rest.strip_prefix('-').filter(|a| a.starts_with(' ')) {
                    Some(after) => {
                        let content = after.trim_start();
                        col += 1 + after.len() - content.len();
                        rest = content;
                    }
                    None => break,
                }
            }
        }
        let too_deep = || ConfigError::Invalid {
            key: "(document)".to_owned(),
            line: Some(n + 1),
            message: format!("nested more than {MAX_DEPTH} levels deep; a dso config needs at most 6"),
        };
        if indents.len() > MAX_DEPTH {
            return Err(too_deep());
        }
        let mut quote: Option<u8> = None;
        let bytes = raw.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            match (quote, b) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, b'"' | b'\'') if i == 0 || b" [{,:".contains(&bytes[i - 1]) => quote = Some(b),
                (None, b'#') if i == 0 || bytes[i - 1] == b' ' => break,
                (None, b'[' | b'{') => {
                    flow += 1;
                    if indents.len() + flow > MAX_DEPTH {
                        return Err(too_deep());
                    }
                }
                (None, b']' | b'}') => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

struct Budget {
    left: usize,
    limit: usize,
}

impl Budget {
    fn take<E: de::Error>(&mut self, n: usize) -> Result<(), E> {
        match self.left.checked_sub(n) {
            Some(l) => {
                self.left = l;
                Ok(())
            }
            None => Err(E::custom(format!(
                "the document expands to more than {} bytes through YAML aliases (`*name`); \
                 write the repeated values out or use fewer aliases",
                self.limit
            ))),
        }
    }
}

/// Walks any value, charging its scalars' lengths (and 8 bytes per node) to the budget.
struct Count<'b>(&'b mut Budget);

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.0.take(8)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.0.take(8)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.0.take(8)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.0.take(16)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.0.take(16)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.0.take(8)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.take(v.len().max(8))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.take(8)
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.0.take(8)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.take(8)?;
        while seq.next_element_seed(Count(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.take(8)?;
        while map.next_key_seed(Count(&mut *self.0))?.is_some() {
            map.next_value_seed(Count(&mut *self.0))?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use de::VariantAccess;
        let ((), v) = data.variant_seed(Count(&mut *self.0))?;
        v.newtype_variant_seed(Count(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_documents_pass() {
        check_expansion("a: 1\nb: [x, y]\nc: {d: e}\n").unwrap();
        check_depth("a:\n  b:\n    - c: [1, {d: 2}]\n").unwrap();
    }

    /// Issue 9 item 9: before, the 2,000 aliases of one large anchored label were replayed
    /// into 2,000 copies (the reported file: 13 s and 5.9 GB). Smaller here (64 KiB × 2,000
    /// = 128 MiB expanded from a 70 KiB file), the same shape.
    #[test]
    fn alias_amplification_is_refused() {
        let big = "x".repeat(64 << 10);
        let mut text = format!("anchor: &big {big}\nlist:\n");
        for _ in 0..2000 {
            text.push_str("  - *big\n");
        }
        let e = check_expansion(&text).unwrap_err().to_string();
        assert!(e.contains("expands to more than"), "{e}");
        assert!(e.contains("line"), "{e}");
        // A few small aliases are fine.
        check_expansion("a: &p 127.0.0.1:5432\nb: *p\nc: *p\n").unwrap();
    }

    /// Issue 9 item 14: 100k nesting levels took the parser 42 s.
    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let flow = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let e = check_depth(&flow).unwrap_err().to_string();
        assert!(
            e.contains("nested more than 64 levels") && e.contains("line 1"),
            "{e}"
        );
        let block: String = (0..1000).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        let e = check_depth(&block).unwrap_err().to_string();
        assert!(e.contains("line 65"), "{e}");
        let dashes = format!("{}x\n", "- ".repeat(1000));
        assert!(check_depth(&dashes).is_err());
        // Brackets inside quotes and comments do not count.
        let quoted = format!("a: '{}' # {}\n", "[".repeat(100), "{".repeat(100));
        check_depth(&quoted).unwrap();
    }
}
