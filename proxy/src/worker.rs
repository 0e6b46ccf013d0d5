//! Connection workers: threads that each run a current-thread tokio runtime. The accept
//! loop hands every accepted connection to the next worker in turn, and the connection
//! lives there until it closes: both of its sockets are registered with that worker's own
//! epoll, so the wake-ups its data causes never cross threads (no work stealing, no futex
//! to wake another thread, no task moving between caches).
//!
//! Workers are used when the listener runs inside a multi-thread runtime (the agent). In a
//! current-thread runtime (most tests, some with tokio's paused clock) connections stay on
//! that runtime. `DSO_PROXY_WORKERS=0` in the environment turns them off (a diagnostic
//! switch, like `DSO_SPLICE`); `DSO_PROXY_WORKERS=N` sets their number (default: the
//! cores available to the process).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Handle, RuntimeFlavor};
use tracing::warn;

/// The worker runtimes of the process, started at the first connection that needs one.
struct Workers {
    handles: Vec<Handle>,
    /// Round-robin position.
    next: AtomicUsize,
}

static WORKERS: OnceLock<Option<Workers>> = OnceLock::new();

/// The runtime a newly accepted connection should run on: the next worker, or `None` to
/// stay on the current runtime (a current-thread one, or workers turned off).
pub(crate) fn pick() -> Option<&'static Handle> {
    let current = Handle::try_current().ok()?;
    if current.runtime_flavor() != RuntimeFlavor::MultiThread {
        return None;
    }
    let workers = WORKERS.get_or_init(start).as_ref()?;
    let i = workers.next.fetch_add(1, Ordering::Relaxed) % workers.handles.len();
    workers.handles.get(i)
}

fn start() -> Option<Workers> {
    let n = match std::env::var("DSO_PROXY_WORKERS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) => n,
            Err(_) => {
                warn!(value = %v, "DSO_PROXY_WORKERS is not a number; using one worker per core");
                cores()
            }
        },
        Err(_) => cores(),
    };
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "cannot start a proxy worker runtime; connections stay on the caller's runtime");
                return None;
            }
        };
        let handle = rt.handle().clone();
        let started = std::thread::Builder::new()
            .name(format!("dso-proxy-{i}"))
            .spawn(move || rt.block_on(std::future::pending::<()>()));
        if let Err(e) = started {
            warn!(error = %e, "cannot start a proxy worker thread; connections stay on the caller's runtime");
            return None;
        }
        handles.push(handle);
    }
    (!handles.is_empty()).then(|| Workers {
        handles,
        next: AtomicUsize::new(0),
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    /// Under a multi-thread runtime connections go to the named worker threads, in turn;
    /// under a current-thread runtime (the paused-clock tests) they stay where they are.
    #[test]
    fn workers_serve_only_multi_thread_runtimes_and_take_turns() {
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(current.block_on(async { super::pick().is_none() }));
        if std::env::var_os("DSO_PROXY_WORKERS").is_some() {
            eprintln!("DSO_PROXY_WORKERS is set: the default worker set is not checked");
            return;
        }
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let names = multi.block_on(async {
            let mut names = Vec::new();
            // Eight in a row: other tests of this binary may take turns in between.
            for _ in 0..8 {
                let worker = super::pick().expect("a worker under a multi-thread runtime");
                let name = worker
                    .spawn(async { std::thread::current().name().map(str::to_owned) })
                    .await
                    .unwrap();
                names.push(name.unwrap_or_default());
            }
            names
        });
        assert!(names.iter().all(|n| n.starts_with("dso-proxy-")), "{names:?}");
        let distinct: std::collections::BTreeSet<_> = names.iter().collect();
        if super::cores() > 1 {
            assert!(
                distinct.len() > 1,
                "eight connections in a row went to one worker: {names:?}"
            );
        }
    }
}
