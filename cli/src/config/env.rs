//! `${VAR}` and `${VAR:-default}` expansion of the config text before it is parsed.
//! `$${` writes a literal `${`. A `$` not followed by `{` is left alone.
//!
//! Expansion runs on the raw text so that values can be spliced anywhere, and it never adds
//! a line unless a value contains one, so parse errors keep pointing at the right line.

use super::ConfigError;

/// The expanded text and every value that was spliced in (variable name, value), so that
/// error messages can show `${NAME}` instead of the value.
pub struct Expanded {
    /// The text with every `${...}` replaced.
    pub text: String,
    /// `(name, value)` of every variable whose value was used.
    pub used: Vec<(String, String)>,
}

/// Expands every `${...}` in `src` with values from `lookup`.
///
/// One pass, linear in the text: the line of an error is found by a binary search in the
/// line starts, not by rescanning. A default may itself hold `${...}` (`${A:-${B}}`); it is
/// parsed always and evaluated only when used, so an unset variable in an unused default
/// is not an error (as in the shell).
pub fn expand(src: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Expanded, ConfigError> {
    let mut ex = Expander {
        src,
        pos: 0,
        line_starts: std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        lookup: &lookup,
        used: Vec::new(),
    };
    let text = ex.run(false, true)?;
    Ok(Expanded { text, used: ex.used })
}

/// Prints the variable names only: the values may be credentials.
impl std::fmt::Debug for Expanded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expanded")
            .field("len", &self.text.len())
            .field("used", &self.used.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .finish()
    }
}

struct Expander<'a, F> {
    src: &'a str,
    pos: usize,
    line_starts: Vec<usize>,
    lookup: &'a F,
    used: Vec<(String, String)>,
}

impl<F: Fn(&str) -> Option<String>> Expander<'_, F> {
    fn line(&self, at: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= at)
    }

    fn error(&self, at: usize, message: String) -> ConfigError {
        ConfigError::Env {
            line: self.line(at),
            message,
        }
    }

    /// Expands until the end (top level) or until the `}` that closes a default
    /// (`in_default`), which is consumed. `needed`: whether the result is used.
    fn run(&mut self, in_default: bool, needed: bool) -> Result<String, ConfigError> {
        let mut out = String::new();
        loop {
            let rest = &self.src[self.pos..];
            let stop = if in_default {
                rest.find(['$', '}'])
            } else {
                rest.find('$')
            };
            let Some(i) = stop else {
                if in_default {
                    return Err(self.error(
                        self.pos,
                        "unclosed `${`; write `$${` for a literal `${`".to_owned(),
                    ));
                }
                out.push_str(rest);
                self.pos = self.src.len();
                return Ok(out);
            };
            out.push_str(&rest[..i]);
            let at = self.pos + i;
            let after = &self.src[at + 1..];
            if rest.as_bytes()[i] == b'}' {
                self.pos = at + 1;
                return Ok(out);
            }
            if after.starts_with("${") {
                out.push_str("${");
                self.pos = at + 3;
            } else if after.starts_with('{') {
                self.pos = at + 2;
                let v = self.variable(at, needed)?;
                out.push_str(&v);
            } else {
                out.push('$');
                self.pos = at + 1;
            }
        }
    }

    /// After `${` at `start`: the name, an optional `:-default`, and the closing `}`.
    fn variable(&mut self, start: usize, needed: bool) -> Result<String, ConfigError> {
        let rest = &self.src[self.pos..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        let after = &rest[end..];
        let unclosed = || "unclosed `${`; write `$${` for a literal `${`".to_owned();
        if after.starts_with('}') {
            self.pos += end + 1;
        } else if after.starts_with(":-") {
            self.pos += end + 2;
            let value = self.variable_value(name, needed);
            let use_default = needed && value.as_deref().is_none_or(str::is_empty);
            let d = self.run(true, use_default)?;
            if name.is_empty() {
                return Err(self.bad_name(start, name));
            }
            return Ok(match value {
                Some(v) if !v.is_empty() => self.record(name, v),
                _ => d,
            });
        } else if after.is_empty() || !after.contains('}') {
            return Err(self.error(start, unclosed()));
        } else {
            let close = after.find('}').unwrap_or(after.len());
            let bad = format!("{name}{}", &after[..close]);
            return Err(self.bad_name(start, &bad));
        }
        if name.is_empty() {
            return Err(self.bad_name(start, name));
        }
        match self.variable_value(name, needed) {
            Some(v) => Ok(self.record(name, v)),
            None if !needed => Ok(String::new()),
            None => Err(self.error(
                start,
                format!("environment variable {name} is not set (give a default with ${{{name}:-VALUE}})"),
            )),
        }
    }

    fn variable_value(&self, name: &str, needed: bool) -> Option<String> {
        if needed && !name.is_empty() {
            (self.lookup)(name)
        } else {
            None
        }
    }

    fn record(&mut self, name: &str, value: String) -> String {
        self.used.push((name.to_owned(), value.clone()));
        value
    }

    fn bad_name(&self, at: usize, name: &str) -> ConfigError {
        self.error(
            at,
            format!("invalid variable name {name:?}; a name is letters, digits and '_'"),
        )
    }
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

    fn text(src: &str) -> String {
        expand(src, env).unwrap().text
    }

    #[test]
    fn expands_set_and_default() {
        let out = text("a: ${PORT}\nb: ${NOPE:-7}\nc: ${EMPTY:-x}\n");
        assert_eq!(out, "a: 5432\nb: 7\nc: x\n");
    }

    #[test]
    fn leaves_plain_dollars_and_escapes() {
        let out = text("a: $HOME $$ $${PORT} ${PORT}");
        assert_eq!(out, "a: $HOME $$ ${PORT} 5432");
    }

    /// Issue 9 item 16: before, `${A:-${B}}` became the literal `${B}` (the first `}`
    /// closed the outer expression).
    #[test]
    fn nested_default_is_expanded_or_an_error() {
        assert_eq!(text("a: ${NOPE:-${PORT}}"), "a: 5432");
        assert_eq!(text("a: ${NOPE:-x${EMPTY:-${PORT}}y}!"), "a: x5432y!");
        assert_eq!(
            text("a: ${PORT:-${UNSET}}"),
            "a: 5432",
            "unused default is not evaluated"
        );
        let e = expand("x\na: ${NOPE:-${UNSET}}", env).unwrap_err().to_string();
        assert!(e.contains("UNSET is not set") && e.contains("line 2"), "{e}");
        let e = expand("a: ${NOPE:-${PORT}", env).unwrap_err().to_string();
        assert!(e.contains("unclosed"), "{e}");
    }

    #[test]
    fn records_used_values() {
        let ex = expand("a: ${PORT} ${NOPE:-d}", env).unwrap();
        assert_eq!(ex.used, vec![("PORT".to_owned(), "5432".to_owned())]);
    }

    /// Issue 9 item 14: each `${` used to rescan the text for its line (100k lines: 58 s).
    /// Asserts results only; the time is in the commit message.
    #[test]
    fn many_variables_on_many_lines() {
        let src: String = (0..100_000).map(|i| format!("k{i}: ${{PORT}}\n")).collect();
        let out = expand(&src, env).unwrap();
        assert_eq!(out.text.lines().count(), 100_000);
        assert!(out.text.ends_with("k99999: 5432\n"));
        let mut bad = src.clone();
        bad.push_str("last: ${MISSING}\n");
        let e = expand(&bad, env).unwrap_err().to_string();
        assert!(e.contains("line 100001"), "{e}");
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
