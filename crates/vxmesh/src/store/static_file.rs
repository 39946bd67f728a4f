//! The static store: one TOML cluster file, the same on every node, watched
//! with inotify so edits are picked up while the agent runs.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};

use super::error::{Result, StoreError};
use super::{Snapshot, Store};
use crate::config;

pub struct StaticFile {
    path: PathBuf,
    file_name: std::ffi::OsString,
    events: inotify::EventStream<Vec<u8>>,
}

impl StaticFile {
    /// Watch `path`. Must be called inside a tokio runtime.
    pub fn open(path: &Path) -> Result<Self> {
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
        let (dir, file_name) = (dir.to_path_buf(), file_name.to_os_string());
        let inotify = Inotify::init().map_err(|error| StoreError::Watch {
            action: "inotify init".into(),
            error,
        })?;
        // Watch the directory: editors and config managers replace files by rename.
        inotify
            .watches()
            .add(
                &dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::CREATE
                    | WatchMask::DELETE
                    | WatchMask::MODIFY,
            )
            .map_err(|error| StoreError::Watch {
                action: format!("watch {}", dir.display()),
                error,
            })?;
        let events = inotify
            .into_event_stream(vec![0u8; 4096])
            .map_err(|error| StoreError::Watch {
                action: "inotify stream".into(),
                error,
            })?;
        Ok(StaticFile {
            path,
            file_name,
            events,
        })
    }
}

impl Store for StaticFile {
    fn describe(&self) -> String {
        format!("cluster file {}", self.path.display())
    }

    async fn snapshot(&mut self) -> Result<Snapshot> {
        let cluster = config::load(&self.path)?;
        Ok(Snapshot {
            cluster,
            endpoints: None,
        })
    }

    async fn changed(&mut self) -> Result<()> {
        loop {
            let ev = match self.events.next().await {
                Some(ev) => ev.map_err(|error| StoreError::Watch {
                    action: "inotify stream".into(),
                    error,
                })?,
                None => {
                    return Err(StoreError::Watch {
                        action: "inotify stream ended".into(),
                        error: std::io::ErrorKind::UnexpectedEof.into(),
                    });
                }
            };
            if ev.mask.contains(EventMask::Q_OVERFLOW)
                || ev.name.as_deref() == Some(self.file_name.as_os_str())
            {
                return Ok(());
            }
        }
    }
}
