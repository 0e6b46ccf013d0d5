//! The rotation journal: one append-only file per service in `STATE/journal/`, one JSON
//! line per step, fsync'ed before the next action starts.
//!
//! *Invariant*: a step is recorded before anything depends on it having happened, and a
//! container the rotation creates carries the rotation ID as a label, so recovery can find
//! it even when the agent died between the create call and its record. A file whose last
//! record is terminal (`done`, `rolled_back`, `recovered`) needs nothing; any other file is
//! an interrupted rotation for [`crate::recovery`].
//!
//! The last finished rotation of each service is kept in `STATE/history/` for status.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::labels::{ServiceKey, Strategy};

/// A step of a rotation, as recorded. Rolling and restart share the names where the
/// meaning is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The rotation is about to act; blue and green's planned name are recorded.
    Begin,
    /// (restart) The listeners hold new connections.
    Paused,
    /// (restart) Blue is stopped.
    BlueStopped,
    /// (restart) Blue is renamed aside, freeing its name for green.
    BlueRenamed,
    /// Green exists (its ID is recorded).
    GreenCreated,
    /// Green is started.
    GreenStarted,
    /// Green passed its health check.
    GreenHealthy,
    /// (rolling) The routes point to green; blue drains.
    Swapped,
    /// (restart) The listeners forward to green again.
    Resumed,
    /// (rolling) Blue's connections are closed or the deadline passed.
    Drained,
    /// Blue is removed.
    BlueRemoved,
    /// (rolling) Green carries the original name.
    GreenRenamed,
    /// Finished: green serves under the original name.
    Done,
    /// Failed before the point of no return; blue serves, green is removed.
    RolledBack,
    /// Finished by recovery after an interruption.
    Recovered,
}

impl Step {
    /// Whether nothing remains to do after this step.
    pub fn is_terminal(self) -> bool {
        matches!(self, Step::Done | Step::RolledBack | Step::Recovered)
    }
}

/// A container as the journal names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// Container ID, once known.
    pub id: Option<String>,
    /// Name the container has (or will get) during the rotation.
    pub name: String,
}

/// One line of a journal file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Rotation ID, unique per agent state directory.
    pub rotation: String,
    /// Service rotated.
    pub service: ServiceKey,
    /// `rolling` or `restart`.
    pub strategy: Strategy,
    /// Step reached.
    pub step: Step,
    /// The original name of the service's container.
    pub original_name: String,
    /// The container being replaced.
    pub blue: Side,
    /// The replacement.
    pub green: Side,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Error that caused a rollback, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The journal directory of an agent.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    history: PathBuf,
}

/// The open journal file of one rotation in progress.
#[derive(Debug)]
pub struct Entry {
    file: File,
    path: PathBuf,
    last: Record,
}

/// The last finished rotation of a service, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Rotation ID.
    pub rotation: String,
    /// Strategy used.
    pub strategy: Strategy,
    /// `done`, `rolled_back`, `recovered`, or `failed`.
    pub result: String,
    /// Error message when it did not succeed.
    pub error: Option<String>,
    /// Start, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Duration in milliseconds.
    pub took_ms: u64,
    /// ID of the container serving afterwards.
    pub container: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Journal {
    /// Opens (creating) `STATE/journal` and `STATE/history`.
    /// The state directory and both subdirectories must pass [`check_state_dir`].
    pub fn open(state_dir: &Path) -> io::Result<Journal> {
        check_state_dir(state_dir)?;
        let dir = state_dir.join("journal");
        let history = state_dir.join("history");
        check_state_dir(&dir)?;
        check_state_dir(&history)?;
        Ok(Journal { dir, history })
    }

    fn path(&self, service: &ServiceKey) -> PathBuf {
        self.dir.join(format!("{}.jsonl", service.file_stem()))
    }

    /// The last readable record of the journal file at `path`, if any.
    fn last_record(path: &Path) -> io::Result<Option<Record>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // A torn last line (killed mid-write) is ignored: the step before it stands.
        Ok(BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Record>(&l).ok())
            .last())
    }

    /// Starts the journal of a rotation with its `Begin` record, replacing the service's
    /// finished one. A file holding another service's record, or an unfinished rotation,
    /// is never truncated: that is an error.
    pub fn begin(&self, first: Record) -> io::Result<Entry> {
        let path = self.path(&first.service);
        if let Some(last) = Self::last_record(&path)? {
            if last.service != first.service {
                return Err(io::Error::other(format!(
                    "{} holds the journal of service {}, not {}",
                    path.display(),
                    last.service,
                    first.service
                )));
            }
            if !last.step.is_terminal() {
                return Err(io::Error::other(format!(
                    "{} holds rotation {} of {} that is not finished (step {:?}); recovery must finish it first",
                    path.display(),
                    last.rotation,
                    last.service,
                    last.step
                )));
            }
        }
        let file = open_nofollow(OpenOptions::new().create(true).write(true).truncate(true), &path)?;
        sync_dir(&self.dir)?;
        let mut e = Entry {
            file,
            path,
            last: first,
        };
        let rec = e.last.clone();
        e.append(rec)?;
        Ok(e)
    }

    /// Reopens the journal of an interrupted rotation, to append recovery records.
    pub fn reopen(&self, last: Record) -> io::Result<Entry> {
        let mut path = self.path(&last.service);
        let legacy = self
            .dir
            .join(format!("{}.jsonl", last.service.legacy_file_stem()));
        if !path.exists() && legacy.exists() {
            // Written by a dso that did not escape names yet.
            path = legacy;
        }
        let torn = fs::read(&path)?.last().is_some_and(|b| *b != b'\n');
        let mut file = open_nofollow(OpenOptions::new().append(true), &path)?;
        if torn {
            // End the torn line so the next record stands on a line of its own.
            file.write_all(b"\n")?;
        }
        Ok(Entry { file, path, last })
    }

    /// The last record of every rotation that did not reach a terminal step.
    pub fn interrupted(&self) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            if let Some(r) = Self::last_record(&path)?
                && !r.step.is_terminal()
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.rotation.cmp(&b.rotation));
        Ok(out)
    }

    /// Stores the last finished rotation of `service` (atomic rename).
    pub fn set_history(&self, service: &ServiceKey, h: &History) -> io::Result<()> {
        let path = self.history.join(format!("{}.json", service.file_stem()));
        let tmp = path.with_extension("json.tmp");
        // A temp file left by a crash, or anything planted there, is unlinked (never
        // followed), and the new one must be a fresh file this call creates.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = open_nofollow(OpenOptions::new().write(true).create_new(true), &tmp)?;
        f.write_all(&serde_json::to_vec_pretty(h).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&self.history)
    }

    /// The last finished rotation of `service`, if any.
    pub fn history(&self, service: &ServiceKey) -> Option<History> {
        let path = self.history.join(format!("{}.json", service.file_stem()));
        let legacy = self.history.join(format!("{}.json", service.legacy_file_stem()));
        let bytes = fs::read(path).or_else(|_| fs::read(legacy)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

impl Entry {
    /// The last record written.
    pub fn last(&self) -> &Record {
        &self.last
    }

    /// Records `step`, with green's ID when it became known, and fsyncs.
    pub fn step(&mut self, step: Step, green_id: Option<&str>) -> io::Result<()> {
        let mut r = self.last.clone();
        r.step = step;
        if let Some(id) = green_id {
            r.green.id = Some(id.to_owned());
        }
        r.error = None;
        self.append(r)
    }

    /// Records a terminal step with the error that led to it.
    pub fn finish(&mut self, step: Step, error: Option<String>) -> io::Result<()> {
        let mut r = self.last.clone();
        r.step = step;
        r.error = error;
        self.append(r)
    }

    fn append(&mut self, mut r: Record) -> io::Result<()> {
        r.at_ms = now_ms();
        let mut line = serde_json::to_vec(&r).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.last = r;
        Ok(())
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Opens `path` with `O_NOFOLLOW`: a symlink at its last component is an error naming it,
/// never followed (the agent runs as root; a link could point at any file).
pub(crate) fn open_nofollow(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    opts.custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(
                e.kind(),
                format!(
                    "{} is a symlink; refusing to write through it (remove the link)",
                    path.display()
                ),
            )
        } else {
            io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
        }
    })
}

/// The effective uid of this process (`/proc/self/status`, second `Uid:` field).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Creates `dir` (mode 0700) when it is missing, then refuses it unless nobody but root or
/// this process's user can replace what is in it: not a symlink, owned by root or the
/// effective uid, and not writable by group or others unless the sticky bit is set. The
/// error names the directory and the fix.
pub fn check_state_dir(dir: &Path) -> io::Result<()> {
    if let Err(e) = fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        return Err(io::Error::new(
            e.kind(),
            format!("creating state directory {}: {e}", dir.display()),
        ));
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("checking state directory {}: {e}", dir.display()),
        )
    })?;
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if meta.file_type().is_symlink() {
        return refuse(format!(
            "state directory {} is a symlink; give the real directory with --state-dir",
            dir.display()
        ));
    }
    if !meta.is_dir() {
        return refuse(format!(
            "state directory {} is not a directory; remove it or choose another --state-dir",
            dir.display()
        ));
    }
    let own = effective_uid().unwrap_or(0);
    if meta.uid() != 0 && meta.uid() != own {
        return refuse(format!(
            "state directory {} belongs to uid {}, not to root or the agent's user (uid {own}); \
             fix its owner (chown {own} {}) or choose another --state-dir",
            dir.display(),
            meta.uid(),
            dir.display()
        ));
    }
    if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        return refuse(format!(
            "state directory {} is writable by other users (mode {:o}); make it 0700 (chmod 0700 {}) \
             or choose another --state-dir",
            dir.display(),
            meta.mode() & 0o7777,
            dir.display()
        ));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str) -> Record {
        Record {
            rotation: "r1".into(),
            service: ServiceKey {
                project: "p".into(),
                service: service.into(),
            },
            strategy: Strategy::Rolling,
            step: Step::Begin,
            original_name: "p-web-1".into(),
            blue: Side {
                id: Some("b".into()),
                name: "p-web-1".into(),
            },
            green: Side {
                id: None,
                name: "p-web-1-dso-r1".into(),
            },
            at_ms: 0,
            error: None,
        }
    }

    #[test]
    fn a_symlink_at_the_history_temp_path_is_not_written_through() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        let key = record("web").service;
        let tmp = dir
            .path()
            .join("history")
            .join(format!("{}.json.tmp", key.file_stem()));
        symlink(&victim, &tmp).unwrap();
        let h = History {
            rotation: "r1".into(),
            strategy: Strategy::Rolling,
            result: "done".into(),
            error: None,
            started_at_ms: 1,
            took_ms: 1,
            container: None,
        };
        j.set_history(&key, &h).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(j.history(&key).unwrap().rotation, "r1");
        assert!(fs::symlink_metadata(&tmp).is_err(), "the planted link is gone");
    }

    #[test]
    fn a_symlink_at_the_journal_path_is_refused_and_not_written_through() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        let rec = record("web");
        let path = j.path(&rec.service);
        symlink(&victim, &path).unwrap();
        let e = j.begin(rec.clone()).unwrap_err().to_string();
        assert!(
            e.contains("symlink") && e.contains(&path.display().to_string()),
            "{e}"
        );
        let e = j.reopen(rec).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
    }

    #[test]
    fn a_state_dir_writable_by_others_is_refused_with_its_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Journal::open(&state).unwrap_err().to_string();
        assert!(
            e.contains(&state.display().to_string()) && e.contains("writable by other users"),
            "{e}"
        );
        assert!(
            !state.join("journal").exists(),
            "nothing created in a refused directory"
        );
        // Sticky and world-writable (like /tmp) is accepted.
        fs::set_permissions(&state, fs::Permissions::from_mode(0o1777)).unwrap();
        Journal::open(&state).unwrap();
    }

    #[test]
    fn a_state_dir_owned_by_another_user_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        if std::os::unix::fs::chown(&state, Some(64_123), None).is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: chown must work"
            );
            eprintln!("skipped: not root, cannot give a directory to another uid");
            return;
        }
        let e = Journal::open(&state).unwrap_err().to_string();
        assert!(
            e.contains(&state.display().to_string()) && e.contains("uid 64123"),
            "{e}"
        );
    }

    #[test]
    fn a_symlinked_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = Journal::open(&link).unwrap_err().to_string();
        assert!(
            e.contains("symlink") && e.contains(&link.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn interrupted_rotations_are_found_and_finished_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut a = j.begin(record("web")).unwrap();
        a.step(Step::GreenCreated, Some("g")).unwrap();
        let mut b = j.begin(record("api")).unwrap();
        b.finish(Step::Done, None).unwrap();
        let open = j.interrupted().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].step, Step::GreenCreated);
        assert_eq!(open[0].green.id.as_deref(), Some("g"));
        assert_eq!(open[0].blue.id.as_deref(), Some("b"));
    }

    #[test]
    fn a_torn_last_line_leaves_the_step_before() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut a = j.begin(record("web")).unwrap();
        a.step(Step::GreenStarted, Some("g")).unwrap();
        let path = a.path().to_owned();
        drop(a);
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(b"{\"rotation\":\"r1\",\"ste").unwrap();
        let open = j.interrupted().unwrap();
        assert_eq!(open[0].step, Step::GreenStarted);
    }

    #[test]
    fn services_whose_old_file_names_collide_keep_their_own_journals() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut one = record("c");
        one.service.project = "a_b".into();
        let mut two = record("b_c");
        two.service.project = "a".into();
        two.rotation = "r2".into();
        let mut a = j.begin(one.clone()).unwrap();
        a.step(Step::GreenCreated, Some("g")).unwrap();
        let mut b = j.begin(two.clone()).unwrap();
        b.step(Step::GreenStarted, Some("g2")).unwrap();
        let open = j.interrupted().unwrap();
        assert_eq!(open.len(), 2, "{open:?}");
        assert_eq!(open[0].service, one.service);
        assert_eq!(open[0].step, Step::GreenCreated);
        assert_eq!(open[1].service, two.service);
        // An unfinished rotation is not replaced by a new one.
        let e = j.begin(one).unwrap_err().to_string();
        assert!(e.contains("not finished"), "{e}");
    }
}
