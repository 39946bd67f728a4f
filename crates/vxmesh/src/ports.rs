//! Published ports of a node (Docker `-p`, `vxmesh attach --publish`),
//! recorded in the agent's state dir; the agent renders them into
//! `NodePlan.ports` (DNAT rules in vxmesh's nftables table).
//!
//! One file per published container interface under `STATE/ports/`, named
//! after its host veth (`vxm-HASH.json`, see [`crate::attach::host_veth_name`]),
//! holding the network, owner, container address and its ports. A host
//! port belongs to one record per node and protocol: every change happens
//! under an exclusive `flock` on `STATE/ports/lock`, so concurrent
//! publishers never both get one port. After a change the publisher pokes
//! the agent ([`crate::wake`]); the agent drops records whose veth is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::attach::host_veth_name;
use crate::dataplane::{PortProto, PortSpec};
use crate::ipam::Owner;
use crate::names::NetworkName;

/// Why a port could not be published, unpublished or listed; every variant
/// names the port, the record file or the text at fault, and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "host port {port}/{proto} on this node is already published by {owner} (network {network}, to {container_ip}:{container_port}): unpublish it first (`docker rm -f` its container, `vxmesh detach`), or choose another host port"
    )]
    Taken {
        proto: PortProto,
        port: u16,
        owner: String,
        network: String,
        container_ip: Ipv4Addr,
        container_port: u16,
    },
    #[error(
        "every host port of {first}-{last}/{proto} on this node is already published (by {owners}): choose another range"
    )]
    RangeTaken {
        proto: PortProto,
        first: u16,
        last: u16,
        owners: String,
    },
    #[error("host port {port}/{proto} is asked for twice for {owner}: publish each host port once")]
    Twice {
        proto: PortProto,
        port: u16,
        owner: String,
    },
    #[error(
        "'{text}' is not a port mapping: {reason} (want HOST:CONTAINER[/tcp|/udp], e.g. 8080:80/tcp)"
    )]
    Parse { text: String, reason: String },
    #[error("'{network}' is not a valid network name for a published port: {error}")]
    Network {
        network: String,
        error: crate::names::NameError,
    },
    #[error("{step} {path}: {io}")]
    Io {
        step: &'static str,
        path: PathBuf,
        io: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("encode the published ports {path}: {error}")]
    Encode {
        path: PathBuf,
        error: serde_json::Error,
    },
}

type Result<T, E = PortError> = std::result::Result<T, E>;

impl fmt::Display for PortProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProto::Tcp => "tcp",
            PortProto::Udp => "udp",
        })
    }
}

impl FromStr for PortProto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(PortProto::Tcp),
            "udp" => Ok(PortProto::Udp),
            other => Err(format!("protocol '{other}' is neither tcp nor udp")),
        }
    }
}

/// A port to publish: any free host port of `host_first..=host_last` (one
/// port: both equal) to `container_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRequest {
    pub proto: PortProto,
    pub host_first: u16,
    pub host_last: u16,
    pub container_port: u16,
}

impl PortRequest {
    /// One host port.
    pub fn single(proto: PortProto, host_port: u16, container_port: u16) -> PortRequest {
        PortRequest {
            proto,
            host_first: host_port,
            host_last: host_port,
            container_port,
        }
    }
}

/// `HOST:CONTAINER[/tcp|/udp]` (tcp when no protocol is given); ports 1-65535.
impl FromStr for PortRequest {
    type Err = PortError;
    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: &str| PortError::Parse {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (ports, proto) = match text.split_once('/') {
            Some((p, proto)) => (p, proto.parse().map_err(|e: String| bad(&e))?),
            None => (text, PortProto::Tcp),
        };
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| bad("no ':' between the host and the container port"))?;
        let port = |s: &str, what: &str| -> Result<u16> {
            match s.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(bad(&format!("{what} port '{s}' is not a number 1-65535"))),
            }
        };
        Ok(PortRequest::single(
            proto,
            port(host, "host")?,
            port(container, "container")?,
        ))
    }
}

/// One published port of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Published {
    pub proto: PortProto,
    pub host_port: u16,
    pub container_port: u16,
}

/// What one record file holds: the ports of one container interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub network: NetworkName,
    #[serde(flatten)]
    pub owner: Owner,
    pub container_ip: Ipv4Addr,
    pub ports: Vec<Published>,
}

impl Publication {
    /// The host veth of the container interface (also the record's name).
    pub fn host_veth(&self) -> String {
        host_veth_name(
            self.network.as_str(),
            &self.owner.container_id,
            &self.owner.ifname,
        )
    }

    /// The owner as errors and `status` show it.
    pub fn owner_label(&self) -> String {
        owner_label(&self.owner)
    }

    /// The record as the plan's port specs.
    pub fn specs(&self) -> impl Iterator<Item = PortSpec> + '_ {
        self.ports.iter().map(|p| PortSpec {
            proto: p.proto,
            host_port: p.host_port,
            container_ip: self.container_ip,
            container_port: p.container_port,
            network: self.network.to_string(),
            owner: self.owner_label(),
        })
    }
}

/// `CONTAINER_ID`, or `CONTAINER_ID/IFNAME` for another interface than eth0.
pub fn owner_label(owner: &Owner) -> String {
    if owner.ifname == "eth0" {
        owner.container_id.clone()
    } else {
        format!("{}/{}", owner.container_id, owner.ifname)
    }
}

/// The published ports of one node (its state dir).
pub struct Ports {
    dir: PathBuf,
}

/// Holds the ports lock; released on drop.
pub struct PortsLock {
    file: File,
}

impl Drop for PortsLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl Ports {
    pub fn new(state_dir: &Path) -> Ports {
        Ports {
            dir: state_dir.join("ports"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PortError {
        let path = path.to_path_buf();
        move |io| PortError::Io { step, path, io }
    }

    /// Take the ports lock (waiting; see [`crate::state::lock_file`]).
    pub fn lock(&self) -> Result<PortsLock> {
        fs::create_dir_all(&self.dir).map_err(Self::io("create", &self.dir))?;
        let path = self.dir.join("lock");
        let file = crate::state::lock_file(&path).map_err(|(step, e)| Self::io(step, &path)(e))?;
        Ok(PortsLock { file })
    }

    fn path_of(&self, host_veth: &str) -> PathBuf {
        self.dir.join(format!("{host_veth}.json"))
    }

    /// Every record (unreadable files are skipped with a warning), by file name.
    pub fn list(&self) -> Result<Vec<Publication>> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io("read", &self.dir)(e)),
        };
        let mut out = BTreeMap::new();
        for e in rd {
            let e = e.map_err(Self::io("read", &self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            let data = fs::read(e.path()).unwrap_or_default();
            match serde_json::from_slice::<Publication>(&data) {
                Ok(p) => {
                    out.insert(name, p);
                }
                Err(err) => tracing::warn!(
                    "ignoring unreadable published-ports file {}: {err}",
                    e.path().display()
                ),
            }
        }
        Ok(out.into_values().collect())
    }

    /// Publish `requests` for `owner`'s interface at `container_ip` on
    /// `network`, replacing what it published before (publishing again is
    /// idempotent). A range takes its first port free on this node. Fails,
    /// changing nothing, if a host port is another record's. Returns the
    /// ports published. Pokes the agent afterwards.
    pub fn publish(
        &self,
        network: &str,
        owner: &Owner,
        container_ip: Ipv4Addr,
        requests: &[PortRequest],
    ) -> Result<Vec<Published>> {
        let network: NetworkName = network.parse().map_err(|error| PortError::Network {
            network: network.to_string(),
            error,
        })?;
        let _lock = self.lock()?;
        let mine = host_veth_name(network.as_str(), &owner.container_id, &owner.ifname);
        let others: Vec<Publication> = self
            .list()?
            .into_iter()
            .filter(|p| p.host_veth() != mine)
            .collect();
        let ports = choose(&others, owner, requests)?;
        let record = Publication {
            network,
            owner: owner.clone(),
            container_ip,
            ports: ports.clone(),
        };
        let path = self.path_of(&mine);
        if ports.is_empty() {
            self.remove(&path)?;
        } else {
            let json = serde_json::to_vec(&record).map_err(|error| PortError::Encode {
                path: path.clone(),
                error,
            })?;
            crate::state::write_atomic(&path, &json)?;
        }
        Ok(ports)
    }

    /// Remove everything `owner`'s interface on `network` published;
    /// returns whether there was anything. Unpublishing nothing is fine.
    pub fn unpublish(&self, network: &str, owner: &Owner) -> Result<bool> {
        let _lock = self.lock()?;
        let path = self.path_of(&host_veth_name(network, &owner.container_id, &owner.ifname));
        self.remove(&path)
    }

    /// Drop every record whose host veth is not in `veths` (the container
    /// is gone); returns the records dropped. `veths` must be listed with
    /// the lock held, so that a record published meanwhile is never
    /// judged by a list older than its veth.
    pub fn retain_attached(
        &self,
        _lock: &PortsLock,
        veths: &BTreeSet<String>,
    ) -> Result<Vec<Publication>> {
        let mut dropped = Vec::new();
        for p in self.list()? {
            let veth = p.host_veth();
            if !veths.contains(&veth) {
                self.remove(&self.path_of(&veth))?;
                dropped.push(p);
            }
        }
        Ok(dropped)
    }

    fn remove(&self, path: &Path) -> Result<bool> {
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Self::io("remove", path)(e)),
        }
    }
}

/// The host ports `requests` get, given the other records of the node:
/// each request its first free port, none twice. Pure.
fn choose(
    others: &[Publication],
    owner: &Owner,
    requests: &[PortRequest],
) -> Result<Vec<Published>> {
    let mut taken: BTreeMap<(PortProto, u16), (&Publication, u16)> = BTreeMap::new();
    for p in others {
        for port in &p.ports {
            taken.insert((port.proto, port.host_port), (p, port.container_port));
        }
    }
    let mut mine: BTreeSet<(PortProto, u16)> = BTreeSet::new();
    let mut out = Vec::new();
    for r in requests {
        let free = (r.host_first..=r.host_last)
            .find(|h| !taken.contains_key(&(r.proto, *h)) && !mine.contains(&(r.proto, *h)));
        let Some(host_port) = free else {
            if r.host_first == r.host_last {
                let key = (r.proto, r.host_first);
                return Err(match taken.get(&key) {
                    Some((p, container_port)) => PortError::Taken {
                        proto: r.proto,
                        port: r.host_first,
                        owner: p.owner_label(),
                        network: p.network.to_string(),
                        container_ip: p.container_ip,
                        container_port: *container_port,
                    },
                    None => PortError::Twice {
                        proto: r.proto,
                        port: r.host_first,
                        owner: owner_label(owner),
                    },
                });
            }
            let owners: BTreeSet<String> = (r.host_first..=r.host_last)
                .filter_map(|h| taken.get(&(r.proto, h)).map(|(p, _)| p.owner_label()))
                .collect();
            return Err(PortError::RangeTaken {
                proto: r.proto,
                first: r.host_first,
                last: r.host_last,
                owners: owners.into_iter().collect::<Vec<_>>().join(", "),
            });
        };
        mine.insert((r.proto, host_port));
        out.push(Published {
            proto: r.proto,
            host_port,
            container_port: r.container_port,
        });
    }
    out.sort();
    Ok(out)
}

/// Publish through the state dir's records and poke the agent: the one
/// call behind Docker `-p`, `vxmesh attach --publish` and the lab.
pub fn publish(
    state_dir: &Path,
    network: &str,
    owner: &Owner,
    container_ip: Ipv4Addr,
    requests: &[PortRequest],
) -> Result<Vec<Published>> {
    let ports = Ports::new(state_dir).publish(network, owner, container_ip, requests)?;
    crate::wake::poke(state_dir);
    Ok(ports)
}

/// Unpublish `owner`'s ports on `network` and poke the agent if there were any.
pub fn unpublish(state_dir: &Path, network: &str, owner: &Owner) -> Result<bool> {
    let removed = Ports::new(state_dir).unpublish(network, owner)?;
    if removed {
        crate::wake::poke(state_dir);
    }
    Ok(removed)
}

/// The records of a state dir.
pub fn list(state_dir: &Path) -> Result<Vec<Publication>> {
    Ports::new(state_dir).list()
}

/// The plan's ports: those of every record whose network is `served`.
pub fn planned(records: &[Publication], served: impl Fn(&str) -> bool) -> BTreeSet<PortSpec> {
    records
        .iter()
        .filter(|p| served(p.network.as_str()))
        .flat_map(Publication::specs)
        .collect()
}

#[cfg(test)]
mod tests;
