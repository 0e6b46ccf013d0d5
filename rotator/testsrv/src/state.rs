//! The state shared by the listeners and the signal handler: who this instance is, whether
//! it reports healthy, how many reloads (SIGHUP) it has seen and what it read at the last one.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a reload read from the reload file: its bytes, or the error (`PATH: cause`).
pub type Reloaded = Result<Vec<u8>, String>;

/// Shared state of one test server process.
#[derive(Debug)]
pub struct State {
    /// Named in the TCP greeting and at `GET /id`, so a test knows which container served it.
    instance_id: String,
    /// When the server started; health is measured from here.
    started: Instant,
    /// Unhealthy until this long after `started` (a slow-starting service).
    healthy_after: Duration,
    /// Never healthy, whatever `POST /health/ok` says (a green that must be rolled back).
    never_healthy: bool,
    /// Set by `POST /health/fail`, cleared by `POST /health/ok`.
    failed: AtomicBool,
    /// SIGHUPs received: a test of the `signal` strategy reads it at `GET /reloads`.
    reloads: AtomicU64,
    /// The file read at each reload (`RELOAD_FILE`), so a test sees what was in it when the
    /// signal arrived.
    reload_file: Option<PathBuf>,
    /// What the last reload read from `reload_file`; `None` before the first.
    reloaded: Mutex<Option<Reloaded>>,
    /// Unhealthy while this file's trimmed content equals the text (`HEALTH_FILE` and
    /// `UNHEALTHY_IF`): a secret value that makes the application unhealthy.
    health_file: Option<(PathBuf, String)>,
}

impl State {
    /// Creates the state at server start.
    pub fn new(instance_id: String, healthy_after: Duration, never_healthy: bool) -> Self {
        Self {
            instance_id,
            started: Instant::now(),
            healthy_after,
            never_healthy,
            failed: AtomicBool::new(false),
            reloads: AtomicU64::new(0),
            reload_file: None,
            reloaded: Mutex::new(None),
            health_file: None,
        }
    }

    /// Reads `path` at every reload from now on.
    pub fn with_reload_file(mut self, path: Option<PathBuf>) -> Self {
        self.reload_file = path;
        self
    }

    /// Reports unhealthy while `path`'s trimmed content equals `text`.
    pub fn with_health_file(mut self, rule: Option<(PathBuf, String)>) -> Self {
        self.health_file = rule;
        self
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Whether `GET /health` answers 200 now.
    pub fn is_healthy(&self) -> bool {
        !self.never_healthy
            && !self.failed.load(Ordering::Relaxed)
            && self.started.elapsed() >= self.healthy_after
            && !self.health_file_says_unhealthy()
    }

    /// True while the health file holds the unhealthy text (a missing file does not).
    fn health_file_says_unhealthy(&self) -> bool {
        self.health_file.as_ref().is_some_and(|(path, text)| {
            std::fs::read(path).is_ok_and(|b| String::from_utf8_lossy(&b).trim() == text)
        })
    }

    /// Forces the health endpoint to 503 (`true`) or back to normal (`false`).
    pub fn set_failed(&self, failed: bool) {
        self.failed.store(failed, Ordering::Relaxed);
    }

    /// Reads the reload file (when set), then counts one reload and logs it (never the
    /// content); returns the new count.
    pub fn reload(&self) -> u64 {
        if let Some(path) = &self.reload_file {
            let read = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
            *self.reloaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(read);
        }
        let n = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!("dso-testsrv {}: reloaded (count {n})", self.instance_id);
        n
    }

    /// What the last reload read from the reload file; `None` before the first reload or
    /// without a reload file.
    pub fn reloaded(&self) -> Option<Reloaded> {
        self.reloaded.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads seen so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_delay_and_overrides() {
        let s = State::new("a".into(), Duration::ZERO, false);
        assert!(s.is_healthy());
        s.set_failed(true);
        assert!(!s.is_healthy());
        s.set_failed(false);
        assert!(s.is_healthy());

        assert!(!State::new("b".into(), Duration::from_secs(3600), false).is_healthy());

        let never = State::new("c".into(), Duration::ZERO, true);
        never.set_failed(false);
        assert!(!never.is_healthy());
    }

    #[test]
    fn reloads_count() {
        let s = State::new("a".into(), Duration::ZERO, false);
        assert_eq!((s.reload(), s.reload(), s.reloads()), (1, 2, 2));
    }

    #[test]
    fn reload_reads_the_file_as_it_is_at_the_signal() {
        let d = std::env::temp_dir().join(format!("dso-testsrv-reload-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("config");
        let s = State::new("a".into(), Duration::ZERO, false).with_reload_file(Some(f.clone()));
        assert_eq!(s.reloaded(), None);
        s.reload();
        assert!(s.reloaded().unwrap().unwrap_err().contains("config"));
        std::fs::write(&f, b"v1").unwrap();
        s.reload();
        std::fs::write(&f, b"v2").unwrap();
        // Still what was read at the last signal, not what the file holds now.
        assert_eq!(s.reloaded(), Some(Ok(b"v1".to_vec())));
        s.reload();
        assert_eq!((s.reloaded(), s.reloads()), (Some(Ok(b"v2".to_vec())), 3));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn health_file_with_the_text_makes_it_unhealthy() {
        let d = std::env::temp_dir().join(format!("dso-testsrv-health-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("password");
        let s = State::new("a".into(), Duration::ZERO, false)
            .with_health_file(Some((f.clone(), "bad-value".into())));
        assert!(s.is_healthy(), "a missing file is not the unhealthy text");
        std::fs::write(&f, b"bad-value\n").unwrap();
        assert!(!s.is_healthy());
        std::fs::write(&f, b"good-value").unwrap();
        assert!(s.is_healthy());
        s.set_failed(true);
        assert!(!s.is_healthy(), "the other rules still apply");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
