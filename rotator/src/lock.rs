//! One rotation per service at a time, within the agent and across processes.
//!
//! Inside the agent, [`Queue`] runs rotations of a service one after the other: a request
//! that arrives while one runs waits, and requests that arrive while one already waits are
//! merged into it (their environment changes combined, the last strategy wins) and all get
//! its result. Nothing is dropped or reported done before it is.
//!
//! Across processes (two agents on one state directory, or a CLI acting directly),
//! [`ServiceLock`] holds an exclusive `flock` on `STATE/locks/SERVICE.lock` for the whole
//! rotation. The kernel releases it when the process dies, so a killed agent never leaves
//! a stale lock.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use tokio::sync::oneshot;
use tracing::{error, info};

use crate::labels::ServiceKey;

/// An exclusive lock on a service across processes; released on drop.
#[derive(Debug)]
pub struct ServiceLock {
    file: File,
}

impl ServiceLock {
    /// Takes the lock on `service` if it is free now; `None` while another holder (a live
    /// process, or another rotation of this one) has it.
    pub fn try_acquire(state_dir: &Path, service: &ServiceKey) -> io::Result<Option<ServiceLock>> {
        let file = lock_file(state_dir, service)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ServiceLock { file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Waits until the lock on `service` is free and takes it.
    pub async fn acquire(state_dir: &Path, service: &ServiceKey) -> io::Result<ServiceLock> {
        let mut logged = false;
        loop {
            if let Some(lock) = Self::try_acquire(state_dir, service)? {
                return Ok(lock);
            }
            if !logged {
                info!(service = %service, "waiting for another process's rotation");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn lock_file(state_dir: &Path, service: &ServiceKey) -> io::Result<File> {
    let dir = state_dir.join("locks");
    crate::journal::check_state_dir(&dir)?;
    let path = dir.join(format!("{}.lock", service.file_stem()));
    // Never through a symlink planted at the lock's path.
    crate::journal::open_nofollow(OpenOptions::new().create(true).truncate(false).write(true), &path)
}

impl Drop for ServiceLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// A request waiting for its turn, merged with those that came after it.
struct Waiting<R, T> {
    request: R,
    waiters: Vec<oneshot::Sender<T>>,
}

struct Slot<R, T> {
    running: bool,
    waiting: Option<Waiting<R, T>>,
}

/// Per-service queue with coalescing. `R` is a request, `T` its result.
pub struct Queue<R, T> {
    slots: Mutex<HashMap<ServiceKey, Slot<R, T>>>,
}

impl<R, T> Default for Queue<R, T> {
    fn default() -> Self {
        Queue {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<R, T> std::fmt::Debug for Queue<R, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl<R: Send + 'static, T: Clone + Send + 'static> Queue<R, T> {
    /// Whether a rotation of `service` runs now.
    pub fn is_busy(&self, service: &ServiceKey) -> bool {
        self.lock().get(service).is_some_and(|s| s.running)
    }

    /// Runs `request` for `service` through `run`, after any rotation in progress.
    /// `merge(waiting, new)` folds a later request into one already waiting. The work runs
    /// in a spawned task, so a caller that goes away does not stop it. `None` when `run`
    /// panicked (a bug); the queue goes on with the next request.
    pub async fn submit<F, Fut>(
        self: &Arc<Self>,
        service: ServiceKey,
        request: R,
        merge: fn(&mut R, R),
        run: F,
    ) -> Option<T>
    where
        F: Fn(R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut slots = self.lock();
            let slot = slots.entry(service.clone()).or_insert(Slot {
                running: false,
                waiting: None,
            });
            match &mut slot.waiting {
                Some(w) => {
                    info!(service = %service, "rotation request merged into the queued one");
                    merge(&mut w.request, request);
                    w.waiters.push(tx);
                }
                None => {
                    slot.waiting = Some(Waiting {
                        request,
                        waiters: vec![tx],
                    });
                    if slot.running {
                        info!(service = %service, "rotation request queued behind the running one");
                    }
                }
            }
            let start = !slot.running;
            slot.running = true;
            start
        };
        if start {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.drive(service, run).await });
        }
        rx.await.ok()
    }

    /// Runs waiting requests of `service` until none is left.
    async fn drive<F, Fut>(self: Arc<Self>, service: ServiceKey, run: F)
    where
        F: Fn(R) -> Fut,
        Fut: Future<Output = T>,
    {
        loop {
            let next = {
                let mut slots = self.lock();
                let slot = slots.get_mut(&service).expect("slot of a running service");
                match slot.waiting.take() {
                    Some(w) => w,
                    None => {
                        slots.remove(&service);
                        return;
                    }
                }
            };
            match AssertUnwindSafe(run(next.request)).catch_unwind().await {
                Ok(result) => {
                    for w in next.waiters {
                        let _ = w.send(result.clone());
                    }
                }
                // Dropping the senders tells every waiter.
                Err(_) => error!(service = %service, "rotation task panicked"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceKey, Slot<R, T>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(s: &str) -> ServiceKey {
        ServiceKey {
            project: "p".into(),
            service: s.into(),
        }
    }

    #[test]
    fn a_symlink_at_the_lock_path_is_refused_and_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::fs::create_dir(dir.path().join("locks")).unwrap();
        let path = dir
            .path()
            .join("locks")
            .join(format!("{}.lock", key("web").file_stem()));
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = ServiceLock::try_acquire(dir.path(), &key("web"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("symlink") && e.contains(&path.display().to_string()),
            "{e}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert!(
            ServiceLock::try_acquire(dir.path(), &key("api"))
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn requests_during_a_rotation_are_queued_and_coalesced() {
        let q: Arc<Queue<Vec<u32>, Vec<u32>>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let run = {
            let runs = runs.clone();
            let gate = gate.clone();
            move |r: Vec<u32>| {
                let runs = runs.clone();
                let gate = gate.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    r
                }
            }
        };
        let merge: fn(&mut Vec<u32>, Vec<u32>) = |a, b| a.extend(b);
        let first = tokio::spawn({
            let q = q.clone();
            let run = run.clone();
            async move { q.submit(key("web"), vec![1], merge, run).await.unwrap() }
        });
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(q.is_busy(&key("web")));
        let mut later = Vec::new();
        for i in 2..5 {
            let q = q.clone();
            let run = run.clone();
            later.push(tokio::spawn(async move {
                q.submit(key("web"), vec![i], merge, run).await
            }));
            tokio::task::yield_now().await;
        }
        // Another service is not blocked by web.
        let other = tokio::spawn({
            let q = q.clone();
            let run = run.clone();
            async move { q.submit(key("db"), vec![9], merge, run).await.unwrap() }
        });
        gate.add_permits(3);
        assert_eq!(first.await.unwrap(), vec![1]);
        assert_eq!(other.await.unwrap(), vec![9]);
        for h in later {
            assert_eq!(
                h.await.unwrap(),
                Some(vec![2, 3, 4]),
                "every later request gets the merged result"
            );
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "one run for web, one merged run, one for db"
        );
        assert!(!q.is_busy(&key("web")));
    }

    #[tokio::test]
    async fn a_panicking_rotation_answers_none_and_the_queue_goes_on() {
        let q: Arc<Queue<u32, u32>> = Arc::default();
        let merge: fn(&mut u32, u32) = |a, b| *a = b;
        let run = |r: u32| async move {
            assert!(r != 0, "boom");
            r
        };
        assert_eq!(q.submit(key("web"), 0, merge, run).await, None);
        assert_eq!(q.submit(key("web"), 7, merge, run).await, Some(7));
        assert!(!q.is_busy(&key("web")));
    }

    #[tokio::test]
    async fn the_file_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = ServiceLock::acquire(dir.path(), &key("web")).await.unwrap();
        let second = tokio::time::timeout(
            Duration::from_millis(200),
            ServiceLock::acquire(dir.path(), &key("web")),
        )
        .await;
        assert!(
            second.is_err(),
            "a second lock was granted while the first was held"
        );
        drop(a);
        let b = tokio::time::timeout(
            Duration::from_secs(2),
            ServiceLock::acquire(dir.path(), &key("web")),
        )
        .await;
        assert!(b.is_ok());
    }
}
