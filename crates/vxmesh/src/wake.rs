//! Waking the agent from another process (a published port added or
//! removed) without inotify (whose instances can run out, issue 17): the
//! agent listens on a unix datagram socket in its state dir,
//! `STATE/agent.wake`, and a publisher sends it one byte. A poke is best
//! effort: with no agent listening it is a no-op, and the agent's next pass
//! (start, resync) reads the records anyway.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The socket's file name in the state dir.
pub const WAKE_SOCKET: &str = "agent.wake";

/// Why the agent could not listen for pokes.
#[derive(Debug, thiserror::Error)]
#[error("listen for wake-ups on {path}: {io}")]
pub struct WakeError {
    pub path: PathBuf,
    pub io: std::io::Error,
}

/// Tell the agent of `state_dir` to run a pass now. Returns whether a
/// listening agent got it.
pub fn poke(state_dir: &Path) -> bool {
    let path = state_dir.join(WAKE_SOCKET);
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| {
            s.set_nonblocking(true)?;
            s.send_to(b"w", &path)
        })
        .is_ok();
    if !sent {
        tracing::debug!("no agent listening on {}", path.display());
    }
    sent
}

/// The agent's end: bound in the state dir, rebound if the file goes.
pub struct Waker {
    path: PathBuf,
    sock: tokio::net::UnixDatagram,
    ino: u64,
}

impl Waker {
    /// Listen on `STATE/agent.wake` (the agent holds the state dir's lock:
    /// a file already there is a leftover and replaced). Mode 0600.
    pub fn bind(state_dir: &Path) -> Result<Waker, WakeError> {
        let path = state_dir.join(WAKE_SOCKET);
        let fail = |io| WakeError {
            path: path.clone(),
            io,
        };
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        let sock = tokio::net::UnixDatagram::bind(&path).map_err(fail)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        let ino = std::fs::metadata(&path).map_err(fail)?.ino();
        Ok(Waker { path, sock, ino })
    }

    /// Bind again if the socket file was removed or replaced (the state dir
    /// deleted under the agent). Returns whether it had to.
    pub fn keep(&mut self) -> Result<bool, WakeError> {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            return Ok(false);
        }
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        *self = Waker::bind(dir)?;
        Ok(true)
    }

    /// Wait for a poke; pokes that arrived meanwhile count as one.
    pub async fn woken(&self) {
        let mut buf = [0u8; 16];
        if self.sock.recv(&mut buf).await.is_err() {
            // A broken socket would wake the loop forever: wait instead,
            // the resync timer still runs passes.
            std::future::pending::<()>().await;
        }
        while self.sock.try_recv(&mut buf).is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_poke_wakes_the_listener_once_and_survives_a_removed_file() {
        let d = tempfile::tempdir().unwrap();
        assert!(!poke(d.path()), "nobody listens yet");
        let mut w = Waker::bind(d.path()).unwrap();
        assert!(poke(d.path()));
        assert!(poke(d.path()));
        tokio::time::timeout(Duration::from_secs(2), w.woken())
            .await
            .expect("woken");
        // Both pokes were taken by one wake-up.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), w.woken())
                .await
                .is_err()
        );
        std::fs::remove_file(d.path().join(WAKE_SOCKET)).unwrap();
        assert!(!poke(d.path()));
        assert!(w.keep().unwrap());
        assert!(!w.keep().unwrap());
        assert!(poke(d.path()));
        tokio::time::timeout(Duration::from_secs(2), w.woken())
            .await
            .expect("woken after rebinding");
    }
}
