//! The agent configuration file (`/etc/vxmesh/agent.toml`): every option of
//! `vxmesh agent` as a TOML key, command-line flags layered on top, and the
//! validation that turns both into an [`AgentConfig`].
//!
//! Keys are the flags' names with `_` for `-` (`--underlay-ip` is
//! `underlay_ip`); the repeatable `--network` is the list `networks`.
//! Relative paths in a file are relative to the file's directory.
//!
//! ```toml
//! node = "host1"
//! store = "etcd://10.0.0.10:2379"
//! networks = ["blue"]
//! underlay_ip = "10.0.0.1"
//! ```

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::names::{IfName, NetworkName, NodeName};
use crate::store::open::{EtcdLogin, StoreChoice};

mod error;
mod keys;
#[cfg(test)]
mod tests;
mod validate;

pub use error::AgentConfigError;
pub use keys::{KEYS, Key, flag_of};
pub use validate::validate;

/// Where `vxmesh agent` looks for its configuration file when `--config`
/// is not given (used only when the file exists).
pub const DEFAULT_PATH: &str = "/etc/vxmesh/agent.toml";

/// Seconds between full reconcile passes when `resync` is not given.
pub const DEFAULT_RESYNC_SECS: f64 = 5.0;

/// The file as written: every key optional, unknown keys refused.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// This node's name in the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The cluster file (static store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<PathBuf>,
    /// The etcd store: `etcd://HOST:2379[,HOST2:2379]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_password_file: Option<PathBuf>,
    /// etcd: the networks to join.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_dev: Option<String>,
    /// etcd lease TTL in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leave: Option<bool>,
    /// `IP:PORT` to serve Prometheus metrics at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Seconds between full passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub once: Option<bool>,
    /// Accept VXLAN only from the node's peers (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vxlan_filter: Option<bool>,
    /// The secure underlay's private key file (default `STATE_DIR/wg.key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl AgentFile {
    /// Make the relative paths of a file relative to `dir` (the file's
    /// directory), so the file means the same whatever the working directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.cluster,
            &mut self.etcd_ca,
            &mut self.etcd_cert,
            &mut self.etcd_key,
            &mut self.etcd_password_file,
            &mut self.state_dir,
            &mut self.key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// The agent's settings as given: a file (or none) with command-line flags
/// on top; it remembers which keys the flags set, so that every problem is
/// named the way the user wrote it (`--ttl 1` or `ttl = 1`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentSettings {
    pub values: AgentFile,
    /// The file the values not from flags came from.
    pub file: Option<PathBuf>,
    /// Keys given on the command line (they override the file).
    pub from_flags: BTreeSet<&'static str>,
}

impl AgentSettings {
    /// Settings read from `file` (already parsed).
    pub fn from_file(values: AgentFile, file: &Path) -> Self {
        AgentSettings {
            values,
            file: Some(file.to_path_buf()),
            from_flags: BTreeSet::new(),
        }
    }

    /// Put the keys set in `flags` over the current values.
    pub fn override_with(&mut self, flags: AgentFile) {
        let flags = keys::to_table(&flags);
        let mut merged = keys::to_table(&self.values);
        for (k, v) in flags {
            if let Some(key) = KEYS.iter().find(|key| key.name == k) {
                self.from_flags.insert(key.name);
            }
            merged.insert(k, v);
        }
        self.values = toml::Value::Table(merged)
            .try_into()
            .expect("a merge of two valid key sets is valid");
    }

    /// Where the settings came from, for messages.
    pub fn source_name(&self) -> String {
        match (&self.file, self.from_flags.is_empty()) {
            (Some(f), true) => f.display().to_string(),
            (Some(f), false) => format!("{} and the command line", f.display()),
            (None, _) => "the command line".to_string(),
        }
    }
}

/// Read and parse a configuration file; relative paths are made relative to
/// its directory. Every unknown key and every value of the wrong type is
/// reported, each with its key.
pub fn load(path: &Path) -> Result<AgentSettings, AgentConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        AgentConfigError::one(
            &name,
            "file",
            format!("cannot read it: {e} (give another file with --config FILE)"),
        )
    })?;
    let mut file = parse(&text, &name)?;
    file.resolve_paths(path.parent().unwrap_or(Path::new("/")));
    Ok(AgentSettings::from_file(file, path))
}

/// Parse the text of a configuration file (no validation of the values).
pub fn parse(text: &str, source_name: &str) -> Result<AgentFile, AgentConfigError> {
    keys::parse(text, source_name)
}

/// Validated settings: what `vxmesh agent` runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    pub node: NodeName,
    pub store: AgentStore,
    pub state_dir: PathBuf,
    pub resync: Duration,
    pub once: bool,
    /// Drop VXLAN packets from anything but the node's peers.
    pub vxlan_filter: bool,
    /// The secure underlay's private key (`None`: `STATE_DIR/wg.key`).
    pub key_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
}

/// Which store the agent runs on.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentStore {
    /// The static store: this cluster file.
    ClusterFile(PathBuf),
    Etcd(Box<EtcdAgent>),
}

/// The etcd store's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct EtcdAgent {
    pub login: EtcdLogin,
    pub networks: Vec<NetworkName>,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: Option<IfName>,
    /// Lease TTL in seconds (the store's default when `None`).
    pub ttl: Option<u64>,
    pub leave: bool,
}

impl AgentConfig {
    /// The store options in the form [`StoreChoice::open`] takes.
    pub fn store_choice(&self) -> StoreChoice {
        match &self.store {
            AgentStore::ClusterFile(f) => StoreChoice {
                cluster: Some(f.clone()),
                ..StoreChoice::default()
            },
            AgentStore::Etcd(e) => StoreChoice {
                cluster: None,
                etcd: e.login.clone(),
                networks: e.networks.iter().map(|n| n.to_string()).collect(),
                underlay_ip: Some(e.underlay_ip),
                underlay_dev: e.underlay_dev.as_ref().map(|d| d.to_string()),
                ttl: e.ttl,
                leave: e.leave,
            },
        }
    }

    /// Leave the etcd networks when the agent stops?
    pub fn leave(&self) -> bool {
        matches!(&self.store, AgentStore::Etcd(e) if e.leave)
    }
}
