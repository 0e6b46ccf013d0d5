//! The HTTP control server: health (controllable), instance id, reload counter, and windows
//! onto the environment and the file system for secret-injection tests.
//!
//! HTTP/1.x, one request per connection (`Connection: close`), bodies ignored. Routing is a
//! pure function ([`route`]) so it is tested without sockets.
//!
//! | request | answer |
//! |---|---|
//! | `GET /health` | 200 `ok` or 503 `unhealthy` |
//! | `POST /health/fail`, `POST /health/ok` | force 503 / back to normal |
//! | `GET /id` | the instance id |
//! | `GET /pid` | this process's PID (1 when it is a container's init) |
//! | `GET /uid` | the real uid (from `/proc/self/status`) |
//! | `GET /reloads` | SIGHUPs seen |
//! | `GET /reloaded` | the bytes of `RELOAD_FILE` read at the last SIGHUP; 404 before any, 500 with the error if the read failed |
//! | `GET /env/NAME` | the variable's value, 404 if unset |
//! | `GET /file?path=P` | the file's bytes; headers `X-File-Mode` (octal), `X-File-Uid`, `X-File-Gid`, `X-File-Size` |
//! | `GET /stat?path=P` | `mode=0400 uid=0 gid=0 size=12` |

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::state::State;

/// Largest request head accepted, in bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body skipped, in bytes (the control API takes no bodies).
const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One response, before serialization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers beyond the fixed ones.
    pub headers: Vec<(&'static str, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// A plain-text response.
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into().into_bytes(),
        }
    }

    /// Serializes status line, headers and body.
    pub fn to_bytes(&self, instance_id: &str) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nX-Instance: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len(),
            instance_id
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// The reason phrase of the few status codes used.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Answers one request. File reads are blocking but tiny (secret files), which is fine here.
pub fn route(state: &State, method: &str, target: &str) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET" | "HEAD", "/health") => {
            if state.is_healthy() {
                Response::text(200, "ok\n")
            } else {
                Response::text(503, "unhealthy\n")
            }
        }
        ("POST", "/health/fail") => {
            state.set_failed(true);
            Response::text(200, "failing\n")
        }
        ("POST", "/health/ok") => {
            state.set_failed(false);
            Response::text(200, "ok\n")
        }
        ("GET", "/id") => Response::text(200, format!("{}\n", state.instance_id())),
        ("GET", "/pid") => Response::text(200, format!("{}\n", std::process::id())),
        ("GET", "/uid") => match real_uid() {
            Some(uid) => Response::text(200, format!("{uid}\n")),
            None => Response::text(500, "no Uid: line in /proc/self/status\n"),
        },
        ("GET", "/reloads") => Response::text(200, format!("{}\n", state.reloads())),
        ("GET", "/reloaded") => match state.reloaded() {
            Some(Ok(body)) => Response {
                status: 200,
                headers: Vec::new(),
                body,
            },
            Some(Err(e)) => Response::text(500, format!("{e}\n")),
            None => Response::text(404, "no reload with a RELOAD_FILE yet\n"),
        },
        ("GET", p) if p.starts_with("/env/") => {
            let name = percent_decode(&p["/env/".len()..]);
            match std::env::var_os(&name) {
                Some(v) => Response {
                    status: 200,
                    headers: Vec::new(),
                    body: v.into_encoded_bytes(),
                },
                None => Response::text(404, format!("env {name} not set\n")),
            }
        }
        ("GET", "/file") => file(query, true),
        ("GET", "/stat") => file(query, false),
        (
            _,
            "/health" | "/health/fail" | "/health/ok" | "/id" | "/pid" | "/uid" | "/reloads" | "/reloaded"
            | "/file" | "/stat",
        ) => Response::text(405, "method not allowed\n"),
        _ => Response::text(404, "not found\n"),
    }
}

/// The real uid: the first field of the `Uid:` line of `/proc/self/status` (no libc).
pub fn real_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_uid_line(&status)
}

/// The real uid from the text of a `/proc/PID/status` file.
fn parse_uid_line(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `GET /file?path=P` (with content) and `GET /stat?path=P` (one line of metadata).
fn file(query: &str, with_content: bool) -> Response {
    let Some(path) = query_param(query, "path") else {
        return Response::text(400, "missing ?path=\n");
    };
    let error = |e: std::io::Error| {
        let status = if e.kind() == std::io::ErrorKind::PermissionDenied {
            403
        } else {
            404
        };
        Response::text(status, format!("{path}: {e}\n"))
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return error(e),
    };
    let mode = format!("{:04o}", meta.mode() & 0o7777);
    if !with_content {
        return Response::text(
            200,
            format!(
                "mode={mode} uid={} gid={} size={}\n",
                meta.uid(),
                meta.gid(),
                meta.len()
            ),
        );
    }
    match std::fs::read(&path) {
        Ok(body) => Response {
            status: 200,
            headers: vec![
                ("X-File-Mode", mode),
                ("X-File-Uid", meta.uid().to_string()),
                ("X-File-Gid", meta.gid().to_string()),
                ("X-File-Size", meta.len().to_string()),
            ],
            body,
        },
        Err(e) => error(e),
    }
}

/// The decoded value of `name` in a query string.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+` (as a space); invalid escapes are kept as written.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one hex digit.
fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Accepts connections until the task is dropped; each one is served on its own task.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                tokio::spawn(handle(stream, state.clone()));
            }
            Err(e) => {
                eprintln!("dso-testsrv: http accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads one request (head, and a body up to `Content-Length`, discarded), answers, closes.
async fn handle(mut stream: TcpStream, state: Arc<State>) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return,
    };
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let response = match (words.next(), words.next()) {
        (Some(method), Some(target)) => route(&state, method, target),
        _ => Response::text(400, "bad request line\n"),
    };
    let _ = stream.write_all(&response.to_bytes(state.instance_id())).await;
    let _ = stream.shutdown().await;
}

/// Reads until the blank line that ends the head, then skips the body (`Content-Length`
/// bytes), so closing does not turn into a reset that could eat the response.
/// `None` on EOF, error or an oversized request.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head, mut body_left) = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let body_len = content_length(&head).filter(|&n| n <= MAX_BODY)?;
            break (head, body_len.saturating_sub(buf.len() - end - 4));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
    };
    while body_left > 0 {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body_left = body_left.saturating_sub(n);
    }
    Some(head)
}

/// The `Content-Length` of a request head: 0 when absent, `None` when unparsable.
fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map_or(Some(0), |(_, v)| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn state() -> State {
        State::new("inst".into(), Duration::ZERO, false)
    }

    #[test]
    fn health_is_controllable() {
        let s = state();
        assert_eq!(route(&s, "GET", "/health").status, 200);
        assert_eq!(route(&s, "POST", "/health/fail").status, 200);
        assert_eq!(route(&s, "GET", "/health").status, 503);
        assert_eq!(route(&s, "POST", "/health/ok").status, 200);
        assert_eq!(route(&s, "GET", "/health").status, 200);
        assert_eq!(route(&s, "DELETE", "/health").status, 405);
        assert_eq!(route(&s, "GET", "/nope").status, 404);
    }

    #[test]
    fn env_values_are_returned_exactly() {
        let s = state();
        // PATH is set in every test environment; its value must come back byte for byte.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(route(&s, "GET", "/env/PATH").body, path.into_bytes());
        assert_eq!(route(&s, "GET", "/env/DSO_TESTSRV_SURELY_UNSET").status, 404);
    }

    #[test]
    fn file_reports_content_and_mode() {
        let dir = std::env::temp_dir().join(format!("dso-testsrv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret value");
        std::fs::write(&f, b"s3cr3t").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o440)).unwrap();
        let target = format!("/file?path={}", f.display().to_string().replace(' ', "%20"));

        let r = route(&state(), "GET", &target);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"s3cr3t");
        assert!(r.headers.contains(&("X-File-Mode", "0440".into())));

        let st = route(&state(), "GET", &target.replacen("/file", "/stat", 1));
        let line = String::from_utf8(st.body).unwrap();
        assert!(line.starts_with("mode=0440 uid="), "{line}");
        assert!(line.ends_with("size=6\n"), "{line}");

        assert_eq!(route(&state(), "GET", "/file?path=/surely/missing").status, 404);
        assert_eq!(route(&state(), "GET", "/file").status, 400);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pid_and_uid_are_this_process() {
        let r = route(&state(), "GET", "/pid");
        assert_eq!(
            (r.status, r.body),
            (200, format!("{}\n", std::process::id()).into_bytes())
        );
        let r = route(&state(), "GET", "/uid");
        assert_eq!(r.status, 200);
        // Cross-checked against the owner of this process's /proc directory.
        let owner = std::fs::metadata("/proc/self").unwrap().uid();
        assert_eq!(r.body, format!("{owner}\n").into_bytes());
        assert_eq!(route(&state(), "POST", "/pid").status, 405);
    }

    #[test]
    fn uid_line_parsing() {
        let status = "Name:\tx\nUmask:\t0022\nUid:\t1001\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_uid_line(status), Some(1001));
        assert_eq!(parse_uid_line("Name: x\n"), None);
    }

    #[test]
    fn reloaded_shows_what_the_last_sighup_read() {
        let dir = std::env::temp_dir().join(format!("dso-testsrv-reloaded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("conf");
        let s = state().with_reload_file(Some(f.clone()));
        assert_eq!(route(&s, "GET", "/reloaded").status, 404);
        std::fs::write(&f, b"secret-v1\n").unwrap();
        s.reload();
        let r = route(&s, "GET", "/reloaded");
        assert_eq!((r.status, r.body), (200, b"secret-v1\n".to_vec()));
        std::fs::remove_file(&f).unwrap();
        s.reload();
        let r = route(&s, "GET", "/reloaded");
        assert_eq!(r.status, 500);
        assert!(String::from_utf8(r.body).unwrap().contains("conf"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn content_length_header() {
        assert_eq!(content_length("POST / HTTP/1.1\r\ncontent-length: 12"), Some(12));
        assert_eq!(content_length("GET / HTTP/1.1\r\nHost: x"), Some(0));
        assert_eq!(content_length("GET / HTTP/1.1\r\nContent-Length: x"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("%2Frun%2fx"), "/run/x");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn response_serialization() {
        let bytes = Response::text(503, "x").to_bytes("id1");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Content-Length: 1\r\n"));
        assert!(text.contains("X-Instance: id1\r\n"));
        assert!(text.ends_with("\r\n\r\nx"));
    }
}
