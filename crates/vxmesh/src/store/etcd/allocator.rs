//! The etcd address allocator of bridged networks: attach claims an address
//! network-wide with [`claim_address`] (compare-and-swap, bound to the
//! agent's lease read from the network's state file) and records it in the
//! node's file IPAM, all under the IPAM lock (the agent publishes the
//! node's endpoints under it too).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::remote::{claim_address_except, release_address};
use crate::dataplane::netns::Netns;
use crate::ipam::{Ipam, Owner};
use crate::state::{self, EtcdSection, ServedNetwork};
use crate::store::allocator::{AddressAllocator, AllocatorSpec};
use crate::store::error::{Result, StoreError};

/// How many times a claim waits for the agent to renew a lost lease.
const LEASE_RENEWALS: u32 = 3;
/// How long one wait for a renewed lease lasts.
const LEASE_RENEWAL_WAIT: Duration = Duration::from_secs(5);

/// Claims the addresses of one bridged network in etcd for this node.
pub struct EtcdAllocator<'a> {
    ipam: Ipam,
    state_dir: PathBuf,
    network: String,
    /// Where free addresses are looked for first: the node's slice.
    start: Ipv4Addr,
    /// The agent's connection settings and lease (renewed when the agent
    /// re-grants its lease).
    section: Mutex<Box<EtcdSection>>,
    host_ns: Option<&'a Netns>,
}

impl<'a> EtcdAllocator<'a> {
    pub(crate) fn new(
        ipam: Ipam,
        state_dir: &Path,
        served: &ServedNetwork,
        section: EtcdSection,
        host_ns: Option<&'a Netns>,
    ) -> Self {
        EtcdAllocator {
            ipam,
            state_dir: state_dir.to_path_buf(),
            network: served.state.network.clone(),
            start: served.state.pool.network(),
            section: Mutex::new(Box::new(section)),
            host_ns,
        }
    }

    /// The etcd section in use (the state file's, or a renewed one).
    pub fn section(&self) -> EtcdSection {
        let sec = self.section.lock().unwrap_or_else(|e| e.into_inner());
        EtcdSection::clone(&sec)
    }

    /// Run an etcd job where etcd is reachable: in the node's namespace
    /// when attaching from outside it (the lab), else right here.
    async fn in_host_ns<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match self.host_ns {
            Some(ns) => ns
                .run_async(move || async move {
                    Ok::<_, crate::dataplane::netns::NetnsError>(f().await)
                })
                .await
                .map_err(|e| StoreError::Namespace {
                    name: ns.name().to_string(),
                    message: format!("{e:#}"),
                })?,
            None => f().await,
        }
    }

    async fn release_in_etcd(&self, ip: Ipv4Addr) -> Result<()> {
        let sec = self.section();
        self.in_host_ns(move || async move { release_address(&sec, ip).await })
            .await
    }
}

impl AddressAllocator for EtcdAllocator<'_> {
    /// The owner's address, `want`, or a free one from the node's slice on,
    /// claimed in etcd and recorded in the file IPAM. If the agent's lease
    /// is gone, waits a moment for the agent to write a renewed one into
    /// the state file and retries.
    async fn claim(&self, owner: &Owner, want: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let lock = self.ipam.lock()?;
        let held = self.ipam.find(owner)?;
        let want = held.or(want);
        if held.is_none()
            && let Some(w) = want
            && let Some(a) = self.ipam.list()?.into_iter().find(|a| a.ip == w)
        {
            return Err(StoreError::AllocatedHere {
                ip: w,
                network: self.network.clone(),
                container_id: a.owner.container_id,
                ifname: a.owner.ifname,
            });
        }
        let start = self.start;
        // Addresses this node's IPAM holds are never "free" here, even if
        // their etcd record is gone: attach could not record them.
        let local: BTreeSet<Ipv4Addr> = self.ipam.list()?.into_iter().map(|a| a.ip).collect();
        let mut renewals = 0;
        let ep = loop {
            let sec = self.section();
            let local = local.clone();
            let claimed = self
                .in_host_ns(
                    move || async move { claim_address_except(&sec, want, start, &local).await },
                )
                .await;
            match claimed {
                Ok(ep) => break ep,
                Err(StoreError::LeaseGone { lease }) if renewals < LEASE_RENEWALS => {
                    renewals += 1;
                    let old = self.section();
                    let renewed = wait_for_new_lease(
                        &self.state_dir,
                        &self.network,
                        (old.lease, old.hold_lease),
                        LEASE_RENEWAL_WAIT,
                    )
                    .await
                    .ok_or(StoreError::LeaseGone { lease })?;
                    **self.section.lock().unwrap_or_else(|e| e.into_inner()) = renewed;
                }
                Err(e) => {
                    return Err(StoreError::Claim {
                        network: self.network.clone(),
                        cause: Box::new(e),
                    });
                }
            }
        };
        if let Err(e) = self.ipam.record(&lock, owner, ep.ip) {
            let _ = self.release_in_etcd(ep.ip).await;
            return Err(e);
        }
        Ok(ep.ip)
    }

    /// Release in the file IPAM, then in etcd. An etcd failure is only
    /// logged: the agent withdraws the endpoint (it publishes exactly what
    /// the file IPAM holds).
    async fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        let lock = self.ipam.lock()?;
        let ip = self.ipam.release_locked(&lock, owner)?;
        if let Some(ip) = ip
            && let Err(e) = self.release_in_etcd(ip).await
        {
            tracing::warn!(
                "detach {}: {ip} stays published in etcd until the agent withdraws it: {e:#}",
                owner.container_id
            );
        }
        drop(lock);
        Ok(ip)
    }
}

/// The network's etcd section once the agent has written leases (node,
/// hold) other than `old` (it renews a lost lease within a few seconds),
/// or None.
async fn wait_for_new_lease(
    state_dir: &Path,
    network: &str,
    old: (i64, i64),
    timeout: Duration,
) -> Option<EtcdSection> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(s) = state::read_network(state_dir, network)
            && let AllocatorSpec::Etcd(sec) = s.allocator
            && (sec.lease, sec.hold_lease) != old
        {
            return Some(*sec);
        }
    }
    None
}
