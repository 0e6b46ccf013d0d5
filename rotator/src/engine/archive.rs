//! The remote-engine delivery calls on bollard: tmpfs-backed named volumes and
//! CopyToContainer (`PUT /containers/{id}/archive`) of an in-memory archive into one.
//!
//! Measured on Engine 20.10 (docs/injection.md): a local-driver volume with `type=tmpfs` is
//! mounted when the first container using it starts and unmounted when the last one stops,
//! so an archive must be uploaded while the container runs; an upload into a stopped
//! container answers 200 and the files are gone. `docker volume create` of an existing name
//! answers with the existing volume whatever options it was asked for, so the answer is
//! checked: a secret must never go into a volume that is not a tmpfs. Before an upload the
//! container is inspected: it must run and have a local tmpfs volume mounted exactly at the
//! target path, or nothing is sent.

use std::collections::HashMap;

use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{RemoveVolumeOptionsBuilder, UploadToContainerOptionsBuilder};
use zeroize::Zeroizing;

use super::docker::err;
use super::{DockerEngine, EngineError, short};

/// The local driver's options of a delivery volume of `size_bytes`: a tmpfs readable only
/// through the files' own modes (0711), no devices, no set-uid, nothing executable.
pub(super) fn tmpfs_opts(size_bytes: u64) -> HashMap<String, String> {
    HashMap::from([
        ("type".to_owned(), "tmpfs".to_owned()),
        ("device".to_owned(), "tmpfs".to_owned()),
        (
            "o".to_owned(),
            format!("size={size_bytes},mode=0711,nosuid,nodev,noexec"),
        ),
    ])
}

/// Whether an engine on a local socket runs in a namespace or VM of its own (rootless,
/// Docker Desktop), from `docker info`'s `OperatingSystem` and `SecurityOptions`: then this
/// host's directories are not what it bind-mounts, and delivery takes the remote path.
pub(super) fn runs_apart(os: Option<&str>, security: Option<&[String]>) -> bool {
    os.is_some_and(|o| o.contains("Docker Desktop"))
        || security.is_some_and(|s| s.iter().any(|o| o.split(',').any(|kv| kv == "name=rootless")))
}

impl DockerEngine {
    pub(super) async fn create_tmpfs_volume_call(
        &self,
        name: &str,
        size_bytes: u64,
        labels: &[(String, String)],
    ) -> Result<(), EngineError> {
        let op = format!("create tmpfs volume {name}");
        if size_bytes == 0 {
            // size=0 means "no limit" to tmpfs: half the host's RAM.
            return Err(EngineError::new(
                op,
                "size 0 would be an unbounded tmpfs; give a size",
            ));
        }
        let opts = tmpfs_opts(size_bytes);
        let req = VolumeCreateRequest {
            name: Some(name.to_owned()),
            driver: Some("local".to_owned()),
            driver_opts: Some(opts.clone()),
            labels: Some(labels.iter().cloned().collect()),
            ..Default::default()
        };
        let v = self.docker.create_volume(req).await.map_err(|e| err(&op, e))?;
        // An existing volume of that name comes back unchanged: it must be what we asked for.
        let driver = v.driver.as_str();
        let got = v.options;
        if driver != "local" || got != opts {
            return Err(EngineError::new(
                op,
                format!(
                    "a volume of that name already exists with driver {driver:?} and options {got:?}, not a tmpfs of {size_bytes} bytes; remove it (`docker volume rm {name}`) or let dso pick another name"
                ),
            ));
        }
        Ok(())
    }

    pub(super) async fn remove_volume_call(&self, name: &str) -> Result<(), EngineError> {
        let opts = RemoveVolumeOptionsBuilder::new().force(false).build();
        match self.docker.remove_volume(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = err(format!("remove volume {name}"), e);
                if e.is_not_found() { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Refuses, before any byte is sent, an upload that would not stay in RAM: into a
    /// container that is not running (the engine answers success and the files are lost)
    /// or into a path where no local-driver tmpfs volume is mounted (the bytes would land
    /// in the overlay upper directory on disk, also under a `--tmpfs` mount).
    async fn check_tmpfs_target(&self, id: &str, path: &str, op: &str) -> Result<(), EngineError> {
        let c = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| err(op, e))?;
        if c.state.and_then(|s| s.running) != Some(true) {
            return Err(EngineError::new(
                op,
                "the container is not running: the engine would accept the archive and lose it (a tmpfs volume is mounted only while its container runs); upload after the start",
            ));
        }
        let want = path.trim_end_matches('/');
        let volume = c
            .mounts
            .unwrap_or_default()
            .into_iter()
            .find(|m| m.destination.as_deref().map(|d| d.trim_end_matches('/')) == Some(want))
            .filter(|m| m.typ.as_deref() == Some("volume"))
            .and_then(|m| m.name);
        let Some(volume) = volume else {
            return Err(EngineError::new(
                op,
                "no volume is mounted at that path: the files would land in the container's writable layer on disk; mount a dso tmpfs volume there",
            ));
        };
        let v = self
            .docker
            .inspect_volume(&volume)
            .await
            .map_err(|e| err(format!("{op}: inspect volume {volume}"), e))?;
        let opt = |k: &str| v.options.get(k).map(String::as_str);
        if v.driver != "local" || opt("type") != Some("tmpfs") || opt("device") != Some("tmpfs") {
            return Err(EngineError::new(
                op,
                format!(
                    "volume {volume} mounted there is not a local tmpfs volume (driver {:?}); the files would be on disk",
                    v.driver
                ),
            ));
        }
        Ok(())
    }

    /// The launcher's archive into `/` of a created container (no tmpfs check: nothing
    /// secret is in it).
    pub(super) async fn put_launcher_call(&self, id: &str, archive: &[u8]) -> Result<(), EngineError> {
        let op = format!("copy the launcher into {}", short(id));
        let opts = UploadToContainerOptionsBuilder::new().path("/").build();
        let body = bytes::Bytes::from(archive.to_vec());
        let stream = futures_util::stream::once(std::future::ready(body));
        self.docker
            .upload_to_container(id, Some(opts), bollard::body_stream(stream))
            .await
            .map_err(|e| err(&op, e))
    }

    pub(super) async fn put_archive_call(
        &self,
        id: &str,
        path: &str,
        archive: &[u8],
    ) -> Result<(), EngineError> {
        let op = format!("copy archive into {}:{path}", short(id));
        if !path.starts_with('/') {
            return Err(EngineError::new(op, "the target path must be absolute"));
        }
        self.check_tmpfs_target(id, path, &op).await?;
        let opts = UploadToContainerOptionsBuilder::new()
            .path(path)
            // An entry that would replace a directory with a file (or back) is an error,
            // not a silent replacement.
            .no_overwrite_dir_non_dir("true")
            .build();
        // The body must be `'static`: one copy, in a buffer zeroed when hyper drops it.
        let body = bytes::Bytes::from_owner(Zeroizing::new(archive.to_vec()));
        // A streamed body: bollard traces a full body's bytes at `trace` level, a stream
        // only as "(stream)".
        let stream = futures_util::stream::once(std::future::ready(body));
        self.docker
            .upload_to_container(id, Some(opts), bollard::body_stream(stream))
            .await
            .map_err(|e| err(&op, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_options_make_a_bounded_locked_down_tmpfs() {
        let o = tmpfs_opts(1 << 20);
        assert_eq!(o["type"], "tmpfs");
        assert_eq!(o["device"], "tmpfs");
        assert_eq!(o["o"], "size=1048576,mode=0711,nosuid,nodev,noexec");
    }

    #[test]
    fn rootless_and_desktop_engines_run_apart_from_this_host() {
        let sec = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // What Engine 20.10 on this machine answers.
        assert!(!runs_apart(
            Some("Debian GNU/Linux 12 (bookworm)"),
            Some(&sec(&["name=seccomp,profile=default"]))
        ));
        assert!(runs_apart(
            Some("Ubuntu 22.04"),
            Some(&sec(&[
                "name=seccomp,profile=default",
                "name=rootless",
                "name=cgroupns"
            ]))
        ));
        assert!(runs_apart(Some("Docker Desktop"), None));
        assert!(!runs_apart(None, None));
    }
}
