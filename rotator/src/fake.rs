//! An in-memory [`Engine`] for tests of rotation logic without a daemon. Containers get
//! addresses on `127.0.0.x`; the tests decide whether anything listens there.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::{CloneSpec, Container, DockerHealth, Engine, EngineError, EventStream};

type Fut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, EngineError>> + Send + 'a>>;

#[derive(Debug, Default)]
pub(crate) struct Fake {
    pub containers: Mutex<BTreeMap<String, Container>>,
    /// Calls in order, e.g. `remove abc`.
    pub calls: Mutex<Vec<String>>,
    /// Makes `create_clone` fail.
    pub fail_create: bool,
    /// Health that started clones report.
    pub clone_health: Option<DockerHealth>,
    /// Makes the next `remove` fail once.
    pub fail_remove_once: std::sync::atomic::AtomicBool,
    /// How many times the managed containers were listed (one per scan).
    pub lists: std::sync::atomic::AtomicUsize,
    pub seq: Mutex<u32>,
    /// Makes `exec` never answer (a hung probe); the caller's timeout ends it.
    pub exec_hangs: bool,
    /// Makes `is_local` false: the engine is remote (bind mounts do not reach it).
    pub remote: bool,
    /// Tmpfs volumes created: name → (size in bytes, labels).
    pub volumes: Mutex<BTreeMap<String, FakeVolume>>,
    /// Every `put_archive` accepted (into a running container), in order.
    pub uploads: Mutex<Vec<Upload>>,
}

/// A tmpfs volume of the fake: (size in bytes, labels).
pub(crate) type FakeVolume = (u64, Vec<(String, String)>);

/// One `put_archive` the fake received.
#[derive(Debug)]
pub(crate) struct Upload {
    /// The container as the caller named it.
    pub id: String,
    /// The extraction path.
    pub path: String,
    /// The archive bytes (zeroed on drop, as the caller's buffer is).
    pub archive: zeroize::Zeroizing<Vec<u8>>,
}

impl Fake {
    pub fn add(&self, id: &str, name: &str, labels: &[(&str, &str)], running: bool) {
        let c = Container {
            id: id.to_owned(),
            name: name.to_owned(),
            image: "app".into(),
            image_id: "sha256:app".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running,
            health: DockerHealth::Healthy,
            networks: BTreeMap::from([("bridge".to_owned(), Some("127.0.0.9".parse().unwrap()))]),
            publishes_ports: false,
            auto_remove: false,
            mounts: vec![],
            process: Default::default(),
        };
        self.containers.lock().unwrap().insert(id.to_owned(), c);
    }

    pub fn names(&self) -> Vec<(String, bool)> {
        self.containers
            .lock()
            .unwrap()
            .values()
            .map(|c| (c.name.clone(), c.running))
            .collect()
    }

    fn call(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }

    fn with<T>(&self, id: &str, op: &str, f: impl FnOnce(&mut Container) -> T) -> Result<T, EngineError> {
        let mut cs = self.containers.lock().unwrap();
        let c = cs
            .values_mut()
            .find(|c| c.id == id || c.name == id)
            .ok_or_else(|| EngineError {
                op: format!("{op} {id}"),
                status: Some(404),
                message: "no such container".into(),
            })?;
        Ok(f(c))
    }
}

impl Engine for Fake {
    fn list_managed(&self) -> Fut<'_, Vec<Container>> {
        self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(self.containers.lock().unwrap().values().cloned().collect()) })
    }

    fn list_labeled<'a>(&'a self, key: &'a str, value: &'a str) -> Fut<'a, Vec<Container>> {
        Box::pin(async move {
            Ok(self
                .containers
                .lock()
                .unwrap()
                .values()
                .filter(|c| c.labels.get(key).map(String::as_str) == Some(value))
                .cloned()
                .collect())
        })
    }

    fn inspect<'a>(&'a self, id: &'a str) -> Fut<'a, Option<Container>> {
        Box::pin(async move {
            Ok(self
                .containers
                .lock()
                .unwrap()
                .values()
                .find(|c| c.id == id || c.name == id)
                .cloned())
        })
    }

    fn create_clone<'a>(&'a self, spec: &'a CloneSpec) -> Fut<'a, String> {
        Box::pin(async move {
            self.call(format!("create {}", spec.name));
            if self.fail_create {
                return Err(EngineError::new("create", "refused by the fake"));
            }
            let mut c = self.with(&spec.from, "create", |c| c.clone())?;
            let mut n = self.seq.lock().unwrap();
            *n += 1;
            c.id = format!("green{n}");
            c.name = spec.name.clone();
            c.running = false;
            c.health = DockerHealth::Starting;
            for (k, v) in &spec.labels {
                c.labels.insert(k.clone(), v.clone());
            }
            let id = c.id.clone();
            self.containers.lock().unwrap().insert(id.clone(), c);
            Ok(id)
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("start {id}"));
            let h = self.clone_health.unwrap_or(DockerHealth::Healthy);
            self.with(id, "start", |c| {
                c.running = true;
                if c.id.starts_with("green") {
                    c.health = h;
                }
            })
        })
    }

    fn stop<'a>(&'a self, id: &'a str, _grace: Duration) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("stop {id}"));
            self.with(id, "stop", |c| c.running = false)
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("remove {id}"));
            if self
                .fail_remove_once
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(EngineError::new("remove", "refused once by the fake"));
            }
            self.with(id, "remove", |_| ())?;
            self.containers.lock().unwrap().retain(|_, c| c.id != id);
            Ok(())
        })
    }

    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("rename {id} {name}"));
            self.with(id, "rename", |c| c.name = name.to_owned())
        })
    }

    fn signal<'a>(&'a self, id: &'a str, signal: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("signal {id} {signal}"));
            self.with(id, "signal", |_| ())
        })
    }

    fn exec<'a>(&'a self, id: &'a str, _cmd: &'a [String], timeout: Duration) -> Fut<'a, i64> {
        Box::pin(async move {
            self.call(format!("exec {id}"));
            if self.exec_hangs {
                tokio::time::sleep(timeout).await;
                return Err(EngineError::new("exec", "timed out (fake)"));
            }
            Ok(0)
        })
    }

    fn events(&self) -> EventStream {
        Box::pin(futures_util::stream::empty())
    }

    fn create_tmpfs_volume<'a>(
        &'a self,
        name: &'a str,
        size_bytes: u64,
        labels: &'a [(String, String)],
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("create_tmpfs_volume {name} {size_bytes}"));
            let mut vs = self.volumes.lock().unwrap();
            match vs.get(name) {
                // As the real engine: the same volume again is fine, another one is refused.
                Some((size, _)) if *size != size_bytes => Err(EngineError::new(
                    format!("create tmpfs volume {name}"),
                    "a volume of that name already exists with other options (fake)",
                )),
                Some(_) => Ok(()),
                None => {
                    vs.insert(name.to_owned(), (size_bytes, labels.to_vec()));
                    Ok(())
                }
            }
        })
    }

    fn remove_volume<'a>(&'a self, name: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("remove_volume {name}"));
            self.volumes.lock().unwrap().remove(name);
            Ok(())
        })
    }

    fn put_archive<'a>(&'a self, id: &'a str, path: &'a str, archive: &'a [u8]) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("put_archive {id} {path} {}", archive.len()));
            // As the real engine: refused unless the container runs (the fake does not model
            // which volume is mounted where).
            if !self.with(id, "copy archive into", |c| c.running)? {
                return Err(EngineError::new(
                    "copy archive into",
                    "the container is not running (fake)",
                ));
            }
            self.uploads.lock().unwrap().push(Upload {
                id: id.to_owned(),
                path: path.to_owned(),
                archive: zeroize::Zeroizing::new(archive.to_vec()),
            });
            Ok(())
        })
    }

    fn is_local(&self) -> bool {
        !self.remote
    }

    fn put_launcher<'a>(&'a self, id: &'a str, archive: &'a [u8]) -> Fut<'a, ()> {
        Box::pin(async move {
            self.call(format!("put_launcher {id} {}", archive.len()));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_fake_records_volumes_and_uploads_and_refuses_a_stopped_container() {
        let f = Fake {
            remote: true,
            ..Fake::default()
        };
        assert!(!f.is_local());
        f.add("c1", "app-1", &[], false);
        let labels = [("dso.delivery.instance".to_owned(), "i1".to_owned())];
        f.create_tmpfs_volume("v1", 4096, &labels).await.unwrap();
        f.create_tmpfs_volume("v1", 4096, &labels).await.unwrap();
        assert!(f.create_tmpfs_volume("v1", 8192, &labels).await.is_err());
        assert!(
            f.put_archive("c1", "/run/secrets", b"before").await.is_err(),
            "not running"
        );
        f.start("c1").await.unwrap();
        f.put_archive("c1", "/run/secrets", b"after").await.unwrap();
        assert!(
            f.put_archive("nope", "/run/secrets", b"x")
                .await
                .unwrap_err()
                .is_not_found()
        );
        let ups = std::mem::take(&mut *f.uploads.lock().unwrap());
        let seen: Vec<_> = ups
            .iter()
            .map(|u| (u.id.as_str(), u.path.as_str(), u.archive.as_slice()))
            .collect();
        assert_eq!(seen, [("c1", "/run/secrets", &b"after"[..])]);
        let calls = f.calls.lock().unwrap().clone();
        assert_eq!(
            calls.iter().filter(|c| c.starts_with("put_archive c1")).count(),
            2
        );
        assert_eq!(f.volumes.lock().unwrap()["v1"], (4096, labels.to_vec()));
        f.remove_volume("v1").await.unwrap();
        f.remove_volume("v1").await.unwrap();
        assert!(f.volumes.lock().unwrap().is_empty());
    }
}
