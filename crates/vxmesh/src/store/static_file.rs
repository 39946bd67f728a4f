//! The static store: one TOML cluster file, the same on every node, watched
//! with inotify so edits are picked up while the agent runs. Where the file
//! cannot be watched (the user's inotify instances or watches exhausted, a
//! kernel or file system without inotify) the agent says so once, counts it
//! and checks the file's contents every [`POLL_INTERVAL`] instead.

use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};

use super::error::{Result, StoreError};
use super::{Snapshot, Store};
use crate::config;
use crate::metrics::Metrics;

/// How often a cluster file that cannot be watched is checked for changes
/// (every full pass, the resync, re-reads it too).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct StaticFile {
    path: PathBuf,
    file_name: OsString,
    watch: Watch,
    /// [`POLL_INTERVAL`] (shorter in unit tests).
    poll_every: Duration,
    metrics: Metrics,
}

/// How changes of the file are noticed.
enum Watch {
    /// inotify events of the file's directory.
    Inotify(inotify::EventStream<Vec<u8>>),
    /// The file's contents compared every [`POLL_INTERVAL`] with those the
    /// last snapshot (or poll) saw.
    Poll { seen: Option<Fingerprint> },
}

/// What the file holds, cheaply comparable: a hash of its bytes, or why it
/// could not be read (a missing file that comes back is a change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fingerprint {
    Contents(u64),
    Unreadable(std::io::ErrorKind),
}

fn fingerprint(path: &Path) -> Fingerprint {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            Fingerprint::Contents(h.finish())
        }
        Err(e) => Fingerprint::Unreadable(e.kind()),
    }
}

/// Why the file cannot be watched: the step that failed and its error.
#[derive(Debug)]
struct WatchFailure {
    action: String,
    error: std::io::Error,
}

/// The kernel setting (or missing feature) that an inotify error points at.
fn watch_hint(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE) => {
            "inotify instances per user are limited by the sysctl fs.inotify.max_user_instances"
        }
        Some(libc::ENOSPC) => {
            "inotify watches per user are limited by the sysctl fs.inotify.max_user_watches"
        }
        Some(libc::ENFILE) => "the system's open file table is full (sysctl fs.file-max)",
        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            "this kernel or file system offers no inotify"
        }
        _ => "inotify is unavailable here",
    }
}

/// `EMFILE (Too many open files)`: the errno's name with its text.
fn errno_text(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => {
            let name = format!("{:?}", nix::errno::Errno::from_raw(code));
            let text = error.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            format!("{name} ({text})")
        }
        None => error.to_string(),
    }
}

/// Watch `dir` for changes of the files in it: editors and config managers
/// replace files by rename, so the directory is watched, not the file.
fn watch_dir(dir: &Path) -> std::result::Result<inotify::EventStream<Vec<u8>>, WatchFailure> {
    let inotify = Inotify::init().map_err(|error| WatchFailure {
        action: "inotify init".into(),
        error,
    })?;
    inotify
        .watches()
        .add(
            dir,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MODIFY,
        )
        .map_err(|error| WatchFailure {
            action: format!("inotify watch of {}", dir.display()),
            error,
        })?;
    inotify
        .into_event_stream(vec![0u8; 4096])
        .map_err(|error| WatchFailure {
            action: "inotify stream".into(),
            error,
        })
}

impl StaticFile {
    /// Watch `path` (falling back to polling it when it cannot be watched).
    /// Must be called inside a tokio runtime. `metrics` counts a fallback.
    pub fn open(path: &Path, metrics: &Metrics) -> Result<Self> {
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| StoreError::io("read the current directory for", path, e))?
                .join(path)
        };
        let (Some(dir), Some(file_name)) = (path.parent(), path.file_name()) else {
            return Err(StoreError::invalid(
                "cluster file",
                format!("{} names no file in a directory", path.display()),
            ));
        };
        let file_name = file_name.to_os_string();
        let watch = watch_dir(dir);
        let mut store = StaticFile {
            path,
            file_name,
            watch: Watch::Poll { seen: None },
            poll_every: POLL_INTERVAL,
            metrics: metrics.clone(),
        };
        match watch {
            Ok(events) => store.watch = Watch::Inotify(events),
            Err(failure) => store.fall_back(failure),
        }
        Ok(store)
    }

    /// Does the store poll the file (it could not be watched)?
    pub fn polling(&self) -> bool {
        matches!(self.watch, Watch::Poll { .. })
    }

    /// The watch is unavailable: say so (once: the store polls from now
    /// on), count it, and poll.
    fn fall_back(&mut self, failure: WatchFailure) {
        tracing::warn!(
            "cannot watch the cluster file {} ({}: {}; {}): checking it every {} s and on every resync instead",
            self.path.display(),
            failure.action,
            errno_text(&failure.error),
            watch_hint(&failure.error),
            self.poll_every.as_secs_f64(),
        );
        self.metrics.cluster_watch_failed();
        self.watch = Watch::Poll { seen: None };
    }
}

impl Store for StaticFile {
    fn describe(&self) -> String {
        format!("cluster file {}", self.path.display())
    }

    async fn snapshot(&mut self) -> Result<Snapshot> {
        // Polling: what this snapshot reads is what the next poll compares
        // with (taken first: an edit in between is seen by the next poll).
        if let Watch::Poll { seen } = &mut self.watch {
            *seen = Some(fingerprint(&self.path));
        }
        let cluster = config::load(&self.path)?;
        Ok(Snapshot {
            cluster,
            endpoints: None,
        })
    }

    async fn changed(&mut self) -> Result<()> {
        loop {
            match &mut self.watch {
                Watch::Inotify(events) => {
                    let failure = match events.next().await {
                        Some(Ok(ev)) => {
                            if ev.mask.contains(EventMask::Q_OVERFLOW)
                                || ev.name.as_deref() == Some(self.file_name.as_os_str())
                            {
                                return Ok(());
                            }
                            continue;
                        }
                        Some(Err(error)) => WatchFailure {
                            action: "inotify read".into(),
                            error,
                        },
                        None => WatchFailure {
                            action: "inotify stream ended".into(),
                            error: std::io::ErrorKind::UnexpectedEof.into(),
                        },
                    };
                    // Events may have been lost: poll from now on, and
                    // re-read the file at once.
                    self.fall_back(failure);
                    return Ok(());
                }
                Watch::Poll { seen } => {
                    tokio::time::sleep(self.poll_every).await;
                    let now = fingerprint(&self.path);
                    if *seen != Some(now) {
                        *seen = Some(now);
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_follow_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cluster.toml");
        let missing = fingerprint(&f);
        assert_eq!(
            missing,
            Fingerprint::Unreadable(std::io::ErrorKind::NotFound)
        );
        std::fs::write(&f, "a = 1\n").unwrap();
        let one = fingerprint(&f);
        assert_ne!(one, missing);
        // Same size, same second: still a different file.
        std::fs::write(&f, "a = 2\n").unwrap();
        let two = fingerprint(&f);
        assert_ne!(two, one);
        // Rewritten with the same bytes (a new inode): nothing to apply.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, "a = 2\n").unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        assert_eq!(fingerprint(&f), two);
    }

    #[test]
    fn watch_errors_name_the_errno_and_the_limit() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(errno_text(&emfile), "EMFILE (Too many open files)");
        assert!(watch_hint(&emfile).contains("fs.inotify.max_user_instances"));
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(watch_hint(&enospc).contains("fs.inotify.max_user_watches"));
        let enosys = std::io::Error::from_raw_os_error(libc::ENOSYS);
        assert!(watch_hint(&enosys).contains("no inotify"));
        let eof: std::io::Error = std::io::ErrorKind::UnexpectedEof.into();
        assert_eq!(errno_text(&eof), eof.to_string());
    }

    #[tokio::test]
    async fn a_polled_file_reports_each_edit_once() {
        const EVERY: Duration = Duration::from_millis(40);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cluster.toml");
        std::fs::write(&f, "x").unwrap();
        let mut s = StaticFile {
            path: f.clone(),
            file_name: "cluster.toml".into(),
            watch: Watch::Poll { seen: None },
            poll_every: EVERY,
            metrics: Metrics::new(),
        };
        // The snapshot (here: its fingerprint, the file is no cluster) sets
        // what the polls compare with.
        let _ = s.snapshot().await;
        let quiet = tokio::time::timeout(EVERY * 5, s.changed()).await;
        assert!(quiet.is_err(), "an unchanged file reported a change");
        std::fs::write(&f, "y").unwrap();
        s.changed().await.unwrap();
        // Seen: not reported again.
        let quiet = tokio::time::timeout(EVERY * 3, s.changed()).await;
        assert!(quiet.is_err(), "one edit reported twice");
        std::fs::remove_file(&f).unwrap();
        s.changed().await.unwrap();
    }
}
