//! Lines of keys in the YAML text. serde_yaml gives no positions once a value is parsed, so
//! the validator finds them again here: one pass over the text builds an index from key
//! path (`proxy.listeners[2].backlog`, `providers.aws.auth.method`, the same spelling as
//! serde_yaml's error paths) to the line that key is on. Building it is linear in the text,
//! a look-up is one hash probe (plus one per path segment when falling back to a parent).
//!
//! The scan follows block-style YAML (indentation, `- ` items), which is what people write.
//! Keys inside flow collections (`{a: 1}`, `[x, y]`) are not indexed; their look-ups fall
//! back to the enclosing key's line.

use std::collections::HashMap;

/// Key path → 1-based line. The index is built on the first look-up, so a file without
/// errors never pays for it.
pub struct Lines<'t> {
    text: &'t str,
    index: std::cell::OnceCell<HashMap<String, usize>>,
}

struct Frame {
    /// Column of the key (or of the `-` of an item).
    indent: usize,
    /// Full path of the node.
    path: String,
    /// Whether this frame is a `- ` item (items at the same column end it).
    item: bool,
    /// Items seen so far directly under this node.
    items: usize,
}

impl<'t> Lines<'t> {
    /// Lines of `text`.
    pub fn new(text: &'t str) -> Lines<'t> {
        Lines {
            text,
            index: std::cell::OnceCell::new(),
        }
    }

    fn index(&self) -> &HashMap<String, usize> {
        self.index.get_or_init(|| build(self.text))
    }

    /// Line of the key at `path`, or of its nearest indexed parent.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(&l) = self.index().get(p) {
                return Some(l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// Line of exactly `path`, without falling back.
    #[cfg(test)]
    pub fn exact(&self, path: &str) -> Option<usize> {
        self.index().get(path).copied()
    }
}

/// One pass over `text`: every key path and `- ` item, with its line.
fn build(text: &str) -> HashMap<String, usize> {
    let mut index = HashMap::new();
    let mut stack: Vec<Frame> = vec![Frame {
        indent: 0,
        path: String::new(),
        item: false,
        items: 0,
    }];
    // The root frame sits at "column -1": never popped.
    let mut block_scalar: Option<usize> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let trimmed = raw.trim_start();
        let mut col = raw.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // Lines of a `|` or `>` block scalar belong to its key.
        if let Some(indent) = block_scalar {
            if col > indent {
                continue;
            }
            block_scalar = None;
        }
        if trimmed.starts_with("---") || trimmed.starts_with("...") {
            continue;
        }
        let mut rest = trimmed;
        // `- ` items (possibly several on one line: `- - x`).
        while let Some(after) = rest
            .strip_prefix('-')
            .filter(|a| a.is_empty() || a.starts_with(' '))
        {
            while stack.len() > 1 {
                let top = stack.last().expect("non-empty");
                if top.indent > col || (top.indent == col && top.item) {
                    stack.pop();
                } else {
                    break;
                }
            }
            let parent = stack.last_mut().expect("root");
            let path = format!("{}[{}]", parent.path, parent.items);
            parent.items += 1;
            index.entry(path.clone()).or_insert(line);
            stack.push(Frame {
                indent: col,
                path,
                item: true,
                items: 0,
            });
            let content = after.trim_start();
            col += 1 + (after.len() - content.len());
            rest = content;
        }
        if rest.is_empty() {
            continue;
        }
        let Some((key, value)) = split_key(rest) else {
            continue;
        };
        while stack.len() > 1 && stack.last().expect("non-empty").indent >= col {
            stack.pop();
        }
        let parent = stack.last().expect("root");
        let path = if parent.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", parent.path)
        };
        index.entry(path.clone()).or_insert(line);
        let v = value.trim();
        if v.starts_with('|') || v.starts_with('>') {
            block_scalar = Some(col);
        }
        stack.push(Frame {
            indent: col,
            path,
            item: false,
            items: 0,
        });
    }
    index
}

/// Splits `key: value` (or `key:` at the end of the line) at the first `:` that is
/// followed by a space or the end, outside quotes. Quoted keys are unquoted.
fn split_key(s: &str) -> Option<(&str, &str)> {
    if s.starts_with('{') || s.starts_with('[') {
        return None;
    }
    let (key_end, value_start) = if let Some(q) = s.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let close = s[1..].find(q)? + 1;
        let after = &s[close + 1..];
        let after_trim = after.trim_start();
        if !after_trim.starts_with(':') {
            return None;
        }
        let colon = close + 1 + (after.len() - after_trim.len());
        (colon, colon + 1)
    } else {
        let b = s.as_bytes();
        let colon = (0..b.len())
            .find(|&i| b[i] == b':' && (i + 1 == b.len() || b[i + 1] == b' ' || b[i + 1] == b'\t'))?;
        (colon, colon + 1)
    };
    let key = s[..key_end].trim().trim_matches(|c| c == '"' || c == '\'');
    if key.is_empty() {
        return None;
    }
    Some((key, &s[value_start..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_block_yaml() {
        let text = "\
proxy:
  listeners:
    - name: a
      listen: 127.0.0.1:1
    - name: b   # comment
      listen: '[::1]:2'
      backends:
        - addr: 127.0.0.1:3
          label: x
providers:
  aws:
    type: aws
    auth:
      method: iam_role
list:
- one
- two: 2
  three: 3
text: |
  not: a key
after: 1
\"quoted key\": 1
";
        let l = Lines::new(text);
        assert_eq!(l.exact("proxy.listeners[0]"), Some(3));
        assert_eq!(l.exact("proxy.listeners[0].name"), Some(3));
        assert_eq!(l.exact("proxy.listeners[1].listen"), Some(6));
        assert_eq!(l.exact("proxy.listeners[1].backends[0].label"), Some(9));
        assert_eq!(l.exact("providers.aws.auth.method"), Some(14));
        assert_eq!(l.exact("list[1].three"), Some(18));
        assert_eq!(l.exact("text.not"), None);
        assert_eq!(l.exact("after"), Some(21));
        assert_eq!(l.exact("quoted key"), Some(22));
        assert_eq!(l.line("proxy.listeners[1].keepalive"), Some(5));
        assert_eq!(l.line("nothing.here"), None);
    }
}
