//! The secure underlay at run time: makes the TUN device, its address and
//! the running data path match a [`SecurePlan`], pass after pass. The TUN
//! device is persistent, so an agent restart keeps it (and the routes
//! through it); only the sessions are renegotiated.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;

use super::datapath::DataPath;
use super::keys::{self, KeyError, PublicKey};
use super::peers::{PeerChanges, PeerStats, PeerTable};
use super::plan::SecurePlan;
use super::transport::TUN_ALIAS;
use super::tun::{Tun, TunError};
use crate::dataplane::kernel::{LinkOptions, Netlink, NetlinkError};

pub mod report;
pub use report::{PeerReport, UnderlayReport};

/// A failure bringing the secure underlay up.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("secure underlay key: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error("cannot bind the WireGuard port udp/{port} in namespace {namespace}: {source}")]
    Socket {
        port: u16,
        namespace: String,
        source: std::io::Error,
    },
    #[error("cannot start the WireGuard data path threads: {0}")]
    Threads(std::io::Error),
    #[error(
        "device {dev} exists with alias {alias:?}: it is not vxmesh's secure underlay; rename or remove it"
    )]
    Foreign { dev: String, alias: Option<String> },
    #[error(
        "this node's key (public {own}) is not the public_key the store lists for it ({listed}): list {own}, or use the key file that matches {listed}"
    )]
    KeyMismatch { own: PublicKey, listed: PublicKey },
    #[error(transparent)]
    Kernel(#[from] NetlinkError),
    #[error("namespace: {0}")]
    Namespace(#[from] crate::dataplane::netns::NetnsError),
}

struct Running {
    dev: String,
    port: u16,
    datapath: DataPath,
    /// Unix time (ms) the data path started (for the doctor's handshake
    /// grace).
    started_ms: u64,
}

/// The node's secure underlay: its key and, while it serves an encrypted
/// network, the running data path.
pub struct SecureUnderlay {
    key_file: Option<PathBuf>,
    state_dir: PathBuf,
    running: Option<Running>,
}

impl SecureUnderlay {
    /// The key comes from `key_file`, else `STATE_DIR/wg.key` (created on
    /// first use).
    pub fn new(key_file: Option<PathBuf>, state_dir: PathBuf) -> Self {
        SecureUnderlay {
            key_file,
            state_dir,
            running: None,
        }
    }

    /// This node's public key (creating the key if needed).
    pub fn public_key(&self) -> Result<PublicKey, SecureError> {
        Ok(keys::load_or_create(self.key_file.as_deref(), &self.state_dir)?.public())
    }

    /// Make the kernel and the data path match `plan` (`None`: no encrypted
    /// network is served, so the data path stops and the device goes).
    pub async fn apply(
        &mut self,
        nl: &Netlink,
        plan: Option<&SecurePlan>,
    ) -> Result<PeerChanges, SecureError> {
        let Some(plan) = plan else {
            if let Some(r) = self.running.take() {
                let dev = r.dev.clone();
                drop(r);
                remove_device(nl, &dev).await?;
            }
            return Ok(PeerChanges::default());
        };
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.port != plan.port || r.dev != plan.dev)
        {
            self.running = None;
        }
        if self.running.is_none() {
            self.running = Some(self.start(nl, plan).await?);
        }
        nl.set_link(
            &plan.dev,
            LinkOptions {
                up: Some(true),
                mtu: Some(plan.mtu),
                alias: Some(TUN_ALIAS.to_string()),
                ..Default::default()
            },
        )
        .await?;
        nl.add_address(&plan.dev, plan.addr).await?;
        let running = self.running.as_ref().expect("started above");
        let changes = running
            .datapath
            .table()
            .write()
            .expect("peer table lock")
            .set_peers(&plan.peer_specs());
        if changes != PeerChanges::default() {
            tracing::info!(?changes, "secure underlay peers");
        }
        Ok(changes)
    }

    async fn start(&self, nl: &Netlink, plan: &SecurePlan) -> Result<Running, SecureError> {
        if let Some(link) = nl.get_link(&plan.dev).await?
            && link.alias.as_deref() != Some(TUN_ALIAS)
        {
            return Err(SecureError::Foreign {
                dev: plan.dev.clone(),
                alias: link.alias,
            });
        }
        let key = keys::load_or_create(self.key_file.as_deref(), &self.state_dir)?;
        if let Some(listed) = plan.own_key
            && listed != key.public()
        {
            return Err(SecureError::KeyMismatch {
                own: key.public(),
                listed,
            });
        }
        let (dev, port) = (plan.dev.clone(), plan.port);
        let namespace = nl.namespace().to_string();
        // Both are created in the namespace the netlink socket serves.
        let (tun, socket) = nl.netns().run(move || -> Result<_, SecureError> {
            let tun = Tun::open(&dev, true)?;
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map_err(
                |source| SecureError::Socket {
                    port,
                    namespace,
                    source,
                },
            )?;
            Ok((tun, socket))
        })?;
        let datapath =
            DataPath::start(tun, socket, PeerTable::new(key)).map_err(SecureError::Threads)?;
        tracing::info!(dev = %plan.dev, port, "secure underlay started");
        Ok(Running {
            dev: plan.dev.clone(),
            port: plan.port,
            datapath,
            started_ms: report::now_ms(),
        })
    }

    /// Per-peer statistics (empty while stopped).
    pub fn stats(&self) -> Vec<PeerStats> {
        self.running
            .as_ref()
            .map(|r| r.datapath.table().read().expect("peer table lock").stats())
            .unwrap_or_default()
    }

    /// Packets dropped for want of a peer (no key, unknown address).
    pub fn dropped_no_peer(&self) -> u64 {
        self.running.as_ref().map_or(0, |r| {
            r.datapath
                .table()
                .read()
                .expect("peer table lock")
                .dropped_no_peer
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }
}

/// Delete the secure underlay's device if it is vxmesh's (for `down` and
/// when no encrypted network is left).
pub async fn remove_device(nl: &Netlink, dev: &str) -> Result<(), SecureError> {
    match nl.get_link(dev).await? {
        Some(l) if l.alias.as_deref() == Some(TUN_ALIAS) => Ok(nl.delete_link(dev).await?),
        _ => Ok(()),
    }
}

/// `down`'s part: delete the secure underlay's device if it is vxmesh's,
/// moving it from the report's skipped devices (the generic teardown does
/// not know its alias) to the deleted ones.
pub async fn teardown(nl: &Netlink, report: &mut crate::dataplane::kernel::TeardownReport) {
    let dev = super::transport::TUN_NAME;
    match nl.get_link(dev).await {
        Ok(Some(l)) if l.alias.as_deref() == Some(TUN_ALIAS) => match nl.delete_link(dev).await {
            Ok(()) => {
                report.skipped.retain(|s| s.split(' ').next() != Some(dev));
                report.links_deleted.push(dev.to_string());
            }
            Err(e) => report.errors.push(e.to_string()),
        },
        Ok(_) => {}
        Err(e) => report.errors.push(e.to_string()),
    }
}
