//! The agent's log writer: every formatted log line passes through the global
//! [`Redactor`](dso_secrets::Redactor) before it reaches stderr, so no library has to
//! remember to scrub a value it might print.

use std::io::{self, Write};

use dso_secrets::Redactor;
use tracing_subscriber::fmt::MakeWriter;

/// Makes one [`RedactingWriter`] per log event.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedactingStderr;

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter::new(io::stderr())
    }
}

/// Collects one event's text and writes it, redacted, when dropped. Buffering the whole
/// event matters: a value split over two `write` calls would escape a per-call scan.
pub struct RedactingWriter<W: Write> {
    buf: Vec<u8>,
    out: W,
}

impl<W: Write> RedactingWriter<W> {
    /// A writer that ends in `out`.
    pub fn new(out: W) -> Self {
        RedactingWriter {
            buf: Vec::with_capacity(256),
            out,
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let clean = Redactor::global().redact_bytes(&self.buf);
        let result = self.out.write_all(&clean).and_then(|()| self.out.flush());
        drop(clean);
        zeroize::Zeroize::zeroize(&mut self.buf);
        self.buf.clear();
        result
    }
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The formatter flushes once per event; write out then, not on every partial write.
        self.emit()
    }
}

impl<W: Write> Drop for RedactingWriter<W> {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dso_secrets::SecretValue;

    #[test]
    fn a_value_split_over_writes_is_redacted() {
        let v = SecretValue::from_slice(b"split-secret-value");
        Redactor::global().register(&v);
        let mut sink = Vec::new();
        {
            let mut w = RedactingWriter::new(&mut sink);
            w.write_all(b"error: token split-sec").unwrap();
            w.write_all(b"ret-value rejected\n").unwrap();
        }
        Redactor::global().forget(&v);
        let text = String::from_utf8(sink).unwrap();
        assert_eq!(text, "error: token [REDACTED] rejected\n");
    }
}
