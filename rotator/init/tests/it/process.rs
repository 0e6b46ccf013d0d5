//! `dso-init` as a process on this host.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::{environ_value, init, run, stderr};

#[test]
fn values_reach_the_program_byte_for_byte_and_override_inherited() {
    let d = tempfile::tempdir().unwrap();
    let tricky: &[u8] = b"first line\nsecond $HOME `x` \"dq\" 'sq' \\ \xc3\xa9\x01\xff\n";
    std::fs::write(d.path().join("DB_PASSWORD"), tricky).unwrap();
    std::fs::write(d.path().join("EMPTY"), b"").unwrap();
    std::fs::write(d.path().join("INHERITED"), b"from-the-dir").unwrap();
    std::fs::write(d.path().join(".dso-ready"), b"").unwrap();

    // `cat /proc/self/environ` shows exactly what the exec'd program received.
    let out = run(init(d.path(), &["--", "cat", "/proc/self/environ"])
        .env("INHERITED", "from-the-parent")
        .env("KEPT", "kept"));
    assert!(out.status.success(), "{}", stderr(&out));
    let env = &out.stdout;
    assert_eq!(environ_value(env, "DB_PASSWORD"), Some(tricky));
    assert_eq!(environ_value(env, "EMPTY"), Some(&b""[..]));
    assert_eq!(environ_value(env, "INHERITED"), Some(&b"from-the-dir"[..]));
    assert_eq!(environ_value(env, "KEPT"), Some(&b"kept"[..]));
    assert_eq!(environ_value(env, ".dso-ready"), None);
    let count = env
        .split(|&b| b == 0)
        .filter(|e| e.starts_with(b"INHERITED="))
        .count();
    assert_eq!(count, 1, "a variable from the dir replaces the inherited one");
}

#[test]
fn program_arguments_pass_untouched() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&mut init(
        d.path(),
        &[
            "--",
            "sh",
            "-c",
            "printf '%s|' \"$0\" \"$@\"",
            "zero",
            "--wait",
            "a b",
            "",
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"zero|--wait|a b||");
}

#[test]
fn exec_keeps_the_pid() {
    let d = tempfile::tempdir().unwrap();
    let child = init(d.path(), &["--", "sh", "-c", "echo $$"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), pid.to_string());
}

#[test]
fn program_inherits_signal_state_as_if_started_directly() {
    // The Rust runtime ignores SIGPIPE in dso-init itself; the application must not inherit
    // that: its ignored and blocked sets are those of the same program started directly.
    let signals = |out: std::process::Output| {
        assert!(out.status.success(), "{}", stderr(&out));
        let status = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<String> = status
            .lines()
            .filter(|l| l.starts_with("SigIgn:") || l.starts_with("SigBlk:"))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 2, "{status}");
        lines
    };
    let d = tempfile::tempdir().unwrap();
    let through = signals(run(&mut init(d.path(), &["--", "cat", "/proc/self/status"])));
    let direct = signals(run(std::process::Command::new("cat").arg("/proc/self/status")));
    assert_eq!(through, direct);
    // SIGPIPE (13) is bit 12 of the ignored set.
    let ignored = through.iter().find(|l| l.starts_with("SigIgn:")).unwrap();
    let ignored = u64::from_str_radix(ignored.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(ignored & (1 << 12), 0, "SIGPIPE ignored in the application");
}

#[test]
fn exit_status_is_the_programs() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&mut init(d.path(), &["--", "sh", "-c", "exit 7"]));
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn wait_for_holds_the_start_until_the_file_appears() {
    let d = tempfile::tempdir().unwrap();
    let env = d.path().join("env");
    let ready = env.join(".dso-ready");
    let started = Instant::now();
    let child = init(
        &env,
        &[
            "--wait-for",
            ready.to_str().unwrap(),
            "--wait",
            "10s",
            "--",
            "cat",
            "/proc/self/environ",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Neither the directory nor the marker exist yet: the remote path uploads them later.
    std::thread::sleep(Duration::from_millis(400));
    std::fs::create_dir(&env).unwrap();
    std::fs::write(env.join("TOKEN"), b"late").unwrap();
    std::fs::write(&ready, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(environ_value(&out.stdout, "TOKEN"), Some(&b"late"[..]));
}

#[test]
fn wait_for_times_out_with_125_naming_path_and_wait() {
    let d = tempfile::tempdir().unwrap();
    let ready = d.path().join(".dso-ready");
    let started = Instant::now();
    let out = run(&mut init(
        d.path(),
        &[
            "--wait-for",
            ready.to_str().unwrap(),
            "--wait",
            "300ms",
            "--",
            "true",
        ],
    ));
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.starts_with("dso-init: "), "{err}");
    assert!(
        err.contains(ready.to_str().unwrap()) && err.contains("300ms"),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn not_found_is_127_and_not_executable_is_126() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&mut init(d.path(), &["--", "surely-no-such-program-dso"]));
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    assert!(stderr(&out).contains("surely-no-such-program-dso"));
    let out = run(&mut init(d.path(), &["--", "/surely/missing/prog"]));
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));

    let bin = tempfile::tempdir().unwrap();
    let plain = bin.path().join("plain");
    std::fs::write(&plain, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&mut init(d.path(), &["--", plain.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    // A directory is not executable either.
    let out = run(&mut init(d.path(), &["--", bin.path().to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
}

#[test]
fn program_is_searched_in_the_resulting_path() {
    let bin = tempfile::tempdir().unwrap();
    let tool = bin.path().join("dso-test-tool");
    std::fs::write(&tool, b"#!/bin/sh\necho found-by-path\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = tempfile::tempdir().unwrap();
    // PATH delivered through the env dir is the one searched (as the program will see it).
    std::fs::write(d.path().join("PATH"), format!("/bin:{}", bin.path().display())).unwrap();
    let out = run(&mut init(d.path(), &["--", "dso-test-tool"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"found-by-path\n");

    // Without PATH at all, the default one applies.
    let empty = tempfile::tempdir().unwrap();
    let out = run(init(empty.path(), &["--", "sh", "-c", "echo ok"]).env_remove("PATH"));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn bad_file_name_and_nul_content_fail_without_echoing_content() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("DB-PASSWORD"), b"hunter2-value").unwrap();
    let out = run(&mut init(d.path(), &["--", "true"]));
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("DB-PASSWORD") && !err.contains("hunter2"), "{err}");
    assert!(out.stdout.is_empty());

    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("TOKEN"), b"hunter2\0s3cr3tpart").unwrap();
    let out = run(&mut init(d.path(), &["--", "true"]));
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("TOKEN") && err.contains("NUL"), "{err}");
    assert!(!err.contains("hunter2") && !err.contains("s3cr3tpart"), "{err}");
}

#[test]
fn missing_env_dir_is_125_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("no-env");
    let out = run(&mut init(&missing, &["--", "true"]));
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains(missing.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let d = tempfile::tempdir().unwrap();
    let out = run(&mut init(d.path(), &[]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("missing the program"));
    let out = run(&mut init(d.path(), &["--bogus", "--", "true"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--bogus"));

    let out = run(std::process::Command::new(crate::BIN).arg("--help"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: dso-init"));
    let out = run(std::process::Command::new(crate::BIN).arg("--version"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("dso-init "));
}
