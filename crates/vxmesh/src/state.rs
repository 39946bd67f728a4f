//! The node's state dir (default `/run/vxmesh`): what the agent publishes for
//! attach and the CNI plugin, written atomically.
//!
//! Layout:
//!   STATE/networks/NETWORK.json   the network as served on this node
//!   STATE/agent.lock              held (flock) by the running agent
//!   STATE/ipam/NETWORK/           address allocations (see `ipam`)

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fs2::FileExt;
use serde::{Deserialize, Serialize};

use crate::dataplane::NetworkState;
use crate::store::AllocatorSpec;

pub const DEFAULT_STATE_DIR: &str = "/run/vxmesh";

/// What the agent writes per network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedNetwork {
    pub node: String,
    #[serde(flatten)]
    pub state: NetworkState,
    /// Unix seconds of the last reconcile pass that confirmed this network.
    pub confirmed_at: u64,
    /// Which allocator attach uses, as the store says (key `etcd`: bridged
    /// networks on the etcd store allocate network-wide in etcd, bound to
    /// the agent's lease; absent: the local file IPAM allocates from `pool`).
    #[serde(
        default,
        rename = "etcd",
        skip_serializing_if = "AllocatorSpec::is_local"
    )]
    pub allocator: AllocatorSpec,
}

/// How attach (CLI, CNI, lab) reaches the etcd store of a network: the
/// agent's connection settings (file paths only, never secrets) and the
/// lease its records are bound to (rewritten when the lease is re-granted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdSection {
    /// `http://HOST:2379` or `https://HOST:2379`.
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub network: String,
    pub node: String,
    pub lease: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

fn networks_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("networks")
}

/// Write a file atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn write_network(state_dir: &Path, served: &ServedNetwork) -> Result<()> {
    let path = networks_dir(state_dir).join(format!("{}.json", served.state.network));
    write_atomic(&path, serde_json::to_string_pretty(served)?.as_bytes())
}

pub fn read_network(state_dir: &Path, network: &str) -> Result<ServedNetwork> {
    let path = networks_dir(state_dir).join(format!("{network}.json"));
    let data = fs::read(&path).with_context(|| {
        format!(
            "network '{network}' is not served on this node ({} missing): is `vxmesh agent` running with --state-dir {}?",
            path.display(),
            state_dir.display()
        )
    })?;
    parse_served_network(&data).with_context(|| format!("corrupt state file {}", path.display()))
}

/// Parse the contents of a `STATE/networks/NETWORK.json` file.
pub fn parse_served_network(data: &[u8]) -> Result<ServedNetwork> {
    Ok(serde_json::from_slice(data)?)
}

/// Names of the networks with a state file.
pub fn list_networks(state_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(networks_dir(state_dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn remove_network(state_dir: &Path, network: &str) -> Result<()> {
    let path = networks_dir(state_dir).join(format!("{network}.json"));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The single-agent lock of a state dir.
pub struct AgentLock {
    path: PathBuf,
    file: File,
}

impl AgentLock {
    /// Take the lock again if its file was deleted (the state dir removed
    /// under a running agent): a lock on a deleted file keeps nobody out.
    /// Returns whether it had to; an error if another agent took the new
    /// file first.
    pub fn keep(&mut self) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let held = self.file.metadata()?;
        if fs::metadata(&self.path).is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino()) {
            return Ok(false);
        }
        let dir = self.path.parent().context("lock path has no parent")?;
        *self = lock_agent(dir)?;
        Ok(true)
    }
}

/// Take the agent lock, refusing clearly if another agent holds it.
pub fn lock_agent(state_dir: &Path) -> Result<AgentLock> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("create state dir {}", state_dir.display()))?;
    let path = state_dir.join("agent.lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    if file.try_lock_exclusive().is_err() {
        let holder = fs::read(&path)
            .ok()
            .and_then(|d| lock_holder(&d))
            .map_or("unknown".to_string(), |pid| pid.to_string());
        bail!(
            "another vxmesh agent (pid {holder}) already serves state dir {}: stop it first, or use another --state-dir",
            state_dir.display()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(AgentLock { path, file })
}

/// The pid an agent wrote into `agent.lock` (its decimal pid, nothing else;
/// surrounding whitespace is tolerated). `None` for anything else.
pub fn lock_holder(data: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(data).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|pid| *pid > 0)
}

/// Is an agent holding the lock of `state_dir` right now?
pub fn agent_running(state_dir: &Path) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .open(state_dir.join("agent.lock"))
    else {
        return false;
    };
    match file.try_lock_exclusive() {
        Ok(()) => {
            let _ = FileExt::unlock(&file);
            false
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_lock_file_is_taken_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let mut lock = lock_agent(&dir).unwrap();
        assert!(
            !lock.keep().unwrap(),
            "nothing to do while the file is there"
        );
        let e = lock_agent(&dir).err().unwrap().to_string();
        assert!(e.contains("another vxmesh agent"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
        // The old lock keeps nobody out now; keep() closes that gap.
        assert!(lock.keep().unwrap());
        assert!(agent_running(&dir));
        let e = lock_agent(&dir).err().unwrap().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    }

    #[test]
    fn lock_holder_reads_only_a_pid() {
        assert_eq!(lock_holder(b"4242"), Some(4242));
        assert_eq!(lock_holder(b" 4242\n"), Some(4242));
        assert_eq!(lock_holder(b""), None);
        assert_eq!(lock_holder(b"0"), None);
        assert_eq!(lock_holder(b"+42"), None);
        assert_eq!(
            lock_holder(b"42\x1b[2J"),
            None,
            "no terminal escapes in messages"
        );
        assert_eq!(lock_holder(b"99999999999"), None);
        assert_eq!(lock_holder(&[0xff, 0x34]), None);
    }
}
