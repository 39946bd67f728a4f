//! Address allocation for containers, persisted in the node's state dir.
//!
//! One file per allocated address under `STATE/ipam/NETWORK/`, named by the
//! address and holding the owner (`container_id` and interface name) and,
//! for an attachment made by the CNI plugin, the CNI network `name` it was
//! made under (`cni_network`; files written before it existed have none and
//! read the same). Every
//! change happens under an exclusive `flock` on `STATE/ipam/NETWORK/lock`, so
//! concurrent attaches (CLI, CNI ADDs, the lab) never hand out one address
//! twice. A crash between allocation and interface creation leaves a file
//! whose owner GC can recognise and release.
//!
//! [`LocalAllocator`] is the [`AddressAllocator`] over these files alone
//! (static store; routed networks).

use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataplane::NetworkState;
use crate::dataplane::plan::usable_addresses;
use crate::store::AddressAllocator;
use crate::store::error::{Result, StoreError};

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

/// Parse the contents of an allocation file (`STATE/ipam/NETWORK/IP`).
pub fn parse_owner(data: &[u8]) -> serde_json::Result<Owner> {
    serde_json::from_slice(data)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub owner: Owner,
    /// The CNI network `name` the attachment was made under (`None`: made
    /// by `vxmesh attach`, the lab, or before vxmesh recorded it).
    pub cni_network: Option<String>,
}

/// What an allocation file holds.
#[derive(Serialize, Deserialize)]
struct AllocationFile {
    #[serde(flatten)]
    owner: Owner,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cni_network: Option<String>,
}

/// The allocator of one network on one node.
pub struct Ipam {
    dir: PathBuf,
}

/// Holds the allocator lock; released on drop.
pub struct IpamLock {
    file: File,
}

impl Drop for IpamLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl Ipam {
    pub fn new(state_dir: &Path, network: &str) -> Self {
        Ipam {
            dir: state_dir.join("ipam").join(network),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The networks that have an allocator directory in `state_dir` (an
    /// attach happened there once), also those no longer served.
    pub fn networks(state_dir: &Path) -> Vec<String> {
        let Ok(rd) = fs::read_dir(state_dir.join("ipam")) else {
            return Vec::new();
        };
        let mut out: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        out.sort();
        out
    }

    /// Take the allocator lock (waiting; see [`crate::state::lock_file`]).
    pub fn lock(&self) -> Result<IpamLock> {
        fs::create_dir_all(&self.dir).map_err(|e| StoreError::io("create", &self.dir, e))?;
        let path = self.dir.join("lock");
        let file =
            crate::state::lock_file(&path).map_err(|(step, e)| StoreError::io(step, &path, e))?;
        Ok(IpamLock { file })
    }

    /// The network's name (the last component of the allocator's directory).
    fn network_name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn path_of(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Every current allocation (call with the lock held for a consistent view).
    pub fn list(&self) -> Result<Vec<Allocation>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreError::io("read", &self.dir, e)),
        };
        for e in rd {
            let e = e.map_err(|e| StoreError::io("read", &self.dir, e))?;
            let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let data = fs::read(e.path()).unwrap_or_default();
            match serde_json::from_slice::<AllocationFile>(&data) {
                Ok(f) => out.push(Allocation {
                    ip,
                    owner: f.owner,
                    cni_network: f.cni_network,
                }),
                Err(_) => {
                    tracing::warn!("ignoring unreadable allocation file {}", e.path().display())
                }
            }
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// The address held by `owner`, if any.
    pub fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| &a.owner == owner)
            .map(|a| a.ip))
    }

    /// Allocate an address from the network's pool for `owner` (returns the
    /// existing one if the owner already holds an address). `want` asks for a
    /// specific address.
    pub fn allocate(
        &self,
        net: &NetworkState,
        owner: &Owner,
        want: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr> {
        let _lock = self.lock()?;
        let current = self.list()?;
        if let Some(a) = current.iter().find(|a| &a.owner == owner) {
            return Ok(a.ip);
        }
        let taken: std::collections::HashSet<Ipv4Addr> = current.iter().map(|a| a.ip).collect();
        let ip = match want {
            Some(ip) => {
                if !usable_addresses(net.pool, net.subnet, net.gateway).any(|a| a == ip) {
                    return Err(StoreError::NotInPool {
                        ip,
                        pool: net.pool,
                        network: net.network.clone(),
                    });
                }
                if taken.contains(&ip) {
                    return Err(StoreError::AlreadyAllocated {
                        ip,
                        network: net.network.clone(),
                    });
                }
                ip
            }
            None => usable_addresses(net.pool, net.subnet, net.gateway)
                .find(|a| !taken.contains(a))
                .ok_or_else(|| StoreError::PoolFull {
                    network: net.network.clone(),
                    pool: net.pool,
                    in_use: taken.len(),
                })?,
        };
        self.write_owner(ip, owner)?;
        Ok(ip)
    }

    /// Record `ip` as held by `owner`: an address allocated elsewhere
    /// (network-wide, in etcd). Needs the lock; fails if `ip` is taken here.
    pub fn record(&self, _lock: &IpamLock, owner: &Owner, ip: Ipv4Addr) -> Result<()> {
        if let Some(a) = self
            .list()?
            .into_iter()
            .find(|a| a.ip == ip && &a.owner != owner)
        {
            return Err(StoreError::AllocatedHere {
                ip,
                network: self.network_name(),
                container_id: a.owner.container_id,
                ifname: a.owner.ifname,
            });
        }
        self.write_owner(ip, owner)
    }

    /// Who holds `ip`, if anyone.
    pub fn holder(&self, ip: Ipv4Addr) -> Result<Option<Owner>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.ip == ip)
            .map(|a| a.owner))
    }

    /// Hand `ip` over to `to` (with the lock held): a runtime that learns
    /// who an address is for only after allocating it (Docker's IPAM asks
    /// for an address before the endpoint exists) records the real owner.
    pub fn reassign(&self, _lock: &IpamLock, ip: Ipv4Addr, to: &Owner) -> Result<()> {
        self.write_owner(ip, to)
    }

    /// Put back an allocation whose file was lost (the agent, from memory),
    /// with its CNI network. Needs the lock; fails if `ip` is taken here.
    pub fn restore(&self, lock: &IpamLock, a: &Allocation) -> Result<()> {
        self.record(lock, &a.owner, a.ip)?;
        if let Some(name) = &a.cni_network {
            self.write_file(a.ip, &a.owner, Some(name))?;
        }
        Ok(())
    }

    /// Record that `owner`'s attachment was made under the CNI network
    /// `cni_network` (GC collects only its own network's attachments).
    /// Nothing to do if `owner` holds no address.
    pub fn label(&self, owner: &Owner, cni_network: &str) -> Result<()> {
        let _lock = self.lock()?;
        match self.find(owner)? {
            Some(ip) => self.write_file(ip, owner, Some(cni_network)),
            None => Ok(()),
        }
    }

    /// Write `ip`'s file for `owner`, keeping the CNI network it was
    /// labelled with if the file already names the same owner.
    fn write_owner(&self, ip: Ipv4Addr, owner: &Owner) -> Result<()> {
        let kept = fs::read(self.path_of(ip))
            .ok()
            .and_then(|d| serde_json::from_slice::<AllocationFile>(&d).ok())
            .filter(|f| &f.owner == owner)
            .and_then(|f| f.cni_network);
        self.write_file(ip, owner, kept.as_deref())
    }

    /// Write to a temp file and rename: readers and a crash of this process
    /// see the old file or the whole new one. No fsync: an allocation lives
    /// as long as the container's veth, which a reboot removes too (the
    /// state dir is on /run); a file torn by power loss reads as free.
    fn write_file(&self, ip: Ipv4Addr, owner: &Owner, cni_network: Option<&str>) -> Result<()> {
        let path = self.path_of(ip);
        let tmp = self.dir.join(format!(".{ip}.tmp"));
        let file = AllocationFile {
            owner: owner.clone(),
            cni_network: cni_network.map(str::to_string),
        };
        let json = serde_json::to_string(&file).map_err(|error| StoreError::Encode {
            path: path.clone(),
            error,
        })?;
        let mut f = File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
        f.write_all(json.as_bytes())
            .map_err(|e| StoreError::io("write", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename to", &path, e))
    }

    /// Release whatever `owner` holds, with the lock already held.
    pub fn release_locked(&self, _lock: &IpamLock, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        let Some(ip) = self.find(owner)? else {
            return Ok(None);
        };
        let path = self.path_of(ip);
        fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
        Ok(Some(ip))
    }

    /// Release whatever `owner` holds. Releasing nothing is fine.
    pub fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        let lock = self.lock()?;
        self.release_locked(&lock, owner)
    }

    /// Release every allocation for which `keep` returns false; returns them.
    pub fn retain(&self, mut keep: impl FnMut(&Allocation) -> bool) -> Result<Vec<Allocation>> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for a in self.list()? {
            if !keep(&a) {
                let path = self.path_of(a.ip);
                fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
                released.push(a);
            }
        }
        Ok(released)
    }
}

/// The [`AddressAllocator`] of a network whose addresses are this node's
/// alone: the file IPAM over the node's pool.
pub struct LocalAllocator {
    ipam: Ipam,
    net: NetworkState,
}

impl LocalAllocator {
    pub fn new(ipam: Ipam, net: NetworkState) -> Self {
        LocalAllocator { ipam, net }
    }
}

impl AddressAllocator for LocalAllocator {
    async fn claim(&self, owner: &Owner, want: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        self.ipam.allocate(&self.net, owner, want)
    }

    async fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        self.ipam.release(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::model::Vni;

    fn net(pool: &str) -> NetworkState {
        NetworkState {
            network: "demo".into(),
            mode: Mode::Routed,
            vni: Vni::new(100).unwrap(),
            bridge: "vxm-br0".into(),
            vtep: "vxm-vx100".into(),
            mtu: 1450,
            subnet: pool.parse().unwrap(),
            pool: pool.parse().unwrap(),
            gateway: Some(crate::dataplane::plan::gateway(pool.parse().unwrap())),
        }
    }

    fn owner(i: usize) -> Owner {
        Owner {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocate_release_reuse() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(d.path(), "demo");
        let n = net("172.18.10.0/24");
        let a = ipam.allocate(&n, &owner(1), None).unwrap();
        assert_eq!(a, Ipv4Addr::new(172, 18, 10, 2));
        assert_eq!(
            ipam.allocate(&n, &owner(1), None).unwrap(),
            a,
            "same owner, same address"
        );
        let b = ipam.allocate(&n, &owner(2), None).unwrap();
        assert_eq!(b, Ipv4Addr::new(172, 18, 10, 3));
        assert_eq!(ipam.release(&owner(1)).unwrap(), Some(a));
        assert_eq!(ipam.release(&owner(1)).unwrap(), None);
        assert_eq!(ipam.allocate(&n, &owner(3), None).unwrap(), a);
        assert!(ipam.allocate(&n, &owner(4), Some(b)).is_err());
        assert!(
            ipam.allocate(&n, &owner(4), Some(Ipv4Addr::new(172, 18, 10, 1)))
                .is_err(),
            "gateway"
        );
    }

    #[test]
    fn exhaustion_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(d.path(), "demo");
        let n = net("172.18.10.0/29"); // .2 .. .6 usable
        for i in 0..5 {
            ipam.allocate(&n, &owner(i), None).unwrap();
        }
        let e = ipam.allocate(&n, &owner(9), None).unwrap_err().to_string();
        assert!(e.contains("no free address left"), "{e}");
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let n = net("172.18.10.0/24");
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let dir = d.path().to_path_buf();
                let n = n.clone();
                std::thread::spawn(move || {
                    Ipam::new(&dir, "demo")
                        .allocate(&n, &owner(i), None)
                        .unwrap()
                })
            })
            .collect();
        let mut ips: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 50);
    }

    #[test]
    fn retain_releases_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(d.path(), "demo");
        let n = net("172.18.10.0/24");
        for i in 0..4 {
            ipam.allocate(&n, &owner(i), None).unwrap();
        }
        let gone = ipam.retain(|a| a.owner.container_id != "c2").unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(ipam.list().unwrap().len(), 3);
    }

    #[test]
    fn cni_network_label_is_kept_and_old_files_read() {
        let d = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(d.path(), "demo");
        let n = net("172.18.10.0/24");
        let a = ipam.allocate(&n, &owner(1), None).unwrap();
        // A file written before the label existed.
        fs::write(
            ipam.dir().join("172.18.10.9"),
            r#"{"container_id":"old","ifname":"eth0"}"#,
        )
        .unwrap();
        ipam.label(&owner(1), "podman").unwrap();
        ipam.label(&owner(7), "podman").unwrap(); // holds nothing: no-op
        // Re-recording the same owner (etcd re-claim) keeps the label.
        let lock = ipam.lock().unwrap();
        ipam.record(&lock, &owner(1), a).unwrap();
        drop(lock);
        let list = ipam.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].cni_network.as_deref(), Some("podman"));
        assert_eq!(list[1].owner.container_id, "old");
        assert_eq!(list[1].cni_network, None);
        // Older readers still read the owner.
        let raw = fs::read(ipam.dir().join(a.to_string())).unwrap();
        assert_eq!(parse_owner(&raw).unwrap(), owner(1));
        // Restored from memory with its label.
        let first = list[0].clone();
        fs::remove_file(ipam.dir().join(a.to_string())).unwrap();
        let lock = ipam.lock().unwrap();
        ipam.restore(&lock, &first).unwrap();
        drop(lock);
        assert_eq!(ipam.list().unwrap()[0], first);
    }
}
