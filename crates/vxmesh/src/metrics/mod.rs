//! Prometheus metrics of the agent (`vxmesh agent --metrics ADDR`).
//!
//! [`Metrics`] is a cheap handle (an `Arc` inside) that the agent and the
//! etcd store always record into; it is served over HTTP (`GET /metrics`,
//! OpenMetrics text, which Prometheus scrapes natively) only when the agent
//! is given `--metrics ADDR` ([`bind`], then [`serve`]).
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `vxmesh_peers{network}` | gauge | remote nodes (routed) or remote endpoints (bridged) in the last applied plan |
//! | `vxmesh_reconcile_passes_total{result="ok\|error"}` | counter | agent passes and how they ended |
//! | `vxmesh_reconcile_changes_total` | counter | kernel objects changed (changes applied without error, container veths re-attached) |
//! | `vxmesh_netlink_messages_total` | counter | netlink requests sent to apply them |
//! | `vxmesh_netlink_errors_total` | counter | changes that failed (the kernel refused the request, or a device it needs was missing) |
//! | `vxmesh_apply_duration_seconds` | histogram | one reconcile: dump, diff and apply (100 µs .. 10 s buckets) |
//! | `vxmesh_store_connected` | gauge | 1 while the store is live (static file: always once open; etcd: joined, lease kept alive and watch running), else 0 |
//! | `vxmesh_records_rejected_total{kind="node\|subnet\|endpoint\|network"}` | counter | invalid etcd records skipped, each key counted once per revision (as it is logged) |
//! | `vxmesh_cluster_watch_failures_total` | counter | times the cluster file could not be watched (inotify) and is checked every second instead |
//! | `vxmesh_cluster_watch_polling` | gauge | 1 while the cluster file is polled instead of watched, else 0 |
//! | `vxmesh_join_failures_total{cause}` | counter | failed attempts to join the store, by cause (`lease_lost`, `unreachable`, `conflict`, `subnets_full`, `no_network`, `contention`, `etcd_error`, `other`) |
//! | `vxmesh_etcd_lists_total{reason="join\|relist"}` | counter | full listings of a network's keys in etcd: one per join, one per watch that had to start over (history compacted or rewound); never for a re-granted lease |
//! | `vxmesh_etcd_lease_regrants_total` | counter | times this node's etcd lease vanished and was re-granted: during a join (the claim is redone at once) or later (records re-published under the new lease) |
//! | `vxmesh_containers_detached_total{network,reason}` | counter | containers the agent detached itself; `reason="address_lost"`: another node owns the container's address now (claimed after this node's lease had expired for longer than the grace period) |
//! | `vxmesh_last_pass_timestamp_seconds` | gauge | Unix time the last pass ended (either result) |
//! | `vxmesh_last_success_timestamp_seconds` | gauge | Unix time the last successful pass ended |
//! | `vxmesh_vxlan_dropped_total` | counter | VXLAN packets from non-peers the VTEP filter dropped |
//! | `vxmesh_firewall_changes_total` | counter | changes applied to the nftables table `inet vxmesh` |
//! | `vxmesh_vtep_peers` | gauge | underlay addresses the VTEP filter accepts |
//! | `vxmesh_vxlan_spoofed_total` | counter | packets the secure underlay's guard dropped: an encrypted network's VXLAN not from `vxm-wg0`, or traffic into an encrypted network from a plain VTEP |
//!
//! The secure underlay's metrics (docs/encryption.md) are in [`secure`].

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::dataplane::{NodePlan, ReconcileError, ReconcileReport};

mod secure;
mod server;
pub use server::{BindError, Server, bind, serve};

/// Content type of the OpenMetrics text format that prometheus-client writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the `apply_duration` buckets: 100 µs (a converged pass
/// in a small cluster) to 10 s (tens of thousands of peers programmed).
const APPLY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The kind of an etcd record that failed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    /// `nodes/NODE`
    Node,
    /// `subnets/A.B.C.D-LEN`
    Subnet,
    /// `endpoints/A.B.C.D`
    Endpoint,
    /// The network's `config`.
    Network,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Node => "node",
            RecordKind::Subnet => "subnet",
            RecordKind::Endpoint => "endpoint",
            RecordKind::Network => "network",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetworkLabel {
    network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetachLabel {
    network: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Whether the store is live: opened or joined, and none of its connections down.
#[derive(Default)]
struct StoreLinks {
    ready: bool,
    down: u32,
}

struct Inner {
    registry: Registry,
    peers: Family<NetworkLabel, Gauge>,
    /// Networks with a `peers` series (to drop those no longer served).
    peer_networks: Mutex<BTreeSet<String>>,
    passes: Family<ResultLabel, Counter>,
    changes: Counter,
    messages: Counter,
    netlink_errors: Counter,
    apply_duration: Histogram,
    store_connected: Gauge,
    store_links: Mutex<StoreLinks>,
    records_rejected: Family<KindLabel, Counter>,
    join_failures: Family<CauseLabel, Counter>,
    etcd_lists: Family<ReasonLabel, Counter>,
    lease_regrants: Counter,
    detached: Family<DetachLabel, Counter>,
    watch_failures: Counter,
    watch_polling: Gauge,
    last_pass: Gauge<f64, AtomicU64>,
    last_success: Gauge<f64, AtomicU64>,
    vxlan_dropped: Counter,
    /// The kernel counter's value behind `vxlan_dropped` (it restarts at 0
    /// when the table is rebuilt).
    vxlan_dropped_seen: Mutex<u64>,
    firewall_changes: Counter,
    vtep_peers: Gauge,
    vxlan_spoofed: Counter,
    vxlan_spoofed_seen: Mutex<u64>,
    secure: secure::SecureMetrics,
}

/// Advance `counter` by what the kernel counter behind it moved since
/// `seen` (a smaller value: the table was recreated and counts from 0).
fn follow(counter: &Counter, seen: &Mutex<u64>, packets: u64) {
    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let delta = if packets >= *seen {
        packets - *seen
    } else {
        packets
    };
    counter.inc_by(delta);
    *seen = packets;
}

/// The agent's metrics; clones share them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

/// Equal when they are the same set (clones of one [`Metrics::new`]).
impl PartialEq for Metrics {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Metrics {}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vxmesh");
        let peers = Family::<NetworkLabel, Gauge>::default();
        registry.register(
            "peers",
            "Remote nodes (routed) or remote endpoints (bridged) per network in the last applied plan",
            peers.clone(),
        );
        let passes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconcile_passes",
            "Agent passes (snapshot, plan, reconcile, publish), by result",
            passes.clone(),
        );
        // Both results exist from the start, so rate() and alerts see a 0.
        for result in ["ok", "error"] {
            let _ = passes.get_or_create(&ResultLabel { result });
        }
        let changes = Counter::default();
        registry.register(
            "reconcile_changes",
            "Kernel objects changed by reconcile passes",
            changes.clone(),
        );
        let messages = Counter::default();
        registry.register(
            "netlink_messages",
            "Netlink requests sent to change kernel state",
            messages.clone(),
        );
        let netlink_errors = Counter::default();
        registry.register(
            "netlink_errors",
            "Changes that failed to apply (kernel refused the request, or a device it needs was missing)",
            netlink_errors.clone(),
        );
        let apply_duration = Histogram::new(APPLY_BUCKETS);
        registry.register_with_unit(
            "apply_duration",
            "Time of one reconcile: dump, diff and apply",
            Unit::Seconds,
            apply_duration.clone(),
        );
        let store_connected = Gauge::default();
        registry.register(
            "store_connected",
            "1 while the store is live (etcd: joined, lease kept alive and watch running), else 0",
            store_connected.clone(),
        );
        let records_rejected = Family::<KindLabel, Counter>::default();
        registry.register(
            "records_rejected",
            "Invalid store records skipped, each key counted once per revision",
            records_rejected.clone(),
        );
        for k in [
            RecordKind::Node,
            RecordKind::Subnet,
            RecordKind::Endpoint,
            RecordKind::Network,
        ] {
            let _ = records_rejected.get_or_create(&KindLabel { kind: k.as_str() });
        }
        let join_failures = Family::<CauseLabel, Counter>::default();
        registry.register(
            "join_failures",
            "Failed attempts to join the store, by cause",
            join_failures.clone(),
        );
        let etcd_lists = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "etcd_lists",
            "Full listings of a network's keys in etcd, by reason (join, relist: a watch that started over)",
            etcd_lists.clone(),
        );
        for reason in ["join", "relist"] {
            let _ = etcd_lists.get_or_create(&ReasonLabel { reason });
        }
        let lease_regrants = Counter::default();
        registry.register(
            "etcd_lease_regrants",
            "Times this node's etcd lease vanished (during a join or later) and was re-granted",
            lease_regrants.clone(),
        );
        let detached = Family::<DetachLabel, Counter>::default();
        registry.register(
            "containers_detached",
            "Containers the agent detached itself, by network and reason",
            detached.clone(),
        );
        let watch_failures = Counter::default();
        registry.register(
            "cluster_watch_failures",
            "Times the cluster file could not be watched (inotify) and is polled instead",
            watch_failures.clone(),
        );
        let watch_polling = Gauge::default();
        registry.register(
            "cluster_watch_polling",
            "1 while the cluster file is polled instead of watched (inotify unavailable), else 0",
            watch_polling.clone(),
        );
        let last_pass = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_pass_timestamp",
            "Unix time the last agent pass ended (either result)",
            Unit::Seconds,
            last_pass.clone(),
        );
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "last_success_timestamp",
            "Unix time the last successful agent pass ended",
            Unit::Seconds,
            last_success.clone(),
        );
        let vxlan_dropped = Counter::default();
        registry.register(
            "vxlan_dropped",
            "VXLAN packets from an address that is not a peer, dropped by the VTEP filter (nftables counter vxlan_dropped, read each full pass)",
            vxlan_dropped.clone(),
        );
        let firewall_changes = Counter::default();
        registry.register(
            "firewall_changes",
            "Changes applied to vxmesh's nftables table (set elements, rewritten chains, table created or rebuilt)",
            firewall_changes.clone(),
        );
        let vtep_peers = Gauge::default();
        registry.register(
            "vtep_peers",
            "Underlay addresses the VTEP filter accepts VXLAN from, in the last applied plan",
            vtep_peers.clone(),
        );
        let vxlan_spoofed = Counter::default();
        registry.register(
            "vxlan_spoofed",
            "Packets the secure underlay's guard dropped: VXLAN of an encrypted network that did not come out of vxm-wg0, or traffic into an encrypted network from a plain network's VTEP (nftables counter vxlan_spoofed, read each full pass)",
            vxlan_spoofed.clone(),
        );
        let secure = secure::SecureMetrics::register(&mut registry);
        Metrics {
            inner: Arc::new(Inner {
                registry,
                peers,
                peer_networks: Mutex::new(BTreeSet::new()),
                passes,
                changes,
                messages,
                netlink_errors,
                apply_duration,
                store_connected,
                store_links: Mutex::new(StoreLinks::default()),
                records_rejected,
                join_failures,
                etcd_lists,
                lease_regrants,
                detached,
                watch_failures,
                watch_polling,
                last_pass,
                last_success,
                vxlan_dropped,
                vxlan_dropped_seen: Mutex::new(0),
                firewall_changes,
                vtep_peers,
                vxlan_spoofed,
                vxlan_spoofed_seen: Mutex::new(0),
                secure,
            }),
        }
    }

    /// The exposition (OpenMetrics text, ending in `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Run one reconcile (`fut`, for `plan`) and record it: its duration,
    /// the changes made and the messages sent, the changes that failed
    /// (from the report a failed apply carries), and (if it succeeded) the
    /// peers of every network in `plan`. Failures before the apply (a dump,
    /// the diff) count only in the pass result.
    pub async fn reconcile<F>(
        &self,
        plan: &NodePlan,
        fut: F,
    ) -> Result<ReconcileReport, ReconcileError>
    where
        F: Future<Output = Result<ReconcileReport, ReconcileError>>,
    {
        let t0 = Instant::now();
        let r = fut.await;
        self.reconciled(plan, t0.elapsed(), r.as_ref());
        r
    }

    /// Record a reconcile that took `took` (see [`Metrics::reconcile`]),
    /// for one made of several steps.
    pub fn reconciled(
        &self,
        plan: &NodePlan,
        took: Duration,
        r: Result<&ReconcileReport, &ReconcileError>,
    ) {
        let m = &self.inner;
        m.apply_duration.observe(took.as_secs_f64());
        match r {
            Ok(rep) => {
                m.changes.inc_by(rep.changes as u64);
                m.messages.inc_by(rep.messages as u64);
                self.set_peers(plan);
            }
            Err(e) => {
                if let Some(a) = e.apply_report() {
                    let failed = a.errors.len();
                    m.changes.inc_by(a.changes.saturating_sub(failed) as u64);
                    m.messages.inc_by(a.messages() as u64);
                    m.netlink_errors.inc_by(failed as u64);
                }
            }
        }
    }

    /// A firewall pass: its repairs, the allowed peers, and the VXLAN
    /// packets the VTEP filter dropped (read from its named counter).
    pub fn firewall(&self, r: &crate::firewall::FirewallReport) {
        let m = &self.inner;
        m.firewall_changes.inc_by(r.changes.len() as u64);
        if let Some(n) = r.peers {
            m.vtep_peers.set(n as i64);
        }
        if let Some((packets, _)) = r.dropped {
            follow(&m.vxlan_dropped, &m.vxlan_dropped_seen, packets);
        }
        if let Some((packets, _)) = r.spoofed {
            follow(&m.vxlan_spoofed, &m.vxlan_spoofed_seen, packets);
        }
    }

    /// The secure underlay's counters, read from its peer table
    /// ([`crate::secure::SecureUnderlay::stats`]) after each pass.
    pub fn secure(&self, s: &crate::secure::underlay::UnderlayReport) {
        self.inner.secure.record(s);
    }

    /// Container veths put back on their bridge (one netlink request each).
    pub fn reattached(&self, n: usize) {
        self.inner.changes.inc_by(n as u64);
        self.inner.messages.inc_by(n as u64);
    }

    /// Per served network: the neighbour entries on its VTEP, one per remote
    /// node (routed) or remote endpoint (bridged).
    fn set_peers(&self, plan: &NodePlan) {
        let m = &self.inner;
        let mut known = m.peer_networks.lock().unwrap_or_else(|e| e.into_inner());
        for (name, st) in &plan.networks {
            let n = plan.neighbours.iter().filter(|n| n.dev == st.vtep).count();
            m.peers
                .get_or_create(&NetworkLabel {
                    network: name.clone(),
                })
                .set(n as i64);
        }
        for gone in known.iter().filter(|n| !plan.networks.contains_key(*n)) {
            m.peers.remove(&NetworkLabel {
                network: gone.clone(),
            });
        }
        *known = plan.networks.keys().cloned().collect();
    }

    /// An attempt to join the store failed (`cause`: a short stable name).
    pub fn join_failed(&self, cause: &'static str) {
        self.inner
            .join_failures
            .get_or_create(&CauseLabel { cause })
            .inc();
    }

    /// The etcd store listed a network's keys in full (`reason`: `join` or
    /// `relist`).
    pub(crate) fn etcd_listed(&self, reason: &'static str) {
        self.inner
            .etcd_lists
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The etcd store lost its lease and grants a new one.
    pub(crate) fn lease_regranted(&self) {
        self.inner.lease_regrants.inc();
    }

    /// The agent detached a container of `network` itself (`reason`: a
    /// short stable name, e.g. `address_lost`).
    pub fn container_detached(&self, network: &str, reason: &'static str) {
        self.inner
            .detached
            .get_or_create(&DetachLabel {
                network: network.to_string(),
                reason,
            })
            .inc();
    }

    /// The cluster file could not be watched: it is polled from now on.
    pub fn cluster_watch_failed(&self) {
        self.inner.watch_failures.inc();
        self.inner.watch_polling.set(1);
    }

    /// One agent pass ended.
    pub fn pass_done(&self, ok: bool) {
        let m = &self.inner;
        let result = if ok { "ok" } else { "error" };
        m.passes.get_or_create(&ResultLabel { result }).inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        m.last_pass.set(now);
        if ok {
            m.last_success.set(now);
        }
    }

    /// The store is open (static file) or joined (etcd).
    pub fn store_ready(&self) {
        self.update_links(|l| l.ready = true);
    }

    /// A connection of the store went down (`up == false`) or came back.
    /// Call once per transition.
    pub(crate) fn store_link(&self, up: bool) {
        self.update_links(|l| {
            if up {
                l.down = l.down.saturating_sub(1);
            } else {
                l.down += 1;
            }
        });
    }

    fn update_links(&self, f: impl FnOnce(&mut StoreLinks)) {
        let mut l = self
            .inner
            .store_links
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f(&mut l);
        self.inner
            .store_connected
            .set(i64::from(l.ready && l.down == 0));
    }

    /// An invalid store record was skipped (call once per key and revision).
    pub(crate) fn record_rejected(&self, kind: RecordKind) {
        self.inner
            .records_rejected
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests;
