//! The errors of the stores and of address allocation: each names what was
//! tried (the etcd request and its key, the file and its path, the network
//! and the address) so that a log line alone says where to look.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

/// Why a store or allocator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An etcd request failed; `op` says which and names its key.
    #[error("etcd: {op}: {error}{hint}")]
    Etcd {
        op: String,
        error: etcd_client::Error,
        /// What to do about it, if the error is a common one (or "").
        hint: &'static str,
    },
    /// An etcd request got no answer in time.
    #[error("etcd: {op}: no answer within {timeout:?} (is etcd running and reachable?)")]
    EtcdTimeout { op: String, timeout: Duration },
    /// etcd refused a request in its answer (e.g. a lease grant).
    #[error("etcd: {op}: {message}")]
    EtcdRefused { op: String, message: String },
    /// A compare-and-swap on `key` kept failing because the key kept changing.
    #[error("etcd: {op} {key}: the key kept changing under this node, try again")]
    KeyKeptChanging { op: &'static str, key: String },
    #[error("connect to etcd at {endpoints}: {error}{hint}")]
    Connect {
        endpoints: String,
        error: etcd_client::Error,
        hint: &'static str,
    },
    #[error(
        "connect to etcd at {endpoints}: no answer within {timeout:?}: is etcd running and reachable?"
    )]
    ConnectTimeout {
        endpoints: String,
        timeout: Duration,
    },
    /// Options that cannot work; `problems` names each option and its fix.
    #[error("invalid etcd {what} options: {problems}")]
    InvalidOptions {
        what: &'static str,
        problems: String,
    },
    /// A value given by the caller breaks a rule (`field` names it).
    #[error("{}{reason}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
    InvalidValue { field: String, reason: String },
    /// A `--store` URL that is not `etcd://HOST:PORT,...` or `http(s)://...`.
    #[error(
        "--store {url:?}: write it like etcd://HOST:2379 or etcd://HOST1:2379,HOST2:2379 (or http(s)://HOST:2379,...)"
    )]
    BadStoreUrl { url: String },
    /// A record in etcd that does not pass validation.
    #[error("{what} at {key} is invalid: {reason}{fix}")]
    BadRecord {
        what: String,
        key: String,
        reason: String,
        fix: &'static str,
    },
    /// A network's config key is absent.
    #[error("network {network} {detail}")]
    NoSuchNetwork { network: String, detail: String },
    /// A request that conflicts with what the store holds (the message says
    /// what and how to resolve it).
    #[error("{0}")]
    Conflict(String),
    /// The agent's lease is gone: the claim cannot be bound to it.
    #[error(
        "the agent's etcd lease {lease} no longer exists: is `vxmesh agent` running on this node? (it rewrites the lease in the state file when it renews it)"
    )]
    LeaseGone { lease: i64 },
    /// Every address of a bridged network is taken.
    #[error(
        "network {network} cidr {cidr} has no free address left: detach containers or widen the cidr"
    )]
    CidrFull { network: String, cidr: Ipv4Net },
    /// Every subnet of a network is claimed.
    #[error(
        "network {network} cidr {cidr} has no free /{subnet_len} left for node {node}: widen the cidr or lengthen subnet_len (delete and re-create the network)"
    )]
    SubnetsFull {
        network: String,
        cidr: Ipv4Net,
        subnet_len: u8,
        node: String,
    },
    /// Every address of the node's pool is taken (file IPAM).
    #[error(
        "no free address left in pool {pool} of network '{network}' ({in_use} in use): detach containers or give the node a larger subnet"
    )]
    PoolFull {
        network: String,
        pool: Ipv4Net,
        in_use: usize,
    },
    #[error("address {ip} is not in this node's pool {pool} of network '{network}'")]
    NotInPool {
        ip: Ipv4Addr,
        pool: Ipv4Net,
        network: String,
    },
    #[error("address {ip} of network '{network}' is already allocated")]
    AlreadyAllocated { ip: Ipv4Addr, network: String },
    #[error(
        "address {ip} of network '{network}' is already allocated on this node to {container_id}/{ifname}"
    )]
    AllocatedHere {
        ip: Ipv4Addr,
        network: String,
        container_id: String,
        ifname: String,
    },
    /// Another node holds the address network-wide.
    #[error(
        "address {ip} of network {network} is attached on {holder}: detach it there first (or wait for that node's lease to expire if it is gone)"
    )]
    AttachedElsewhere {
        ip: Ipv4Addr,
        network: String,
        holder: String,
    },
    /// Routed networks publish no endpoints.
    #[error(
        "network {network} is {mode}: endpoints are published only for bridged networks (routed containers get addresses from the node's subnet)"
    )]
    NotBridged { network: String, mode: String },
    /// A file operation failed (`action` is e.g. "read", "create", "lock").
    #[error("{action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// Claiming an address in etcd failed (the cause is the source).
    #[error("allocate an address of network '{network}' in etcd: {cause}")]
    Claim {
        network: String,
        cause: Box<StoreError>,
    },
    /// Entering the node's network namespace `name` to reach the store
    /// failed (`message` is the namespace layer's error, with its causes).
    #[error("{message}")]
    Namespace { name: String, message: String },
    /// An allocation file could not be written as JSON.
    #[error("write allocation file {}: {error}", path.display())]
    Encode {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// The cluster file could not be read or does not validate.
    #[error(transparent)]
    ClusterFile(#[from] crate::config::ConfigError),
    /// The cluster file watch (inotify) failed.
    #[error("{action}: {error}")]
    Watch {
        action: String,
        error: std::io::Error,
    },
    /// The store's background work stopped (a bug, or the store was closed).
    #[error("{0}")]
    Closed(&'static str),
    /// The agent's lease was not revoked at leave.
    #[error("leave: the records will expire with the lease TTL instead: {cause}")]
    LeaveFailed { cause: Box<StoreError> },
    /// Joining a network failed (the cause is the source).
    #[error("join network {network} as node {node}: {cause}")]
    Join {
        network: String,
        node: String,
        cause: Box<StoreError>,
    },
    /// Several networks failed the same operation.
    #[error("{op}: {}", problems.join("; "))]
    Several {
        op: &'static str,
        problems: Vec<String>,
    },
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        error: std::io::Error,
    ) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            error,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        StoreError::InvalidValue {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// Whether etcd said the lease the request named does not exist.
    pub(crate) fn is_lease_not_found(&self) -> bool {
        self.to_string().contains("lease not found")
    }

    /// A short, stable name of why a join failed (the label of
    /// `vxmesh_join_failures_total`).
    pub fn join_cause(&self) -> &'static str {
        match self {
            StoreError::Join { cause, .. } => cause.join_cause(),
            StoreError::LeaseGone { .. } => "lease_lost",
            e if e.is_lease_not_found() => "lease_lost",
            StoreError::Connect { .. }
            | StoreError::ConnectTimeout { .. }
            | StoreError::EtcdTimeout { .. } => "unreachable",
            StoreError::Conflict(_) => "conflict",
            StoreError::SubnetsFull { .. } => "subnets_full",
            StoreError::NoSuchNetwork { .. } => "no_network",
            StoreError::KeyKeptChanging { .. } => "contention",
            StoreError::Etcd { .. } | StoreError::EtcdRefused { .. } => "etcd_error",
            _ => "other",
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_causes_see_through_the_join_wrapper() {
        let join = |cause| StoreError::Join {
            network: "demo".into(),
            node: "a".into(),
            cause: Box::new(cause),
        };
        assert_eq!(
            join(StoreError::LeaseGone { lease: 7 }).join_cause(),
            "lease_lost"
        );
        let refused = StoreError::EtcdRefused {
            op: "claim".into(),
            message: "etcdserver: requested lease not found".into(),
        };
        assert_eq!(join(refused).join_cause(), "lease_lost");
        assert_eq!(
            join(StoreError::Conflict("x".into())).join_cause(),
            "conflict"
        );
        let timeout = StoreError::ConnectTimeout {
            endpoints: "http://127.0.0.1:2379".into(),
            timeout: Duration::from_secs(5),
        };
        assert_eq!(timeout.join_cause(), "unreachable");
    }
}
