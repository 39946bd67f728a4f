//! A lab's files in memory: its directory (every host's state and log,
//! etcd's data) on a tmpfs of its own, for the lab's lifetime.
//!
//! On a standard Debian host `/run` is a tmpfs already and nothing is
//! mounted. Where it is not (this project's build machines keep `/run` on
//! the disk), one disk would carry the files of hundreds of simulated
//! hosts and etcd's write-ahead log at once: etcd fsyncs that log before
//! it applies a write, and with 250 agents writing their state an fsync
//! of 0.3 ms took 23-75 ms, etcd's applied index fell behind, lease
//! renewals (which wait for it) failed and leases expired by the hundred;
//! the hosts' file creations alone were about 6 % of the machine's CPU in
//! a cold start. Real hosts and a real etcd each have a disk of their own.
//!
//! The mounts are in this machine's mount namespace, but only under the
//! lab's directory, and `down` removes them.

use std::path::Path;

use anyhow::{Context, Result};

/// Upper bound of a lab's tmpfs: pages are taken only as used (a 250-host
/// lab holds a few tens of MB, plus 64 MB of preallocated WAL per etcd
/// member).
const TMPFS_OPTIONS: &str = "size=4g,mode=0755";

/// Mount a tmpfs at `dir` (created if missing) unless `dir` is on a tmpfs
/// already (or is a mount point: a lab being rebuilt over its own).
pub(super) fn mount(dir: &Path, what: &str) -> Result<()> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if on_tmpfs(dir) || is_mount_point(dir) {
        return Ok(());
    }
    mount(
        Some("vxmesh-lab"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(TMPFS_OPTIONS),
    )
    .with_context(|| format!("mount a tmpfs for {what} at {}", dir.display()))
}

/// Unmount whatever is mounted at `dir` (see [`mount`]); nothing when
/// nothing is. Lazy: a process still holding a file there (none should,
/// the lab's processes are stopped first) cannot keep the lab from going.
pub(super) fn unmount(dir: &Path) -> Result<()> {
    while is_mount_point(dir) {
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmount the lab's tmpfs at {}", dir.display()))?;
    }
    Ok(())
}

/// Whether `dir` is on a tmpfs.
fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Whether `dir` is the root of a file system mounted on its parent's
/// (another device than its parent's).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(d), Some(Ok(p))) = (
        std::fs::symlink_metadata(dir),
        dir.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    d.is_dir() && d.dev() != p.dev()
}
