//! `dso-init`: placeholder until the launcher lands (issue 10). Refuses to run.

fn main() -> std::process::ExitCode {
    eprintln!("dso-init: not built yet");
    std::process::ExitCode::from(127)
}
