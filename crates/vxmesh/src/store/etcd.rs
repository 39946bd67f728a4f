//! The etcd store (etcd v3 API, etcd-client crate): dynamic membership.
//!
//! # Key layout
//!
//! Everything of network `NET` lives under `PREFIX/networks/NET/` (prefix
//! default `/vxmesh`, see [`DEFAULT_PREFIX`]):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `PREFIX/networks/NET/config` | JSON network: `{"name","mode","cidr","subnet_len","vni","port","mtu"}` | permanent ([`create_network`] / [`delete_network`]) |
//! | `PREFIX/networks/NET/encryption` | an encrypted network's secure underlay settings, JSON `{"transport_cidr","port"}` (the same for every encrypted network) | as `config` |
//! | `PREFIX/networks/NET/subnets/A.B.C.D-LEN` | the claiming node's name (plain text) | the node's lease |
//! | `PREFIX/networks/NET/nodes/NODE` | JSON `{"name","underlay_ip","underlay_dev"?,"subnet"}` | the node's lease |
//! | `PREFIX/networks/NET/endpoints/A.B.C.D` | JSON endpoint `{"network","ip","mac","node"}` | the hosting node's lease |
//! | `PREFIX/networks/NET/held/subnets/A.B.C.D-LEN`, `.../held/endpoints/A.B.C.D` | the holder's name (quarantine marker) | the holder's hold lease (2 x TTL) |
//!
//! # How it works
//!
//! - [`EtcdStore::join`] lists the network first (identity, claims, view),
//!   then grants two leases, each kept alive from its grant by a supervised
//!   keeper (`lease.rs`): the node lease (TTL default 10 s) and a hold lease
//!   of twice that. It claims a subnet (routed) or address slice (bridged)
//!   with one compare-and-swap transaction on mod revisions (`claim.rs`),
//!   writing the claim and the node record (node lease), a quarantine
//!   marker (hold lease) and comparing this node's record with the one its
//!   identity check saw: two nodes can never hold one subnet, two hosts
//!   never join under one name, a claim never exists without its record,
//!   and a subnet or address freed by an expired node lease stays reserved
//!   for its holder for one more TTL. A lease that vanishes during the join
//!   is re-granted and the claim redone at once; nothing is ever revoked
//!   after a claim (a failed join leaves what it found as it was). A node reuses its own claim (a rejoin after a
//!   restart keeps its subnet); new claims try the subnets in an order that
//!   is deterministic but starts at a hash of the node name, so concurrent
//!   joins rarely collide and a node that left tends to get its old subnet
//!   back.
//! - A second background task lists `PREFIX/networks/NET/` once (revision R)
//!   and watches from R+1, keeping an in-memory view; after a disconnect it
//!   resumes from the last revision seen; if that revision was compacted it
//!   re-lists and the derived snapshot is diffed against the previous one.
//!   Records that fail validation are skipped and logged once per key and
//!   revision.
//! - If etcd is unreachable, [`Store::snapshot`] keeps returning the last view
//!   (the data plane keeps working) and the tasks retry with exponential
//!   backoff (capped at 5 s), logging once when the connection is lost and
//!   once when it is restored. If a lease expired meanwhile, a new one is
//!   granted and the claim, record and endpoints are re-published under it
//!   (its own subnet and addresses, unless another node took them after
//!   the grace period: then it says so loudly and stops publishing them).
//!   Every request and stream requires a leader; a watch created below the
//!   listed revision or on another cluster id re-lists.
//! - Lost nodes disappear when their lease expires: every peer's watch sees
//!   the deletes, and keeps the node (record, endpoints) for a settle window
//!   of min(TTL, 2 s) while its quarantine marker still names it, so a lease
//!   revoked under a live node (etcd-io/etcd#12528) costs no reply if it
//!   re-publishes in time. [`EtcdStore::leave`] revokes both leases, the
//!   hold lease first: record, claim, markers and endpoints vanish and peers
//!   drop the node at once; [`leave_node`] does it for a stopped node.
//! - The agent uses [`EtcdNetworks`]: one store (lease, claim) per network it
//!   joins, one merged snapshot. For bridged networks it names the etcd
//!   allocator in the network's state file ([`crate::store::AllocatorSpec`]:
//!   endpoints, prefix, TLS and password *file paths*, node, lease); attach,
//!   the CNI plugin and the lab claim container addresses through
//!   [`EtcdAllocator`], which calls [`claim_address`] (CAS on
//!   `endpoints/IP`, bound to that lease) and [`release_address`]. Every agent pass makes the node's endpoints equal
//!   the addresses its file IPAM holds ([`EtcdStore::sync_endpoints`]), so
//!   they are re-published if the lease is ever re-granted.
//!
//! Consistency rules this module keeps: a claim is one CAS transaction
//! together with its record (no read-then-write race), the watch starts at
//! the revision after the list (no event is missed between the two), a
//! compacted revision leads to a re-list, and a lease lost during an outage
//! is re-granted with everything re-published under it.

mod allocator;
mod claim;
mod client;
mod endpoints;
mod lease;
mod multi;
mod network;
mod records;
mod remote;
mod session;
mod settle;
pub use settle::{SETTLE_MAX, settle_window};
mod stored;
mod view;
mod watcher;

pub use stored::{NetworkRecords, Record, RecordError, StoredNode};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use etcd_client::Client;
use ipnet::Ipv4Net;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::error::{Result, StoreError};
use super::{Snapshot, Store};
use crate::config::{Mode, Network};
use crate::model::{Endpoint, NodeRecord};
use crate::secure::ListedKeys;
pub use allocator::EtcdAllocator;
pub(crate) use client::{Backoff, Health, OP_TIMEOUT, lease_opts};
pub use client::{
    ClientOptions, DEFAULT_PREFIX, DEFAULT_TTL, EtcdOptions, MIN_TTL, TlsOptions, parse_store_url,
};
pub use client::{connect, op};
pub use endpoints::Refused;
pub use multi::EtcdNetworks;
pub use network::{create_network, delete_network, get_encryption, get_network, validate_network};
use records::Keys;
/// The rules of a key prefix, for the agent configuration file's checks.
pub(crate) use records::check_prefix;
pub use remote::{
    claim_address, claim_address_except, leave_node, read_password, release_address,
    section_client_options,
};
use view::View;

/// This node's identity.
#[derive(Clone, Debug)]
pub(crate) struct Me {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_dev: Option<String>,
    /// The WireGuard keys its record lists (changed by a key rotation).
    keys: Arc<Mutex<ListedKeys>>,
}

impl Me {
    pub(crate) fn keys(&self) -> ListedKeys {
        *self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, network: &str, subnet: Ipv4Net) -> NodeRecord {
        let keys = self.keys();
        NodeRecord {
            name: self.node.clone(),
            underlay_ip: self.underlay_ip,
            underlay_dev: self.underlay_dev.clone(),
            subnets: BTreeMap::from([(network.to_string(), subnet)]),
            public_key: keys.public_key,
            next_public_key: keys.next_public_key,
        }
    }
}

/// What this node has published (re-published under a new lease if the old
/// one is lost). Guarded by an async mutex so publications serialize.
pub(crate) struct Owned {
    pub leases: claim::LeaseIds,
    pub subnet: Ipv4Net,
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
}

/// State shared by the store handle and its background tasks.
pub(crate) struct Inner {
    pub client: Client,
    pub keys: Keys,
    pub me: Me,
    pub ttl_secs: i64,
    describe: String,
    pub owned: tokio::sync::Mutex<Owned>,
    /// Mirrors of `owned.leases` and `owned.subnet` for synchronous readers.
    pub lease_id: AtomicI64,
    pub hold_lease_id: AtomicI64,
    subnet: Mutex<Ipv4Net>,
    view: Mutex<View>,
    changes: watch::Sender<u64>,
    pub health: Health,
    pub relists: AtomicU64,
    /// The etcd cluster id the watch last saw (0: not yet): a change means
    /// another cluster (restored from a backup) and the view is re-listed.
    pub cluster_id: AtomicU64,
    pub paused: watch::Sender<bool>,
    /// Whether the record in etcd lists `me.keys` (false after a failed
    /// [`EtcdStore::publish_keys`], which the next call retries).
    keys_published: AtomicBool,
    /// Set when a background task died (a bug): `changed()` then fails.
    failed: AtomicBool,
    /// Wakes the settle timer when the view keeps a vanished record.
    pub settle_wake: tokio::sync::Notify,
}

impl Inner {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn network(&self) -> Network {
        self.fresh_view().network().clone()
    }

    /// A copy of the view's keys.
    pub(crate) fn kvs(&self) -> BTreeMap<String, view::Kv> {
        self.view().kvs().clone()
    }

    /// The view, rebuilt first if watch responses changed its keys since
    /// the last rebuild (see [`Self::touch_view`]).
    pub(crate) fn fresh_view(&self) -> std::sync::MutexGuard<'_, View> {
        let mut v = self.view();
        if v.is_dirty() {
            self.rebuild(&mut v);
        }
        v
    }

    /// Rebuild `v`: count the records skipped, wake the settle timer.
    fn rebuild(&self, v: &mut View) -> bool {
        let (changed, skipped) = v.rebuild();
        for s in skipped {
            self.health.metrics().record_rejected(s.kind);
        }
        if v.settle_deadline().is_some() {
            self.settle_wake.notify_one();
        }
        changed
    }

    /// Change the view and notify `changed()` if the derived snapshot changed.
    pub(crate) fn update_view(&self, f: impl FnOnce(&mut View)) {
        let changed = {
            let mut v = self.view();
            f(&mut v);
            self.rebuild(&mut v)
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Change the view's keys without rebuilding it (a watch response):
    /// `f` returns whether a changed key can change the snapshot; then the
    /// view is marked and `changed()` notified, and the next reader
    /// rebuilds it once, however many responses came meanwhile.
    pub(crate) fn touch_view(&self, f: impl FnOnce(&mut View) -> bool) {
        let relevant = {
            let mut v = self.view();
            let relevant = f(&mut v);
            if relevant {
                v.mark_dirty();
            }
            if v.settle_deadline().is_some() {
                self.settle_wake.notify_one();
            }
            relevant
        };
        if relevant {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// When the view's next kept vanished record is due to go.
    pub(crate) fn settle_deadline(&self) -> Option<std::time::Instant> {
        self.view().settle_deadline()
    }

    pub(crate) fn set_own(&self, subnet: Ipv4Net) {
        *self.subnet.lock().unwrap_or_else(|e| e.into_inner()) = subnet;
        let net = self.network().name;
        let rec = self.me.record(&net, subnet);
        self.update_view(|v| v.set_own(rec));
    }
}

/// Marks the store failed if a background task panics.
pub(crate) struct TaskGuard(pub Arc<Inner>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
            self.0.changes.send_modify(|n| *n += 1);
        }
    }
}

/// A node's membership in one network, kept in etcd.
///
/// Lifecycle: [`EtcdStore::join`], then use it as the agent's [`Store`]
/// (one store per network). To stop, either drop it (what SIGTERM should
/// do: the records stay until the lease expires, so a restart within the
/// TTL reuses the claim and adopts the endpoints and peers see no churn), or
/// call [`EtcdStore::leave`] (records, claim and endpoints deleted at once:
/// for decommissioning a node, `vxmesh down`).
pub struct EtcdStore {
    inner: Arc<Inner>,
    changes: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl EtcdStore {
    /// Join network `opts.network` as node `opts.node`: claim (or reuse) a
    /// subnet, publish the node record under a lease kept alive in the
    /// background, adopt this node's endpoints left by a previous run, and
    /// start watching. Needs etcd reachable (fails after a few seconds if not).
    pub async fn join(opts: EtcdOptions) -> Result<EtcdStore> {
        opts.validate()?;
        let join_err = |e: StoreError| StoreError::Join {
            network: opts.network.clone(),
            node: opts.node.clone(),
            cause: Box::new(e),
        };
        let t0 = std::time::Instant::now();
        let client_opts = Arc::new(opts.client_options());
        let client = client::connect(&client_opts).await?;
        let connected = t0.elapsed();
        let keys = Keys::new(&opts.prefix, &opts.network);
        let net = network::read_network(&client, &keys, &opts.network)
            .await?
            .ok_or_else(|| StoreError::NoSuchNetwork {
                network: opts.network.clone(),
                detail: format!(
                    "does not exist in etcd (no key {}): create it first (`vxmesh net create`)",
                    keys.config()
                ),
            })?;
        let me = Me {
            node: opts.node.clone(),
            underlay_ip: opts.underlay_ip,
            underlay_dev: opts.underlay_dev.clone(),
            keys: Arc::new(Mutex::new(opts.keys)),
        };
        // Read first (the identity, the claims, the view), then grant: a
        // slow read cannot eat into the lease.
        opts.metrics.etcd_listed("join");
        let (kvs, rev) = watcher::list(&client, keys.root())
            .await
            .map_err(join_err)?;
        let listed = t0.elapsed();
        let mut ident = claim::check_identity(&kvs, &keys, &me, &net).map_err(join_err)?;
        let ttl_secs = opts.ttl.as_secs_f64().ceil() as i64;
        // Both leases are kept alive from their grant on. A join that fails
        // from here on revokes nothing: what it re-bound stays bound to a
        // lease that expires on its own (a previous run's records are left
        // as they were).
        let mut kept = session::Kept::grant(
            &client,
            ttl_secs,
            Some(client_opts.clone()),
            opts.metrics.clone(),
        )
        .await
        .map_err(join_err)?;
        let granted = t0.elapsed();
        let mut rounds = 0;
        let (subnet, endpoints) = loop {
            rounds += 1;
            if rounds > 3 {
                return Err(join_err(StoreError::LeaseGone {
                    lease: kept.node.id,
                }));
            }
            let subnet = session::claim_kept(
                &client,
                &keys,
                &me,
                &net,
                ttl_secs,
                &mut kept,
                &kvs,
                &[],
                &mut ident,
            )
            .await
            .map_err(join_err)?;
            let endpoints = endpoints::adopt_endpoints(&client, &keys, &me, &net, kept.ids(), &kvs)
                .await
                .map_err(join_err)?;
            if !kept.any_lost() {
                break (subnet, endpoints);
            }
        };
        let leases = kept.ids();
        let lease = leases.node;
        tracing::debug!(
            connected_ms = connected.as_millis() as u64,
            listed_ms = listed.as_millis() as u64,
            granted_ms = granted.as_millis() as u64,
            claimed_ms = t0.elapsed().as_millis() as u64,
            rounds,
            "join timing"
        );
        tracing::info!(
            network = %net.name, node = %me.node, %subnet, lease, adopted_endpoints = endpoints.len(),
            "joined network through etcd"
        );
        let mut view = View::new(keys.clone(), net.clone());
        view.set_settle(settle_window(std::time::Duration::from_secs(
            ttl_secs.unsigned_abs(),
        )));
        view.set_own(me.record(&net.name, subnet));
        view.reset(kvs);
        for s in view.rebuild().1 {
            opts.metrics.record_rejected(s.kind);
        }
        let (changes, rx) = watch::channel(0u64);
        let describe = format!(
            "etcd {} {} (node {})",
            opts.endpoints.join(","),
            keys.root(),
            me.node
        );
        let inner = Arc::new(Inner {
            client,
            keys,
            me,
            ttl_secs,
            describe,
            owned: tokio::sync::Mutex::new(Owned {
                leases,
                subnet,
                endpoints,
            }),
            lease_id: AtomicI64::new(lease),
            hold_lease_id: AtomicI64::new(leases.hold),
            subnet: Mutex::new(subnet),
            view: Mutex::new(view),
            changes,
            health: Health::new(
                format!("node {}, network {}", opts.node, opts.network),
                opts.metrics.clone(),
            ),
            relists: AtomicU64::new(0),
            cluster_id: AtomicU64::new(0),
            paused: watch::channel(false).0,
            failed: AtomicBool::new(false),
            keys_published: AtomicBool::new(true),
            settle_wake: tokio::sync::Notify::new(),
        });
        let tasks = vec![
            tokio::spawn(session::keepalive_loop(inner.clone(), kept)),
            tokio::spawn(watcher::watch_loop(inner.clone(), rev)),
            tokio::spawn(watcher::settle_loop(inner.clone())),
        ];
        Ok(EtcdStore {
            inner,
            changes: rx,
            tasks,
        })
    }

    pub fn node(&self) -> &str {
        &self.inner.me.node
    }

    /// The network's current config.
    pub fn network(&self) -> Network {
        self.inner.network()
    }

    /// The subnet (routed) or address slice (bridged) this node holds.
    pub fn subnet(&self) -> Ipv4Net {
        *self.inner.subnet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease this node's records are bound to (changes if it is re-granted).
    pub fn lease_id(&self) -> i64 {
        self.inner.lease_id.load(Ordering::SeqCst)
    }

    /// The lease the quarantine markers of its claims are bound to (it
    /// outlives [`Self::lease_id`] by a grace period).
    pub fn hold_lease_id(&self) -> i64 {
        self.inner.hold_lease_id.load(Ordering::SeqCst)
    }

    /// Whether etcd currently answers (lease kept alive and watch live).
    /// While false, [`Store::snapshot`] serves the last known view.
    pub fn connected(&self) -> bool {
        self.inner.health.connected()
    }

    /// List `keys` in this node's record (secure underlay: a new key
    /// during a rotation, then the new key alone): the record is put again
    /// under the node lease; a record re-published later (a new lease)
    /// carries them too. No-op when they are listed already.
    pub async fn publish_keys(&self, keys: ListedKeys) -> Result<()> {
        let published =
            || self.inner.me.keys() == keys && self.inner.keys_published.load(Ordering::SeqCst);
        // Every pass asks: answer without waiting for a publication under way.
        if published() {
            return Ok(());
        }
        let owned = self.inner.owned.lock().await;
        if published() {
            return Ok(());
        }
        *self.inner.me.keys.lock().unwrap_or_else(|e| e.into_inner()) = keys;
        self.inner.keys_published.store(false, Ordering::SeqCst);
        let node_key = self.inner.keys.node(&self.inner.me.node);
        let record = serde_json::to_string(&records::NodeJson {
            name: self.inner.me.node.clone(),
            underlay_ip: self.inner.me.underlay_ip,
            underlay_dev: self.inner.me.underlay_dev.clone(),
            subnet: owned.subnet,
            public_key: keys.public_key,
            next_public_key: keys.next_public_key,
        })
        .expect("a node record serializes");
        op(
            format!("publish the keys of {node_key}"),
            self.inner.client.kv_client().put(
                node_key.clone(),
                record,
                lease_opts(owned.leases.node),
            ),
        )
        .await?;
        self.inner.keys_published.store(true, Ordering::SeqCst);
        self.inner.set_own(owned.subnet);
        tracing::info!(node = %self.inner.me.node, public_key = ?keys.public_key, next_public_key = ?keys.next_public_key, "node record lists new keys");
        Ok(())
    }

    /// Graceful leave: revoke the leases, which deletes this node's record,
    /// claim, endpoints and quarantine markers at once; peers drop it
    /// immediately. The hold lease goes first: peers keep a node whose
    /// record vanished while its quarantine marker lives for a settle
    /// window (a lost lease), and one that left has no marker by then.
    pub async fn leave(mut self) -> Result<()> {
        self.stop_tasks();
        let owned = self.inner.owned.lock().await;
        for lease in [owned.leases.hold, owned.leases.node] {
            op(
                format!("revoke lease {lease}"),
                self.inner.client.lease_client().revoke(lease),
            )
            .await
            .map_err(|e| StoreError::LeaveFailed { cause: Box::new(e) })?;
        }
        tracing::info!(node = %self.inner.me.node, network = %self.inner.keys.root(), "left the network");
        Ok(())
    }

    pub(crate) fn stop_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Make this node's endpoints equal `allocated` (the addresses attached
    /// on this node, from its local IPAM): publish what attach published
    /// (so that a re-granted lease re-publishes it too), withdraw what was
    /// detached or whose container is gone (e.g. adopted at join). Returns
    /// the addresses that could not be published and why; those another
    /// node owns now name it ([`Refused::lost`]: their containers must be
    /// detached). Routed networks: nothing is published; the addresses in
    /// another node's subnet are returned as lost.
    pub async fn sync_endpoints(
        &self,
        allocated: &std::collections::BTreeSet<Ipv4Addr>,
    ) -> Result<Vec<Refused>> {
        endpoints::sync_endpoints(&self.inner, allocated).await
    }
}

/// Test hooks: introspection and fault injection for the integration
/// tests (cargo feature `test-hooks`, off in the binary).
#[cfg(feature = "test-hooks")]
impl EtcdStore {
    /// Stop without revoking the lease, as `kill -9` would: the records stay
    /// until the lease expires (TTL). Dropping the store does the same.
    pub fn crash(mut self) {
        self.stop_tasks();
    }

    /// The endpoints this node publishes (including ones adopted at join
    /// from a previous run, until the agent's next endpoint sync).
    pub async fn own_endpoints(&self) -> Vec<Endpoint> {
        self.inner
            .owned
            .lock()
            .await
            .endpoints
            .values()
            .cloned()
            .collect()
    }

    /// How many times the watcher re-listed (after compaction).
    pub fn relist_count(&self) -> u64 {
        self.inner.relists.load(Ordering::SeqCst)
    }

    /// Pause the watcher (drops its watch stream) or resume it.
    pub fn pause_watch(&self, paused: bool) {
        self.inner.paused.send_replace(paused);
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    fn lists_keys(&self) -> bool {
        true
    }

    async fn publish_keys(&mut self, keys: ListedKeys) -> Result<()> {
        EtcdStore::publish_keys(self, keys).await
    }

    async fn leave(self) -> Result<()> {
        EtcdStore::leave(self).await
    }

    async fn snapshot(&mut self) -> Result<Snapshot> {
        self.changes.borrow_and_update();
        Ok(self.inner.fresh_view().snapshot().clone())
    }

    async fn changed(&mut self) -> Result<()> {
        if self.changes.has_changed().unwrap_or(false) {
            return self.check_failed();
        }
        self.changes
            .changed()
            .await
            .map_err(|_| StoreError::Closed("etcd store closed"))?;
        self.check_failed()
    }
}

impl EtcdStore {
    fn check_failed(&self) -> Result<()> {
        if self.inner.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed(
                "a background task of the etcd store died (see the panic message above)",
            ));
        }
        Ok(())
    }
}

/// Mode check shared by the endpoint operations.
pub(crate) fn require_bridged(net: &Network) -> Result<()> {
    if net.mode != Mode::Bridged {
        return Err(StoreError::NotBridged {
            network: net.name.clone(),
            mode: net.mode.to_string(),
        });
    }
    Ok(())
}
