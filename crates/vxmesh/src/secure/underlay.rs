//! The secure underlay at run time: makes the TUN device, its address and
//! the running data path match a [`SecurePlan`], pass after pass. The TUN
//! device is persistent, so an agent restart keeps it (and the routes
//! through it); only the sessions are renegotiated.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::datapath::DataPath;
use super::keys::{self, KeyError, ListedKeys, PrivateKey, PublicKey};
use super::peers::{PeerChanges, PeerStats, PeerTable, SWITCH_DEADLINE, SwitchProgress};
use super::plan::SecurePlan;
use super::transport::TUN_ALIAS;
use super::tun::{Tun, TunError};
use crate::dataplane::kernel::{LinkInfo, LinkOptions, Netlink, NetlinkError};

pub mod report;
pub use report::{PeerReport, RotationReport, SwitchReport, UnderlayReport};

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
    /// The key in use.
    current: PrivateKey,
    /// When the switch to the next key began (a rotation under way).
    switch_started: Option<Instant>,
    /// Unix time (ms) the data path started (for the doctor's handshake
    /// grace).
    started_ms: u64,
}

/// What a pass does with this node's keys (see [`key_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStep {
    /// Use the current key only (no rotation, or the next key not listed yet).
    Current,
    /// The next key is listed: keep both, start handshakes with the next.
    Switch,
    /// Every peer uses the next key (or the deadline passed): it replaces
    /// the current one.
    Finish,
    /// The next key file holds the current key (a finished rotation whose
    /// file was left): remove it.
    DropStaleNext,
    /// The store lists keys for this node, none of them its own.
    Mismatch,
}

/// The rotation's state machine (pure): from this node's key, its next
/// key if a rotation is under way, what the store lists for it, and (while
/// switching) how long and how far the switch has gone.
pub fn key_step(
    current: PublicKey,
    next: Option<PublicKey>,
    listed: ListedKeys,
    switching: Option<(Duration, &SwitchProgress)>,
) -> KeyStep {
    match next {
        Some(n) if n == current => KeyStep::DropStaleNext,
        Some(n) if listed.lists(n) => match switching {
            Some((elapsed, p)) if p.done() || elapsed >= SWITCH_DEADLINE => KeyStep::Finish,
            _ => KeyStep::Switch,
        },
        _ if (listed.public_key.is_some() || listed.next_public_key.is_some())
            && !listed.lists(current) =>
        {
            KeyStep::Mismatch
        }
        _ => KeyStep::Current,
    }
}

/// The node's secure underlay: its key and, while it serves an encrypted
/// network, the running data path.
pub struct SecureUnderlay {
    key_file: Option<PathBuf>,
    state_dir: PathBuf,
    running: Option<Running>,
    /// The key the store listed for this node at the last [`Self::apply`]
    /// (also one that was refused as a mismatch), for the report: between
    /// passes the report is made from the last good plan, which still
    /// lists the old key.
    listed_seen: Option<PublicKey>,
}

impl SecureUnderlay {
    /// The key comes from `key_file`, else `STATE_DIR/wg.key` (created on
    /// first use).
    pub fn new(key_file: Option<PathBuf>, state_dir: PathBuf) -> Self {
        SecureUnderlay {
            key_file,
            state_dir,
            running: None,
            listed_seen: None,
        }
    }

    /// This node's public key (creating the key if needed).
    pub fn public_key(&self) -> Result<PublicKey, SecureError> {
        Ok(keys::load_or_create(self.key_file.as_deref(), &self.state_dir)?.public())
    }

    /// The keys this node's record must list (stores that publish them,
    /// etcd): the key in use (created if needed) and, while a rotation is
    /// under way, the next one.
    pub fn listed_keys(&self) -> Result<ListedKeys, SecureError> {
        listed_keys(self.key_file.as_deref(), &self.state_dir)
    }

    /// How far this node's switch to its next key is (`None`: no switch
    /// under way).
    pub fn rotation(&self) -> Option<SwitchProgress> {
        let r = self.running.as_ref()?;
        r.datapath
            .table()
            .read()
            .expect("peer table lock")
            .switch_progress()
    }

    /// The key file rotations replace: the configured one, else the state dir's.
    fn key_path(&self) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join(keys::STATE_KEY_FILE))
    }

    /// This pass's key step; with [`KeyStep::Mismatch`] an error.
    fn step(
        &self,
        current: &PrivateKey,
        next: Option<&PrivateKey>,
        plan: &SecurePlan,
    ) -> Result<KeyStep, SecureError> {
        let listed = ListedKeys {
            public_key: plan.own_key,
            next_public_key: plan.own_next_key,
        };
        let progress = self.running.as_ref().and_then(|r| {
            let started = r.switch_started?;
            let p = r
                .datapath
                .table()
                .read()
                .expect("peer table lock")
                .switch_progress()?;
            Some((started.elapsed(), p))
        });
        let step = key_step(
            current.public(),
            next.map(|k| k.public()),
            listed,
            progress.as_ref().map(|(d, p)| (*d, p)),
        );
        if step == KeyStep::Mismatch {
            return Err(SecureError::KeyMismatch {
                own: current.public(),
                listed: listed
                    .public_key
                    .or(listed.next_public_key)
                    .expect("Mismatch needs a listed key"),
            });
        }
        Ok(step)
    }

    /// Apply `step` to the running data path's keys.
    fn rotate(&mut self, step: KeyStep, next: Option<PrivateKey>) -> Result<(), SecureError> {
        let key_path = self.key_path();
        let state_dir = self.state_dir.clone();
        let r = self.running.as_mut().expect("started");
        let mut table = r.datapath.table().write().expect("peer table lock");
        match (step, next) {
            (KeyStep::Switch, Some(next)) => {
                if r.switch_started.is_none() {
                    tracing::info!(next = %next.public(), "key rotation: the next key is listed, switching to it");
                    r.switch_started = Some(Instant::now());
                }
                table.set_keys(r.current.clone(), Some(next));
            }
            (KeyStep::Finish, Some(next)) => {
                keys::replace_key_file(&key_path, &next)?;
                remove_next(&state_dir)?;
                let took = r.switch_started.take().map(|t| t.elapsed());
                tracing::info!(
                    old = %r.current.public(), new = %next.public(), ?took, key_file = %key_path.display(),
                    "key rotation done: every peer uses the new key; the old one can be unlisted"
                );
                r.current = next.clone();
                table.set_keys(next, None);
                // The store must list the new key alone (etcd): a pass now.
                crate::wake::poke(&state_dir);
            }
            (KeyStep::DropStaleNext, _) => {
                remove_next(&state_dir)?;
                r.switch_started = None;
                table.set_keys(r.current.clone(), None);
            }
            _ => {
                r.switch_started = None;
                table.set_keys(r.current.clone(), None);
            }
        }
        Ok(())
    }

    /// Make the kernel and the data path match `plan` (`None`: no encrypted
    /// network is served, so the data path stops and the device goes).
    pub async fn apply(
        &mut self,
        nl: &Netlink,
        plan: Option<&SecurePlan>,
    ) -> Result<PeerChanges, SecureError> {
        self.listed_seen = plan.and_then(|p| p.own_key);
        let Some(plan) = plan else {
            if let Some(r) = self.running.take() {
                let dev = r.dev.clone();
                drop(r);
                remove_device(nl, &dev).await?;
            }
            // No tunnel to keep: a rotation finishes at once.
            if let Some(next) = keys::read_next(&self.state_dir)? {
                keys::replace_key_file(&self.key_path(), &next)?;
                remove_next(&self.state_dir)?;
                tracing::info!(new = %next.public(), "key rotation done (no encrypted network served)");
                crate::wake::poke(&self.state_dir);
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
        let current = match &self.running {
            Some(r) => r.current.clone(),
            None => keys::load_or_create(self.key_file.as_deref(), &self.state_dir)?,
        };
        let next = keys::read_next(&self.state_dir)?;
        // Refused before anything is created.
        let step = self.step(&current, next.as_ref(), plan)?;
        if step == KeyStep::Current
            && let Some(n) = &next
            && self.running.is_none()
        {
            tracing::warn!(next = %n.public(), "key rotation: list this node's next key (next_public_key) in the store to switch to it");
        }
        if self.running.is_none() {
            self.running = Some(self.start(nl, plan, current).await?);
        }
        self.rotate(step, next)?;
        // Set only what differs: every set notifies, and a notification on
        // an owned device wakes this agent for another pass.
        let actual = nl.get_link(&plan.dev).await?;
        if let Some(fix) = link_fix(actual.as_ref(), plan.mtu) {
            nl.set_link(&plan.dev, fix).await?;
        }
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

    async fn start(
        &self,
        nl: &Netlink,
        plan: &SecurePlan,
        key: PrivateKey,
    ) -> Result<Running, SecureError> {
        if let Some(link) = nl.get_link(&plan.dev).await?
            && link.alias.as_deref() != Some(TUN_ALIAS)
        {
            return Err(SecureError::Foreign {
                dev: plan.dev.clone(),
                alias: link.alias,
            });
        }
        let (dev, port) = (plan.dev.clone(), plan.port);
        let namespace = nl.namespace().to_string();
        // Both are created in the namespace the netlink socket serves.
        let (tun, socket) = nl.netns().run(move || -> Result<_, SecureError> {
            let tun = Tun::open_offloaded(&dev, true)?;
            // Only speed depends on it: say so and go on without.
            if let Err(e) = super::tun::set_threaded_napi(&dev) {
                tracing::info!(%dev, "threaded NAPI not set (received packets are not merged): {e}");
            }
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map_err(
                |source| SecureError::Socket {
                    port,
                    namespace,
                    source,
                },
            )?;
            Ok((tun, socket))
        })?;
        let state_dir = self.state_dir.clone();
        let switched = Box::new(move || {
            crate::wake::poke(&state_dir);
        });
        let datapath = DataPath::start_with(tun, socket, PeerTable::new(key.clone()), switched)
            .map_err(SecureError::Threads)?;
        tracing::info!(dev = %plan.dev, port, "secure underlay started");
        Ok(Running {
            dev: plan.dev.clone(),
            port: plan.port,
            datapath,
            current: key,
            switch_started: None,
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

/// What to set on the secure underlay's device so that it is up, with
/// `mtu` and vxmesh's alias; `None` when it already is.
fn link_fix(actual: Option<&LinkInfo>, mtu: u32) -> Option<LinkOptions> {
    let want_alias = Some(TUN_ALIAS);
    let fix = LinkOptions {
        up: (!actual.is_some_and(|l| l.up)).then_some(true),
        mtu: (actual.map(|l| l.mtu) != Some(mtu)).then_some(mtu),
        alias: (actual.and_then(|l| l.alias.as_deref()) != want_alias)
            .then(|| TUN_ALIAS.to_string()),
        ..Default::default()
    };
    (fix != LinkOptions::default()).then_some(fix)
}

/// The keys a node's record lists: its key (from `key_file`, else the state
/// dir's, created if needed) and the next one of a rotation under way.
pub fn listed_keys(key_file: Option<&Path>, state_dir: &Path) -> Result<ListedKeys, SecureError> {
    let current = keys::load_or_create(key_file, state_dir)?.public();
    let next = keys::read_next(state_dir)?
        .map(|k| k.public())
        .filter(|n| *n != current);
    Ok(ListedKeys {
        public_key: Some(current),
        next_public_key: next,
    })
}

fn remove_next(state_dir: &Path) -> Result<(), KeyError> {
    let path = state_dir.join(keys::NEXT_KEY_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(KeyError::Io { path, source: e }),
        _ => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PublicKey {
        PrivateKey::generate().unwrap().public()
    }

    fn tun(up: bool, mtu: u32, alias: Option<&str>) -> LinkInfo {
        LinkInfo {
            name: "vxm-wg0".into(),
            index: 7,
            kind: Some("tun".into()),
            mtu,
            mac: None,
            master: None,
            up,
            oper: "unknown".into(),
            alias: alias.map(str::to_string),
        }
    }

    /// A device as planned gets no set (a set notifies, and the
    /// notification would wake the agent for another pass, forever).
    #[test]
    fn the_device_is_set_only_where_it_differs() {
        assert_eq!(
            link_fix(Some(&tun(true, 1390, Some(TUN_ALIAS))), 1390),
            None
        );
        let fix = link_fix(Some(&tun(false, 1390, Some(TUN_ALIAS))), 1390).unwrap();
        assert_eq!(
            (fix.up, fix.mtu, fix.alias.as_deref()),
            (Some(true), None, None)
        );
        let fix = link_fix(Some(&tun(true, 1500, None)), 1390).unwrap();
        assert_eq!(
            (fix.up, fix.mtu, fix.alias.as_deref()),
            (None, Some(1390), Some(TUN_ALIAS))
        );
        let fix = link_fix(None, 1390).unwrap();
        assert_eq!(
            (fix.up, fix.mtu, fix.alias.as_deref()),
            (Some(true), Some(1390), Some(TUN_ALIAS))
        );
    }

    fn listed(a: Option<PublicKey>, b: Option<PublicKey>) -> ListedKeys {
        ListedKeys {
            public_key: a,
            next_public_key: b,
        }
    }

    #[test]
    fn the_rotation_steps() {
        let (cur, next) = (key(), key());
        let s = Duration::from_secs;
        let open = SwitchProgress {
            peers: 2,
            switched: 1,
        };
        let done = SwitchProgress {
            peers: 2,
            switched: 2,
        };
        // No rotation: the key in use, listed or not (etcd before publishing).
        assert_eq!(
            key_step(cur, None, listed(Some(cur), None), None),
            KeyStep::Current
        );
        assert_eq!(
            key_step(cur, None, listed(None, None), None),
            KeyStep::Current
        );
        // A next key not listed yet: wait.
        assert_eq!(
            key_step(cur, Some(next), listed(Some(cur), None), None),
            KeyStep::Current
        );
        // Listed: switch, until every peer switched or the deadline.
        let both = listed(Some(cur), Some(next));
        assert_eq!(key_step(cur, Some(next), both, None), KeyStep::Switch);
        assert_eq!(
            key_step(cur, Some(next), both, Some((s(1), &open))),
            KeyStep::Switch
        );
        assert_eq!(
            key_step(cur, Some(next), both, Some((s(1), &done))),
            KeyStep::Finish
        );
        assert_eq!(
            key_step(cur, Some(next), both, Some((SWITCH_DEADLINE, &open))),
            KeyStep::Finish
        );
        // The operator listed the new key alone early: switch all the same.
        assert_eq!(
            key_step(cur, Some(next), listed(Some(next), None), None),
            KeyStep::Switch
        );
        // Done: the new key is the key in use, the old one may stay listed.
        assert_eq!(key_step(next, None, both, None), KeyStep::Current);
        assert_eq!(
            key_step(next, Some(next), both, None),
            KeyStep::DropStaleNext
        );
        // Listed keys that are not this node's.
        assert_eq!(
            key_step(cur, None, listed(Some(key()), None), None),
            KeyStep::Mismatch
        );
        assert_eq!(
            key_step(cur, Some(next), listed(Some(key()), Some(key())), None),
            KeyStep::Mismatch
        );
    }
}
