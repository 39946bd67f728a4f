//! The node's state dir (default `/run/vxmesh`): what the agent publishes for
//! attach and the CNI plugin, written atomically.
//!
//! Layout:
//!   STATE/networks/NETWORK.json   the network as served on this node
//!   STATE/agent.lock              held (flock) by the running agent
//!   STATE/ipam/NETWORK/           address allocations (see `ipam`)
//!   STATE/plan.json               the applied plan (see [`PlanStore`])

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataplane::{NetworkState, NodePlan};
use crate::status::{PLAN_FILE, SavedPlan};
use crate::store::{AllocatorSpec, Snapshot};

/// A state file could not be read, written or locked; every variant names
/// the file (or the state dir).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A filesystem step failed: "create DIR", "rename A to B", ...
    #[error("{step}: {io}")]
    Io { step: String, io: std::io::Error },
    #[error("{path}: path has no parent")]
    NoParent { path: String },
    #[error(
        "network '{network}' is not served on this node ({path} missing): is `vxmesh agent` running with --state-dir {state_dir}?: {io}"
    )]
    NotServed {
        network: String,
        path: String,
        state_dir: String,
        io: std::io::Error,
    },
    #[error("corrupt state file {path}: {json}")]
    Corrupt {
        path: String,
        json: serde_json::Error,
    },
    /// File contents that do not parse (no file named: see `Corrupt`).
    #[error("{0}")]
    Parse(serde_json::Error),
    #[error("serialise {what}: {json}")]
    Serialise {
        what: String,
        json: serde_json::Error,
    },
    #[error(
        "another vxmesh agent (pid {holder}) already serves state dir {state_dir}: stop it first, or use another --state-dir"
    )]
    Locked { holder: String, state_dir: String },
}

/// An I/O error of `step` ("create PATH", ...).
fn io_step(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> StateError {
    let step = step.into();
    move |io| StateError::Io { step, io }
}

pub const DEFAULT_STATE_DIR: &str = "/run/vxmesh";

/// What the agent writes per network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedNetwork {
    pub node: String,
    #[serde(flatten)]
    pub state: NetworkState,
    /// Unix seconds of a reconcile pass that confirmed this network: the
    /// file is rewritten when it changes, else at most every
    /// [`CONFIRM_EVERY`] seconds (a pass that only adds a peer writes nothing).
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
    /// The agent's node lease: endpoints are bound to it.
    pub lease: i64,
    /// The agent's hold lease: the quarantine markers of its endpoints are
    /// bound to it (0: none, a state file of an older agent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hold_lease: i64,
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

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn networks_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("networks")
}

/// Write a file atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    write_via_temp(path, data, true)
}

/// Replace a file atomically (temp file in the same dir, rename) without
/// waiting for the disk: for reports that the next pass rewrites anyway
/// (`plan.json`), where an fsync per pass only competes with etcd's own
/// on a shared disk. A crash leaves the old or the new file (ext4 and
/// xfs flush a file renamed over another before the rename).
pub fn replace_file(path: &Path, data: &[u8]) -> Result<(), StateError> {
    write_via_temp(path, data, false)
}

/// Write `data` to a temp file beside `path` (synced to disk with `sync`)
/// and rename it over `path`.
fn write_via_temp(path: &Path, data: &[u8], sync: bool) -> Result<(), StateError> {
    let dir = path.parent().ok_or_else(|| StateError::NoParent {
        path: path.display().to_string(),
    })?;
    fs::create_dir_all(dir).map_err(io_step(format!("create {}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut f = File::create(&tmp).map_err(io_step(format!("create {}", tmp.display())))?;
    f.write_all(data)
        .and_then(|()| if sync { f.sync_all() } else { Ok(()) })
        .map_err(io_step(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_step(format!(
        "rename {} to {}",
        tmp.display(),
        path.display()
    )))
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn write_network(state_dir: &Path, served: &ServedNetwork) -> Result<(), StateError> {
    let path = networks_dir(state_dir).join(format!("{}.json", served.state.network));
    let json = serde_json::to_string_pretty(served).map_err(|json| StateError::Serialise {
        what: format!("network {}", served.state.network),
        json,
    })?;
    write_atomic(&path, json.as_bytes())
}

pub fn read_network(state_dir: &Path, network: &str) -> Result<ServedNetwork, StateError> {
    let path = networks_dir(state_dir).join(format!("{network}.json"));
    let data = fs::read(&path).map_err(|io| StateError::NotServed {
        network: network.to_string(),
        path: path.display().to_string(),
        state_dir: state_dir.display().to_string(),
        io,
    })?;
    serde_json::from_slice(&data).map_err(|json| StateError::Corrupt {
        path: path.display().to_string(),
        json,
    })
}

/// Parse the contents of a `STATE/networks/NETWORK.json` file.
pub fn parse_served_network(data: &[u8]) -> Result<ServedNetwork, StateError> {
    serde_json::from_slice(data).map_err(StateError::Parse)
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

pub fn remove_network(state_dir: &Path, network: &str) -> Result<(), StateError> {
    let path = networks_dir(state_dir).join(format!("{network}.json"));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_step(format!("remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Writes `STATE/networks/NETWORK.json` only when what it says changed,
/// the file is missing, or its `confirmed_at` is older than
/// [`CONFIRM_EVERY`]: a pass that changes nothing for attach (a peer
/// joined) costs no write and no fsync.
#[derive(Debug, Default)]
pub struct NetworkFiles {
    /// Per network: what was written last.
    last: BTreeMap<String, ServedNetwork>,
}

/// How often an unchanged network file's `confirmed_at` is refreshed.
pub const CONFIRM_EVERY: u64 = 30;

impl NetworkFiles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `served` unless the file already says it (see the type).
    /// Returns whether the file was written.
    pub fn write(&mut self, state_dir: &Path, served: &ServedNetwork) -> Result<bool, StateError> {
        let name = &served.state.network;
        let path = networks_dir(state_dir).join(format!("{name}.json"));
        let current = self.last.get(name).is_some_and(|l| {
            l.node == served.node
                && l.state == served.state
                && l.allocator == served.allocator
                && served.confirmed_at < l.confirmed_at.saturating_add(CONFIRM_EVERY)
        });
        if current && path.exists() {
            return Ok(false);
        }
        write_network(state_dir, served)?;
        self.last.insert(name.clone(), served.clone());
        Ok(true)
    }

    /// Remove the file of a network no longer served.
    pub fn remove(&mut self, state_dir: &Path, network: &str) -> Result<(), StateError> {
        self.last.remove(network);
        remove_network(state_dir, network)
    }
}

/// The files an agent pass writes and remembers: the network files and
/// the applied plan.
#[derive(Debug, Default)]
pub struct StateFiles {
    pub networks: NetworkFiles,
    pub plan: PlanStore,
}

impl StateFiles {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Saves the applied plan to `STATE/plan.json` for `vxmesh status` and
/// `doctor`, only when it differs from what the file already holds (a
/// 10 000-peer plan is megabytes: it is not rewritten on every pass). A
/// deleted file is written again. The agent owns one and remembers through
/// it what it last wrote.
#[derive(Debug, Default)]
pub struct PlanStore {
    /// The file last written and what it holds.
    last: Option<(PathBuf, SavedPlan)>,
}

impl PlanStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Save `plan`, applied on `node` with the cluster of `snap`, unless the
    /// file already holds it. Returns whether the file was written.
    pub fn save(
        &mut self,
        state_dir: &Path,
        node: &str,
        snap: &Snapshot,
        plan: &NodePlan,
    ) -> Result<bool, StateError> {
        let nodes: BTreeMap<Ipv4Addr, String> = snap
            .cluster
            .nodes
            .iter()
            .map(|n| (n.underlay_ip, n.name.clone()))
            .collect();
        let path = state_dir.join(PLAN_FILE);
        if self.holds(&path, node, &nodes, plan) && path.exists() {
            return Ok(false);
        }
        let saved = SavedPlan {
            node: node.to_string(),
            applied_at: now_secs(),
            nodes,
            plan: plan.clone(),
        };
        write_plan(state_dir, &saved)?;
        self.last = Some((path, saved));
        Ok(true)
    }

    /// Was exactly this written last to `path`? Compared field by field
    /// (no serialising a large plan on every pass).
    fn holds(
        &self,
        path: &Path,
        node: &str,
        nodes: &BTreeMap<Ipv4Addr, String>,
        plan: &NodePlan,
    ) -> bool {
        self.last.as_ref().is_some_and(|(p, s)| {
            p == path && s.node == node && &s.nodes == nodes && &s.plan == plan
        })
    }
}

/// Write `saved` atomically to `STATE/plan.json`.
pub fn write_plan(state_dir: &Path, saved: &SavedPlan) -> Result<(), StateError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The size of the last plan written: the next one is about as large,
    // so its buffer is allocated once.
    static LAST_LEN: AtomicUsize = AtomicUsize::new(0);
    // Compact: a plan of N peers is written at every change, and `status`,
    // not a person, reads it (`jq` shows it indented).
    let mut json = Vec::with_capacity(LAST_LEN.load(Ordering::Relaxed) + 1024);
    serde_json::to_writer(&mut json, saved).map_err(|json| StateError::Serialise {
        what: "the plan".into(),
        json,
    })?;
    LAST_LEN.store(json.len(), Ordering::Relaxed);
    replace_file(&state_dir.join(PLAN_FILE), &json)
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
    pub fn keep(&mut self) -> Result<bool, StateError> {
        use std::os::unix::fs::MetadataExt;
        let held = self
            .file
            .metadata()
            .map_err(io_step(format!("stat {}", self.path.display())))?;
        if fs::metadata(&self.path).is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino()) {
            return Ok(false);
        }
        let dir = self.path.parent().ok_or_else(|| StateError::NoParent {
            path: self.path.display().to_string(),
        })?;
        *self = lock_agent(dir)?;
        Ok(true)
    }
}

/// Open (creating it) the lock file at `path` and take an exclusive
/// `flock` on it, waiting while another holds it; on failure, the step that
/// failed (`open` or `lock`) and its error.
///
/// Inside a multi-thread tokio runtime the wait is moved off the runtime's
/// worker (`block_in_place`): a task that holds the lock across an `.await`
/// (an etcd claim) must go on running while other tasks wait for the lock,
/// or the process deadlocks once every worker waits (the Docker plugin did,
/// with three concurrent address releases on its two workers).
pub fn lock_file(path: &Path) -> Result<File, (&'static str, std::io::Error)> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| ("open", e))?;
    let wait = || file.lock();
    let locked = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    locked.map_err(|e| ("lock", e))?;
    Ok(file)
}

/// Take the agent lock, refusing clearly if another agent holds it.
pub fn lock_agent(state_dir: &Path) -> Result<AgentLock, StateError> {
    fs::create_dir_all(state_dir)
        .map_err(io_step(format!("create state dir {}", state_dir.display())))?;
    let path = state_dir.join("agent.lock");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_step(format!("open {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read(&path)
                .ok()
                .and_then(|d| lock_holder(&d))
                .map_or("unknown".to_string(), |pid| pid.to_string());
            return Err(StateError::Locked {
                holder,
                state_dir: state_dir.display().to_string(),
            });
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(io_step(format!("lock {}", path.display()))(e));
        }
    }
    file.set_len(0)
        .and_then(|()| write!(file, "{}", std::process::id()))
        .map_err(io_step(format!("write {}", path.display())))?;
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
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        // Held by another process (or the lock cannot be tested: as held).
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

    /// A network file is rewritten when what it says changes, when it is
    /// gone, or when its confirmation is CONFIRM_EVERY old; not on every pass.
    #[test]
    fn network_files_are_rewritten_only_when_they_would_say_more() {
        let d = tempfile::tempdir().unwrap();
        let served = |confirmed_at: u64, mtu: u32| ServedNetwork {
            node: "a".into(),
            state: NetworkState {
                network: "demo".into(),
                mode: crate::config::Mode::Routed,
                vni: crate::model::Vni::new(100).unwrap(),
                bridge: "vxm-br0".into(),
                vtep: "vxm-vx100".into(),
                mtu,
                subnet: "10.1.0.16/28".parse().unwrap(),
                pool: "10.1.0.16/28".parse().unwrap(),
                gateway: None,
            },
            confirmed_at,
            allocator: Default::default(),
        };
        let mut files = NetworkFiles::new();
        assert!(files.write(d.path(), &served(100, 1450)).unwrap());
        assert!(!files.write(d.path(), &served(101, 1450)).unwrap());
        assert!(
            !files
                .write(d.path(), &served(100 + CONFIRM_EVERY - 1, 1450))
                .unwrap()
        );
        assert_eq!(read_network(d.path(), "demo").unwrap().confirmed_at, 100);
        assert!(
            files
                .write(d.path(), &served(100 + CONFIRM_EVERY, 1450))
                .unwrap()
        );
        assert!(files.write(d.path(), &served(131, 1400)).unwrap());
        assert_eq!(read_network(d.path(), "demo").unwrap().state.mtu, 1400);
        fs::remove_dir_all(d.path().join("networks")).unwrap();
        assert!(files.write(d.path(), &served(131, 1400)).unwrap());
        files.remove(d.path(), "demo").unwrap();
        assert!(read_network(d.path(), "demo").is_err());
        assert!(files.write(d.path(), &served(132, 1400)).unwrap());
    }

    /// The plan file is written when its content changes or the file is
    /// gone, not on every pass; each store remembers only its own writes.
    #[test]
    fn plan_store_rewrites_only_changed_or_missing_plans() {
        let d = tempfile::tempdir().unwrap();
        let snap = Snapshot {
            cluster: crate::config::Cluster {
                networks: Vec::new(),
                nodes: Vec::new(),
                encryption: Default::default(),
            },
            endpoints: None,
        };
        let plan = NodePlan::default();
        let mut plans = PlanStore::new();
        assert!(plans.save(d.path(), "n1", &snap, &plan).unwrap());
        assert!(!plans.save(d.path(), "n1", &snap, &plan).unwrap());
        let file = d.path().join(PLAN_FILE);
        let saved: SavedPlan = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert_eq!((saved.node.as_str(), &saved.plan), ("n1", &plan));
        // Another node name is another plan; a deleted file is written again.
        assert!(plans.save(d.path(), "n2", &snap, &plan).unwrap());
        fs::remove_file(&file).unwrap();
        assert!(plans.save(d.path(), "n2", &snap, &plan).unwrap());
        assert!(file.exists());
        // A second store has written nothing yet: it writes.
        assert!(PlanStore::new().save(d.path(), "n2", &snap, &plan).unwrap());
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

    /// One task holds the lock across an `.await` while more tasks than
    /// the runtime has workers wait for it: all of them get it in turn
    /// (waiting in `flock` on the workers themselves deadlocked).
    #[test]
    fn tasks_waiting_for_a_lock_never_starve_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let held = lock_file(&path).unwrap();
                let waiters: Vec<_> = (0..3)
                    .map(|_| {
                        let path = path.clone();
                        tokio::spawn(async move { drop(lock_file(&path).unwrap()) })
                    })
                    .collect();
                // The holder awaits with the lock held (as a claim in etcd).
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                drop(held);
                for w in waiters {
                    w.await.unwrap();
                }
            });
            let _ = done.send(());
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_secs(20))
                .is_ok(),
            "the lock's holder never ran again: every worker waits in flock"
        );
    }
}
