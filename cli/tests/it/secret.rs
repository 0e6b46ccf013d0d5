//! `dso init` and `dso secret ...` with the real binary, no agent: values through stdin
//! come back byte for byte, never show in list output or argv, bad files and keys are
//! clear errors that change nothing, concurrent processes lose nothing, and a running
//! agent is notified (names only).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::harness::DSO;

/// A HOME of its own, so defaults land in a temp `~/.dso`, and a control socket path
/// where no agent listens.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn vault(&self) -> PathBuf {
        self.dir.path().join(".dso/vault.enc")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join(".dso/master.key")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DSO);
        c.args(args)
            .env("HOME", self.dir.path())
            .env("DSO_SOCKET", self.dir.path().join("no-agent.sock"))
            .env_remove("DSO_VAULT_FILE")
            .env_remove("DSO_MASTER_KEY_FILE")
            .env_remove("DSO_VAULT_PASSPHRASE")
            .env_remove("DSO_VAULT_PASSPHRASE_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs `dso ARGS` with `input` on stdin (an empty pipe when `None`: never a terminal).
    fn run_with(&self, mut c: Command, input: Option<&[u8]>) -> Output {
        c.stdin(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(bytes) = input {
            // A command that fails before reading stdin closes it: that is its answer.
            if let Err(e) = stdin.write_all(bytes) {
                assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
            }
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    fn run(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        self.run_with(self.command(args), input)
    }

    fn ok(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let out = self.run(args, input);
        assert!(out.status.success(), "dso {args:?}: {}", text(&out.stderr));
        out
    }

    fn init(&self) {
        self.ok(&["init"], None);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const VALUES: &[(&str, &[u8])] = &[
    ("app/multiline", b"line one\nline two\n"),
    ("app/dollar", b"pa$$word ${HOME} $(id) `id`"),
    ("app/quotes", b"it's \"quoted\" \\ back"),
    ("app/utf8", "pässwörd ✓ 秘密".as_bytes()),
    ("app/binary", b"\0\x01\x02\xff\xfe\0nul inside\0"),
];

#[test]
fn values_go_in_by_stdin_and_come_back_byte_for_byte() {
    let home = Home::new();
    let out = home.ok(&["init"], None);
    assert!(text(&out.stdout).contains("master.key"), "{}", text(&out.stdout));
    assert_eq!(mode(&home.vault()), 0o600);
    assert_eq!(mode(&home.key()), 0o600);
    assert_eq!(mode(home.vault().parent().unwrap()), 0o700);
    for (name, value) in VALUES {
        let out = home.ok(&["secret", "set", name], Some(value));
        assert!(!contains(&out.stdout, value) && !contains(&out.stderr, value));
    }
    for (name, value) in VALUES {
        let out = home.ok(&["secret", "get", name], None);
        assert_eq!(out.stdout, *value, "{name}");
    }
    // A new set is a new version; get sees it.
    home.ok(&["secret", "set", "app/dollar"], Some(b"second"));
    assert_eq!(home.ok(&["secret", "get", "app/dollar"], None).stdout, b"second");
    // --from-file takes the file's bytes as they are; the vault file never holds them in clear.
    let f = home.dir.path().join("value.bin");
    std::fs::write(&f, b"from a file\0!").unwrap();
    home.ok(
        &["secret", "set", "app/file", "--from-file", f.to_str().unwrap()],
        None,
    );
    assert_eq!(
        home.ok(&["secret", "get", "app/file"], None).stdout,
        b"from a file\0!"
    );
    let raw = std::fs::read(home.vault()).unwrap();
    assert!(!contains(&raw, b"from a file") && !contains(&raw, b"second"));
    // Paths given by flag or environment instead of the defaults.
    let vault = home.dir.path().join("elsewhere/v.enc");
    let key = home.dir.path().join("elsewhere/k.key");
    let (v, k) = (vault.to_str().unwrap(), key.to_str().unwrap());
    home.ok(&["init", "--vault-file", v, "--key-file", k], None);
    home.ok(
        &["secret", "--vault-file", v, "--key-file", k, "set", "x"],
        Some(b"xval"),
    );
    let mut c = home.command(&["secret", "get", "x"]);
    c.env("DSO_VAULT_FILE", v).env("DSO_MASTER_KEY_FILE", k);
    assert_eq!(home.run_with(c, None).stdout, b"xval");
}

#[test]
fn list_shows_names_versions_times_and_never_values() {
    let home = Home::new();
    home.init();
    let out = home.ok(&["secret", "list"], None);
    assert!(text(&out.stdout).contains("no secrets"), "{}", text(&out.stdout));
    for (name, value) in VALUES {
        home.ok(&["secret", "set", name], Some(value));
    }
    let table = home.ok(&["secret", "list"], None);
    let json = home.ok(&["secret", "list", "--json"], None);
    for out in [&table, &json] {
        for (name, value) in VALUES {
            assert!(contains(&out.stdout, name.as_bytes()), "{name}");
            assert!(
                !contains(&out.stdout, value) && !contains(&out.stderr, value),
                "{name}"
            );
        }
    }
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let secrets = doc["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), VALUES.len());
    assert_eq!(doc["vault_file"], home.vault().to_str().unwrap());
    assert!(secrets.iter().all(|s| s["version"].as_u64().unwrap() >= 1));
    assert!(
        secrets
            .iter()
            .all(|s| s["updated"].as_str().unwrap().ends_with('Z'))
    );
    assert!(text(&table.stdout).starts_with("NAME"), "{}", text(&table.stdout));

    home.ok(&["secret", "delete", "app/utf8"], None);
    let out = home.run(&["secret", "get", "app/utf8"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no secret \"app/utf8\""),
        "{}",
        text(&out.stderr)
    );
    let out = home.run(&["secret", "delete", "app/utf8"], None);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_value_on_the_command_line_is_refused() {
    let home = Home::new();
    home.init();
    let before = std::fs::read(home.vault()).unwrap();
    let out = home.run(&["secret", "set", "app/db", "hunter2-in-argv"], Some(b"ignored"));
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("stdin") && err.contains("--from-file"), "{err}");
    assert!(
        !err.contains("hunter2-in-argv"),
        "the refusal repeats the value: {err}"
    );
    assert_eq!(std::fs::read(home.vault()).unwrap(), before);
    // There is no flag that takes a value.
    for flag in ["--value", "--secret", "-v"] {
        let out = home.run(&["secret", "set", "app/db", flag, "x"], Some(b"ignored"));
        assert_eq!(out.status.code(), Some(2), "{flag}");
    }
    let help = text(&home.ok(&["secret", "set", "--help"], None).stdout);
    assert!(help.contains("--from-file") && !help.contains("VALUE"), "{help}");
    // Bad names are usage errors too.
    let out = home.run(&["secret", "set", "../etc/passwd"], Some(b"x"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn init_refuses_to_overwrite() {
    let home = Home::new();
    home.init();
    home.ok(&["secret", "set", "keep"], Some(b"kept"));
    let vault = std::fs::read(home.vault()).unwrap();
    let key = std::fs::read(home.key()).unwrap();
    let out = home.run(&["init"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("vault.enc"),
        "{err}"
    );
    let out = home.run(&["init", "--passphrase"], Some(b"a long passphrase\n"));
    assert_eq!(out.status.code(), Some(1));
    // The key alone existing is refused too (a new vault must not get a stale key).
    let other = home.dir.path().join("other.enc");
    let out = home.run(&["init", "--vault-file", other.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("master.key"), "{}", text(&out.stderr));
    assert!(!other.exists());
    assert_eq!(std::fs::read(home.vault()).unwrap(), vault);
    assert_eq!(std::fs::read(home.key()).unwrap(), key);
    assert_eq!(home.ok(&["secret", "get", "keep"], None).stdout, b"kept");
}

#[test]
fn a_wrong_key_or_a_damaged_file_is_a_clear_error_that_changes_nothing() {
    let home = Home::new();
    home.init();
    home.ok(&["secret", "set", "a"], Some(b"aaaa"));
    let other = Home::new();
    other.init();
    let before = std::fs::read(home.vault()).unwrap();
    let vault = home.vault();
    let wrong_key = other.key();
    let (v, k) = (vault.to_str().unwrap(), wrong_key.to_str().unwrap());
    for args in [
        vec!["secret", "--vault-file", v, "--key-file", k, "set", "b"],
        vec!["secret", "--vault-file", v, "--key-file", k, "get", "a"],
        vec!["secret", "--vault-file", v, "--key-file", k, "delete", "a"],
    ] {
        let out = home.run(&args, Some(b"bbbb"));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("wrong key") && err.contains(v), "{err}");
        assert_eq!(std::fs::read(home.vault()).unwrap(), before);
    }

    let mut damaged = before.clone();
    let at = damaged.len() - 40;
    damaged[at] ^= 0x10;
    std::fs::write(home.vault(), &damaged).unwrap();
    for args in [
        vec!["secret", "set", "b"],
        vec!["secret", "list"],
        vec!["secret", "delete", "a"],
    ] {
        let out = home.run(&args, Some(b"bbbb"));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("damaged") && err.contains(v) && err.contains("backup"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(home.vault()).unwrap(),
            damaged,
            "{args:?} rewrote the file"
        );
    }

    std::fs::remove_file(home.vault()).unwrap();
    let out = home.run(&["secret", "list"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no vault at") && err.contains("dso init"), "{err}");
}

#[test]
fn concurrent_sets_from_many_processes_lose_nothing() {
    let home = Home::new();
    home.init();
    let n = 16;
    let children: Vec<_> = (0..n)
        .map(|i| {
            let mut c = home.command(&["secret", "set", &format!("proc/{i}")]);
            c.stdin(Stdio::piped());
            let mut child = c.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("value-{i}").as_bytes())
                .unwrap();
            child
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&home.ok(&["secret", "list", "--json"], None).stdout).unwrap();
    assert_eq!(doc["secrets"].as_array().unwrap().len(), n);
    for i in 0..n {
        let out = home.ok(&["secret", "get", &format!("proc/{i}")], None);
        assert_eq!(out.stdout, format!("value-{i}").as_bytes());
    }
}

#[test]
fn size_limit_is_enforced_with_the_limit_in_the_message() {
    let home = Home::new();
    home.init();
    let half = vec![b'h'; 512 * 1024];
    home.ok(&["secret", "set", "half"], Some(&half));
    assert_eq!(home.ok(&["secret", "get", "half"], None).stdout, half);
    let before = std::fs::read(home.vault()).unwrap();
    let big = vec![b'b'; 1024 * 1024 + 1];
    let f = home.dir.path().join("big");
    std::fs::write(&f, &big).unwrap();
    for out in [
        home.run(&["secret", "set", "big"], Some(&big)),
        home.run(
            &["secret", "set", "big", "--from-file", f.to_str().unwrap()],
            None,
        ),
    ] {
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains("1048576 bytes"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = home.run(&["secret", "set", "empty"], Some(b""));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(home.vault()).unwrap(), before);
}

#[test]
fn passphrase_vaults_take_the_passphrase_from_stdin_env_or_file() {
    let home = Home::new();
    let out = home.ok(&["init", "--passphrase"], Some(b"correct horse battery\n"));
    assert!(!home.key().exists(), "a passphrase vault has no key file");
    assert!(text(&out.stdout).contains("passphrase"), "{}", text(&out.stdout));
    let mut c = home.command(&["secret", "set", "db"]);
    c.env("DSO_VAULT_PASSPHRASE", "correct horse battery");
    let out = home.run_with(c, Some(b"pw"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pass_file = home.dir.path().join("pass");
    std::fs::write(&pass_file, "correct horse battery\n").unwrap();
    let mut c = home.command(&["secret", "get", "db"]);
    c.env("DSO_VAULT_PASSPHRASE_FILE", &pass_file);
    assert_eq!(home.run_with(c, None).stdout, b"pw");

    let mut c = home.command(&["secret", "get", "db"]);
    c.env("DSO_VAULT_PASSPHRASE", "wrong horse battery");
    let out = home.run_with(c, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("wrong key: the passphrase"),
        "{}",
        text(&out.stderr)
    );

    // No passphrase and no terminal to ask on (setsid drops the controlling terminal).
    let mut c = Command::new("setsid");
    c.arg(DSO)
        .args(["secret", "get", "db"])
        .env("HOME", home.dir.path())
        .env("DSO_SOCKET", home.dir.path().join("none.sock"))
        .env_remove("DSO_VAULT_PASSPHRASE")
        .env_remove("DSO_VAULT_PASSPHRASE_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = home.run_with(c, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("DSO_VAULT_PASSPHRASE_FILE"),
        "{}",
        text(&out.stderr)
    );

    let short = Home::new();
    let out = short.run(&["init", "--passphrase"], Some(b"short\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(!short.vault().exists());
}

/// A stand-in agent on a Unix socket that answers every request with `status`, and
/// hands each request (head and body) to the test.
fn fake_agent(socket: &Path, status: &'static str) -> std::sync::mpsc::Receiver<String> {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                request.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            request.push_str(&String::from_utf8_lossy(&body));
            let answer = r#"{"error":"nope"}"#;
            let mut w = stream;
            let _ = write!(
                w,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
            let _ = tx.send(request);
        }
    });
    rx
}

#[test]
fn a_running_agent_is_told_the_name_and_never_the_value() {
    let home = Home::new();
    home.init();
    // No agent: silent.
    let out = home.ok(&["secret", "set", "quiet"], Some(b"quiet-value"));
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));

    for (status, warns) in [
        ("200 OK", false),
        ("404 Not Found", false),
        ("500 Internal Server Error", true),
    ] {
        let socket = home.dir.path().join(format!("agent-{}.sock", &status[..3]));
        let requests = fake_agent(&socket, status);
        let mut c = home.command(&["secret", "set", "app/db"]);
        c.env("DSO_SOCKET", &socket);
        let out = home.run_with(c, Some(b"notify-value"));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let req = requests.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(req.starts_with("POST /v1/secrets/notify "), "{req}");
        let body: serde_json::Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["provider_kind"], "local");
        assert_eq!(body["name"], "app/db");
        assert_eq!(body["vault_file"], home.vault().to_str().unwrap());
        assert!(!req.contains("notify-value"));
        let err = text(&out.stderr);
        assert_eq!(err.contains("warning:"), warns, "{status}: {err}");
        if warns {
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains("500"), "{err}");
        }
        // delete notifies too.
        let mut c = home.command(&["secret", "delete", "app/db"]);
        c.env("DSO_SOCKET", &socket);
        assert!(home.run_with(c, None).status.success());
        let req = requests.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(req.contains("\"name\":\"app/db\""), "{req}");
    }
}

/// Runs `dso ARGS` on a pseudo-terminal (util-linux `script`), answering each prompt in
/// turn once it shows; returns everything the terminal showed and the exit status.
fn on_a_terminal(home: &Home, args: &str, answers: &[(&str, &str)]) -> (String, bool) {
    let mut child = Command::new("script")
        .args(["-qec", &format!("{DSO} {args}"), "/dev/null"])
        .env("HOME", home.dir.path())
        .env("DSO_SOCKET", home.dir.path().join("no-agent.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut shown = Vec::new();
    for (prompt, answer) in answers {
        while !contains(&shown, prompt.as_bytes()) {
            let mut b = [0u8; 1];
            assert_eq!(
                stdout.read(&mut b).unwrap(),
                1,
                "no prompt {prompt:?}; got {}",
                text(&shown)
            );
            shown.push(b[0]);
        }
        // rpassword shows the prompt, then turns echo off: answer a moment later, as a
        // person would, not inside that window.
        std::thread::sleep(std::time::Duration::from_millis(500));
        stdin.write_all(format!("{answer}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    stdout.read_to_end(&mut shown).unwrap();
    drop(stdin);
    (text(&shown), child.wait().unwrap().success())
}

#[test]
fn on_a_terminal_the_value_is_asked_twice_without_echo() {
    let home = Home::new();
    home.init();
    let (shown, ok) = on_a_terminal(
        &home,
        "secret set tty/x",
        &[
            ("value for tty/x: ", "typed-secret"),
            ("(again): ", "typed-secret"),
        ],
    );
    assert!(ok, "{shown}");
    assert!(!shown.contains("typed-secret"), "echoed: {shown}");
    assert_eq!(home.ok(&["secret", "get", "tty/x"], None).stdout, b"typed-secret");

    let (shown, ok) = on_a_terminal(
        &home,
        "secret set tty/y",
        &[("value for tty/y: ", "first-try"), ("(again): ", "second-try")],
    );
    assert!(!ok && shown.contains("differ"), "{shown}");
    assert_eq!(home.run(&["secret", "get", "tty/y"], None).status.code(), Some(1));
}

/// The agent's side of `dso secret` (issue 7): the vault through `/v1/vault/secrets`.
mod through_the_agent {
    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::agent::TempGroup;
    use crate::harness::{Agent, http};

    const VALUE: &[u8] = b"agent-path-Zq8 $x \"q\"\nline two \xff\x00end";

    fn vault_config(dirs: &[&Path], allow_read: bool, group: Option<&str>) -> String {
        let mut y = String::from("version: v1.0.0\nmode: agent\nproviders:\n");
        for (i, d) in dirs.iter().enumerate() {
            y.push_str(&format!(
                "  local{i}:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n",
                v = d.display()
            ));
        }
        y.push_str(&format!(
            "agent:\n  watch:\n    debounce: 0s\n  api:\n    allow_secret_read: {allow_read}\n"
        ));
        if let Some(g) = group {
            y.push_str(&format!("    socket_group: {g}\n"));
        }
        y.push_str("secrets:\n  - name: app\n    provider: local0\n    mappings:\n      W: app/w\n");
        y
    }

    fn init(dir: &Path) {
        let out = std::process::Command::new(super::DSO)
            .args(["init", "--vault-file"])
            .arg(dir.join("vault.enc"))
            .arg("--key-file")
            .arg(dir.join("master.key"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", super::text(&out.stderr));
    }

    /// Runs `dso --socket S secret ARGS` with `stdin`, under `setpriv PRIV` when given.
    async fn secret(
        agent: &Agent,
        vault: &Path,
        privs: &[String],
        args: &[&str],
        stdin: &[u8],
    ) -> std::process::Output {
        let mut c = if privs.is_empty() {
            tokio::process::Command::new(super::DSO)
        } else {
            let mut c = tokio::process::Command::new("setpriv");
            c.args(privs).arg(super::DSO);
            c
        };
        c.arg("--socket")
            .arg(&agent.socket)
            .arg("secret")
            .arg("--vault-file")
            .arg(vault.join("vault.enc"))
            .arg("--key-file")
            .arg(vault.join("master.key"))
            .args(args)
            .env_remove("DSO_VAULT_PASSPHRASE")
            .env_remove("DSO_VAULT_PASSPHRASE_FILE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).await.unwrap();
        drop(input);
        child.wait_with_output().await.unwrap()
    }

    fn ok(out: &std::process::Output) -> String {
        assert!(out.status.success(), "{}", super::text(&out.stderr));
        super::text(&out.stdout)
    }

    /// Sends `body` as a PUT without waiting for the server to read it all, then reads the
    /// answer's status.
    async fn put_raw(socket: &Path, path: &str, body: Vec<u8>) -> u16 {
        let s = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let writer = tokio::spawn(async move {
            let _ = w.write_all(head.as_bytes()).await;
            let _ = w.write_all(&body).await;
            // Keep the write side open: the server takes a half-close as the client leaving.
            std::future::pending::<()>().await;
            drop(w);
        });
        let mut resp = Vec::new();
        let _ = r.read_to_end(&mut resp).await;
        writer.abort();
        let resp = String::from_utf8_lossy(&resp);
        resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    /// set, list, delete through the socket; get refused by default with the key named;
    /// the size limit; the value never in the agent's log at trace level.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_list_delete_go_through_the_socket_and_get_is_refused_by_default() {
        let vault = tempfile::tempdir().unwrap();
        init(vault.path());
        let state = tempfile::tempdir().unwrap();
        let state_arg = state.path().display().to_string();
        let agent = Agent::start_with(
            |_| vault_config(&[vault.path()], false, None),
            &["--state-dir", &state_arg],
            "trace",
        )
        .await;
        let out = secret(
            &agent,
            vault.path(),
            &[],
            &["--via-agent", "set", "app/db_password"],
            VALUE,
        )
        .await;
        let said = ok(&out);
        assert!(
            said.contains("set app/db_password version 1") && said.contains("through the agent"),
            "{said}"
        );
        // The agent really wrote the vault: read it directly.
        let out = secret(&agent, vault.path(), &[], &["get", "app/db_password"], b"").await;
        assert_eq!(out.stdout, VALUE, "{}", super::text(&out.stderr));

        let out = secret(&agent, vault.path(), &[], &["--via-agent", "list", "--json"], b"").await;
        let listed: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        assert_eq!(listed["secrets"][0]["name"], "app/db_password");
        assert_eq!(listed["secrets"][0]["version"], 1);
        let out = secret(&agent, vault.path(), &[], &["--via-agent", "list"], b"").await;
        assert!(ok(&out).contains("app/db_password"));

        // Reading back is off: 403 naming the key, through the CLI and raw.
        let out = secret(
            &agent,
            vault.path(),
            &[],
            &["--via-agent", "get", "app/db_password"],
            b"",
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{}", super::text(&out.stderr));
        assert!(
            super::text(&out.stderr).contains("agent.api.allow_secret_read"),
            "{}",
            super::text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
        let (code, body) = http(&agent.socket, "GET", "/v1/vault/secrets/app%2Fdb_password", "")
            .await
            .unwrap();
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("agent.api.allow_secret_read"), "{body}");
        // Unencoded slashes name the same entry.
        let (code, _) = http(&agent.socket, "GET", "/v1/vault/secrets/app/db_password", "")
            .await
            .unwrap();
        assert_eq!(code, 403);

        // The size limit: exactly the limit is taken, one byte more is 413 and changes nothing.
        let max = dso_secrets::value::MAX_VALUE_LEN;
        let code = put_raw(&agent.socket, "/v1/vault/secrets/app/big", vec![b'a'; max]).await;
        assert_eq!(
            code,
            200,
            "{}",
            agent
                .log()
                .lines()
                .filter(|l| !l.contains("TRACE"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let code = put_raw(&agent.socket, "/v1/vault/secrets/app/big", vec![b'b'; max + 1]).await;
        assert_eq!(code, 413);
        let (_, body) = http(&agent.socket, "GET", "/v1/vault/secrets", "").await.unwrap();
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let big = listed["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "app/big")
            .unwrap();
        assert_eq!(big["version"], 2, "the 413 wrote nothing: {body}");
        assert!(!body.contains("agent-path"), "{body}");
        // A bad name is 400 naming it.
        let (code, body) = http(&agent.socket, "PUT", "/v1/vault/secrets/..%2Fx", "v")
            .await
            .unwrap();
        assert_eq!(code, 400, "{body}");

        let out = secret(
            &agent,
            vault.path(),
            &[],
            &["--via-agent", "delete", "app/db_password"],
            b"",
        )
        .await;
        assert!(ok(&out).contains("deleted app/db_password (was version 1)"));
        let out = secret(
            &agent,
            vault.path(),
            &[],
            &["--via-agent", "delete", "app/db_password"],
            b"",
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{}", super::text(&out.stderr));
        assert!(super::text(&out.stderr).contains("no secret \"app/db_password\""));

        let log = agent.log();
        assert!(log.contains("secret set through the control socket"), "{log}");
        let needle = &VALUE[..14];
        assert!(
            !log.as_bytes().windows(needle.len()).any(|w| w == needle),
            "the value is in the agent's log"
        );
    }

    /// `agent.api.allow_secret_read: true`: get answers the exact bytes; with two local
    /// providers the request must name one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_answers_the_raw_value_when_allowed_and_several_vaults_need_a_provider() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(one.path());
        init(two.path());
        let state = tempfile::tempdir().unwrap();
        let state_arg = state.path().display().to_string();
        let agent = Agent::start_with(
            |_| vault_config(&[one.path(), two.path()], true, None),
            &["--state-dir", &state_arg],
            "trace",
        )
        .await;
        let out = secret(&agent, one.path(), &[], &["--via-agent", "set", "app/x"], VALUE).await;
        assert_eq!(out.status.code(), Some(2), "{}", super::text(&out.stderr));
        let e = super::text(&out.stderr);
        assert!(e.contains("local0, local1") && e.contains("--provider"), "{e}");
        let out = secret(
            &agent,
            one.path(),
            &[],
            &["--via-agent", "--provider", "local1", "set", "app/x"],
            VALUE,
        )
        .await;
        assert!(ok(&out).contains(&two.path().display().to_string()));
        let out = secret(
            &agent,
            one.path(),
            &[],
            &["--via-agent", "--provider", "local1", "get", "app/x"],
            b"",
        )
        .await;
        assert!(out.status.success(), "{}", super::text(&out.stderr));
        assert_eq!(out.stdout, VALUE);
        // A value the redactor knows (the watcher took it) still comes back whole; the JSON
        // answers stay redacted.
        const WATCHED: &[u8] = b"watched-value-Q7w9 for the redactor";
        let out = secret(
            &agent,
            one.path(),
            &[],
            &["--via-agent", "--provider", "local0", "set", "app/w"],
            WATCHED,
        )
        .await;
        ok(&out);
        let mut taken = false;
        for _ in 0..150 {
            let (_, body) = http(&agent.socket, "GET", "/v1/secrets", "").await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["secrets"][0]["versions"]["app/w"].is_string() {
                taken = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(taken, "the watcher took app/w");
        // The watcher's calls are counted per provider, call and result.
        let (_, metrics) = http(&agent.socket, "GET", "/metrics", "").await.unwrap();
        let count = |labels: &str| -> u64 {
            let prefix = format!("dso_secrets_provider_calls_total{{{labels}}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map_or(0, |n| n.trim().parse().unwrap())
        };
        assert!(
            count(r#"provider="local0",call="version",result="ok""#) >= 1,
            "{metrics}"
        );
        assert!(
            count(r#"provider="local0",call="fetch",result="ok""#) >= 1,
            "{metrics}"
        );
        assert_eq!(
            count(r#"provider="local1",call="fetch",result="ok""#),
            0,
            "nothing watched on local1"
        );
        assert!(!metrics.contains("watched-value-Q7w9"));
        let (code, body) = http(
            &agent.socket,
            "GET",
            "/v1/vault/secrets/app/w?provider=local0",
            "",
        )
        .await
        .unwrap();
        assert_eq!((code, body.as_bytes()), (200, WATCHED));
        let (code, body) = http(
            &agent.socket,
            "PUT",
            "/v1/vault/secrets/..%2Fwatched-value-Q7w9%20for%20the%20redactor?provider=local0",
            "x",
        )
        .await
        .unwrap();
        assert_eq!(code, 400);
        assert!(
            !body.contains("watched-value-Q7w9 for the redactor"),
            "error answers are redacted: {body}"
        );
        let out = secret(
            &agent,
            one.path(),
            &[],
            &["--via-agent", "--provider", "nope", "list"],
            b"",
        )
        .await;
        assert!(super::text(&out.stderr).contains("no local provider \"nope\""));
        let needle = &VALUE[..14];
        assert!(!agent.log().as_bytes().windows(needle.len()).any(|w| w == needle));
    }

    /// A member of the socket's group who cannot read the root-only vault: `dso secret
    /// set|list|delete` go through the agent by themselves; a non-member is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_member_who_cannot_read_the_vault_goes_through_the_agent() {
        let root = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:\t0\t"));
        if !root {
            assert!(std::env::var("CI").is_err(), "this test must run as root in CI");
            eprintln!("SKIPPED LOUDLY: needs root to run the client as another uid");
            return;
        }
        let group = TempGroup::create();
        let vault = tempfile::tempdir().unwrap();
        init(vault.path());
        let state = tempfile::tempdir().unwrap();
        let state_arg = state.path().display().to_string();
        let agent = Agent::start_with(
            |_| vault_config(&[vault.path()], false, Some(&group.name)),
            &["--state-dir", &state_arg],
            "info",
        )
        .await;
        use std::os::unix::fs::PermissionsExt;
        for p in [agent.dir.path(), agent.socket.parent().unwrap()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The vault's directory stays 0700 root: the member gets EACCES on the vault file.
        let uid = 64_000 + std::process::id() % 1000;
        let member = vec![
            format!("--reuid={uid}"),
            "--regid=64999".to_owned(),
            format!("--groups={}", group.gid),
        ];
        let out = secret(&agent, vault.path(), &member, &["set", "app/token"], VALUE).await;
        assert!(ok(&out).contains("through the agent"));
        let out = secret(&agent, vault.path(), &member, &["list"], b"").await;
        assert!(ok(&out).contains("app/token"));
        let out = secret(&agent, vault.path(), &member, &["get", "app/token"], b"").await;
        assert!(
            super::text(&out.stderr).contains("agent.api.allow_secret_read"),
            "{}",
            super::text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
        let out = secret(&agent, vault.path(), &member, &["delete", "app/token"], b"").await;
        assert!(ok(&out).contains("deleted app/token"));

        // Not a member: refused by the socket's file mode (or, were it open, its peer check).
        let stranger = vec![
            format!("--reuid={uid}"),
            "--regid=64999".to_owned(),
            "--clear-groups".to_owned(),
        ];
        let out = secret(&agent, vault.path(), &stranger, &["list"], b"").await;
        assert!(!out.status.success());
        assert!(
            super::text(&out.stderr).contains("not readable by this user"),
            "{}",
            super::text(&out.stderr)
        );
    }
}
