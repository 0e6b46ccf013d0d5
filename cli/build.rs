//! Build facts for `dso version`: the git commit (when built from a git checkout, or given
//! as `DSO_GIT_COMMIT`) and the target triple.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DSO_GIT_COMMIT");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=DSO_BUILD_TARGET={target}");
    let commit = std::env::var("DSO_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    if let Some(c) = commit {
        println!("cargo:rustc-env=DSO_GIT_COMMIT={c}");
    }
    // Rebuild when HEAD moves: HEAD itself (a branch switch) and the branch's ref (a
    // commit). `--git-path` finds both in a worktree too.
    for path in [Some("HEAD".to_owned()), git(&["symbolic-ref", "-q", "HEAD"])]
        .into_iter()
        .flatten()
    {
        watch(git(&["rev-parse", "--git-path", &path]));
    }
    watch(git(&["rev-parse", "--git-path", "packed-refs"]));
}

/// Reruns this script when `path` changes; a path that does not exist would rerun it at
/// every build, so it is left out.
fn watch(path: Option<String>) {
    if let Some(p) = path.filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={p}");
    }
}

/// One line of git's output, `None` when git is missing or fails (a source tarball).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
