//! `${VAR}` and `${VAR:-default}` expansion of the config text before it is parsed.
//! `$${` writes a literal `${`. A `$` not followed by `{` is left alone.
//!
//! Expansion runs on the raw text so that values can be spliced anywhere, and it never adds
//! a line unless a value contains one, so parse errors keep pointing at the right line.

use super::ConfigError;

/// Expands every `${...}` in `src` with values from `lookup`.
pub fn expand(src: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let line = line_of(src, src.len() - rest.len() + pos);
        let end = body.find('}').ok_or(ConfigError::Env {
            line,
            message: "unclosed `${`; write `$${` for a literal `${`".to_owned(),
        })?;
        let expr = &body[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ConfigError::Env {
                line,
                message: format!("invalid variable name {name:?} in `${{{expr}}}`"),
            });
        }
        let value = match (lookup(name), default) {
            (Some(v), _) if !v.is_empty() || default.is_none() => v,
            (_, Some(d)) => d.to_owned(),
            (None, None) => {
                return Err(ConfigError::Env {
                    line,
                    message: format!(
                        "environment variable {name} is not set (give a default with ${{{name}:-VALUE}})"
                    ),
                });
            }
            (Some(v), None) => v,
        };
        out.push_str(&value);
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// 1-based line of byte offset `at`.
fn line_of(src: &str, at: usize) -> usize {
    src[..at.min(src.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("5432".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_and_default() {
        let out = expand("a: ${PORT}\nb: ${NOPE:-7}\nc: ${EMPTY:-x}\n", env).unwrap();
        assert_eq!(out, "a: 5432\nb: 7\nc: x\n");
    }

    #[test]
    fn leaves_plain_dollars_and_escapes() {
        let out = expand("a: $HOME $$ $${PORT} ${PORT}", env).unwrap();
        assert_eq!(out, "a: $HOME $$ ${PORT} 5432");
    }

    #[test]
    fn unset_without_default_names_variable_and_line() {
        let err = expand("a: 1\nb: ${MISSING}\n", env).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("MISSING is not set"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn unclosed_and_bad_names_are_errors() {
        let err = expand("a: ${PORT", env).unwrap_err().to_string();
        assert!(err.contains("unclosed"), "{err}");
        let err = expand("a: ${P-1}", env).unwrap_err().to_string();
        assert!(err.contains("invalid variable name \"P-1\""), "{err}");
    }
}
