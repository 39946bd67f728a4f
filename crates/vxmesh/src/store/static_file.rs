//! The static store: one TOML cluster file, the same on every node, watched
//! with inotify so edits are picked up while the agent runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};

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
            std::env::current_dir()?.join(path)
        };
        let dir = path
            .parent()
            .context("cluster file path has no directory")?
            .to_path_buf();
        let file_name = path
            .file_name()
            .context("cluster file path has no file name")?
            .to_os_string();
        let inotify = Inotify::init().context("inotify init")?;
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
            .with_context(|| format!("watch {}", dir.display()))?;
        let events = inotify
            .into_event_stream(vec![0u8; 4096])
            .context("inotify stream")?;
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
            let ev = self.events.next().await.context("inotify stream ended")??;
            if ev.mask.contains(EventMask::Q_OVERFLOW)
                || ev.name.as_deref() == Some(self.file_name.as_os_str())
            {
                return Ok(());
            }
        }
    }
}
