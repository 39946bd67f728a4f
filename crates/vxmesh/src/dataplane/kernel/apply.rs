//! Applying changes (pipelined, phase by phase), teardown and reconcile.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;
use serde::Serialize;

use super::actual::{Ownership, link_rows, routes_of};
use super::{BATCH_SIZE, BATCHES_IN_FLIGHT, KernelError, Netlink, msg};
use crate::dataplane::NodePlan;
use crate::dataplane::diff::{Change, Phase, diff, diff_entries};
use crate::dataplane::{LinkKind, sysctl};
use crate::model;

/// What an apply sent. Counts are requests (each answered by the kernel),
/// whether they succeeded or not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Changes asked for.
    pub changes: usize,
    pub links: usize,
    pub addresses: usize,
    pub routes: usize,
    pub neighbours: usize,
    pub fdb: usize,
    /// sysctl writes (not netlink).
    pub sysctl: usize,
    /// Link dumps made to resolve device names to indexes (not counted in
    /// [`ApplyReport::messages`]).
    pub dumps: usize,
    /// One line per failed change, with the change and the kernel's reason.
    pub errors: Vec<String>,
    /// Time per phase: (phase, changes, duration).
    pub phases: Vec<(Phase, usize, Duration)>,
    pub elapsed: Duration,
}

impl ApplyReport {
    /// Netlink requests sent to change state.
    pub fn messages(&self) -> usize {
        self.links + self.addresses + self.routes + self.neighbours + self.fdb
    }

    fn count(&mut self, kind: Kind, n: usize) {
        match kind {
            Kind::Link => self.links += n,
            Kind::Address => self.addresses += n,
            Kind::Route => self.routes += n,
            Kind::Neighbour => self.neighbours += n,
            Kind::Fdb => self.fdb += n,
            Kind::Sysctl => self.sysctl += n,
        }
    }
}

fn summarise(errors: &[String], total: usize, what: &str, ns: &str) -> String {
    const SHOWN: usize = 20;
    let mut s = format!("{} of {total} {what} failed in {ns}:", errors.len());
    for e in errors.iter().take(SHOWN) {
        s.push_str("\n  - ");
        s.push_str(e);
    }
    if errors.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", errors.len() - SHOWN));
    }
    s
}

/// Some changes failed; the report lists every failure.
#[derive(Clone, Debug)]
pub struct ApplyError {
    pub namespace: String,
    pub report: ApplyReport,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        f.write_str(&summarise(&r.errors, r.changes, "changes", &self.namespace))
    }
}

impl std::error::Error for ApplyError {}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Link,
    Address,
    Route,
    Neighbour,
    Fdb,
    Sysctl,
}

fn kind_of(c: &Change) -> Kind {
    match c {
        Change::DeleteLink { .. }
        | Change::CreateLink { .. }
        | Change::SetLink { .. }
        | Change::SetPortLearning { .. } => Kind::Link,
        Change::DeleteAddress { .. } | Change::AddAddress { .. } => Kind::Address,
        Change::SetIpForward { .. } => Kind::Sysctl,
        Change::DeleteRoute { .. } | Change::ReplaceRoute { .. } => Kind::Route,
        Change::ReplaceNeighbour { .. } | Change::DeleteNeighbour { .. } => Kind::Neighbour,
        Change::ReplaceFdb { .. } | Change::DeleteFdb { .. } => Kind::Fdb,
    }
}

/// Device name -> index, refreshed (one link dump) after devices changed.
struct Indexes {
    map: HashMap<String, u32>,
    stale: bool,
    dumps: usize,
}

impl Indexes {
    async fn refresh(&mut self, nl: &Netlink) -> Result<()> {
        if self.stale {
            self.map = link_rows(nl)
                .await?
                .into_iter()
                .map(|r| (r.name, r.index))
                .collect();
            self.stale = false;
            self.dumps += 1;
        }
        Ok(())
    }
}

type Outcome = (Kind, usize, Result<(), String>);

/// Errors that mean "already as wanted" for a delete.
fn gone_already(e: &KernelError) -> bool {
    matches!(
        e.errno,
        libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL
    )
}

/// A change turned into its one request: (payload, extra flags, is a delete).
type Request = (RouteNetlinkMessage, u16, bool);

/// What became of one item of [`Netlink::send_built`].
enum Sent {
    /// Its request could not be built (nothing was sent).
    NotBuilt(String),
    /// The kernel's answer.
    Kernel(Result<(), KernelError>),
}

impl Netlink {
    fn index(&self, idx: &HashMap<String, u32>, dev: &str) -> Result<u32, String> {
        idx.get(dev)
            .copied()
            .ok_or_else(|| format!("device {dev} does not exist"))
    }

    /// Send single requests pipelined in batches; one result per request.
    async fn send_all(&self, reqs: Vec<Request>) -> Vec<Result<(), KernelError>> {
        self.send_built(reqs, Ok)
            .await
            .into_iter()
            .map(|r| match r {
                Sent::Kernel(r) => r,
                Sent::NotBuilt(_) => unreachable!("prebuilt requests always build"),
            })
            .collect()
    }

    /// Build each item's request and send them pipelined in batches: a batch
    /// is built while the kernel handles the ones before it. One result per
    /// item, in order.
    async fn send_built<T>(
        &self,
        items: Vec<T>,
        build: impl Fn(T) -> Result<Request, String>,
    ) -> Vec<Sent> {
        let mut chunks: Vec<Vec<T>> = Vec::new();
        let mut it = items.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(BATCH_SIZE).collect());
        }
        let build = &build;
        let results: Vec<Vec<Sent>> =
            futures::stream::iter(chunks.into_iter().map(|chunk| async move {
                let mut out: Vec<Option<Sent>> = Vec::with_capacity(chunk.len());
                let (mut reqs, mut sent) = (Vec::new(), Vec::new());
                for (k, item) in chunk.into_iter().enumerate() {
                    match build(item) {
                        Ok((m, flags, is_delete)) => {
                            reqs.push((m, flags));
                            sent.push((k, is_delete));
                            out.push(None);
                        }
                        Err(e) => out.push(Some(Sent::NotBuilt(e))),
                    }
                }
                for ((k, is_delete), r) in sent.into_iter().zip(self.batch(reqs).await) {
                    out[k] = Some(Sent::Kernel(match r {
                        Err(e) if is_delete && gone_already(&e) => Ok(()),
                        r => r,
                    }));
                }
                out.into_iter()
                    .map(|o| o.unwrap_or(Sent::Kernel(Err(KernelError::closed()))))
                    .collect()
            }))
            .buffered(BATCHES_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().flatten().collect()
    }

    /// The one request of a change (all but device creation and sysctls).
    fn request(&self, c: &Change, idx: &HashMap<String, u32>) -> Result<Request, String> {
        let replace = NLM_F_CREATE | NLM_F_REPLACE;
        Ok(match c {
            Change::DeleteLink { name, .. } => (msg::link_del(name), 0, true),
            Change::SetLink { name, fix } => {
                let master = match &fix.master {
                    Some(Some(m)) => Some(self.index(idx, m)?),
                    Some(None) => Some(0),
                    None => None,
                };
                let set = msg::SetLink {
                    mtu: fix.mtu,
                    mac: fix.mac,
                    master,
                    alias: fix.alias.clone(),
                    up: fix.up.then_some(true),
                    ..Default::default()
                };
                (msg::link_set(None, name, &set), 0, false)
            }
            Change::SetPortLearning { dev, learning } => {
                (msg::port_learning(dev, *learning), 0, false)
            }
            Change::DeleteAddress { addr } => (
                msg::addr_del(self.index(idx, &addr.dev)?, addr.addr),
                0,
                true,
            ),
            Change::AddAddress { addr } => (
                msg::addr_new(self.index(idx, &addr.dev)?, addr.addr),
                replace,
                false,
            ),
            Change::DeleteRoute { route } => {
                let oif = route
                    .dev
                    .as_ref()
                    .and_then(|d| idx.get(d).copied())
                    .or(route.oif);
                let r = msg::Route {
                    dst: route.dst,
                    via: route.via,
                    oif,
                    onlink: false,
                    protocol: Some(model::ROUTE_PROTOCOL),
                    table: route.table,
                    priority: route.priority,
                    tos: route.tos,
                };
                (msg::route_del(&r), 0, true)
            }
            Change::ReplaceRoute { route } => {
                let r = msg::Route {
                    dst: route.dst,
                    via: Some(route.via),
                    oif: Some(self.index(idx, &route.dev)?),
                    onlink: true,
                    protocol: Some(model::ROUTE_PROTOCOL),
                    table: msg::RT_TABLE_MAIN,
                    priority: super::route_metric(route.dst),
                    tos: 0,
                };
                (msg::route_new(&r), replace, false)
            }
            Change::ReplaceNeighbour { neigh: n } => (
                msg::neigh_new(self.index(idx, &n.dev)?, n.ip, n.mac),
                replace,
                false,
            ),
            Change::DeleteNeighbour { dev, ip } => {
                (msg::neigh_del(self.index(idx, dev)?, *ip), 0, true)
            }
            Change::ReplaceFdb { fdb: e } => (
                msg::fdb_new(self.index(idx, &e.dev)?, e.mac, e.dst),
                replace,
                false,
            ),
            Change::DeleteFdb { dev, mac, dst } => {
                (msg::fdb_del(self.index(idx, dev)?, *mac, *dst), 0, true)
            }
            Change::CreateLink { .. } | Change::SetIpForward { .. } => {
                return Err("not a single-request change".into());
            }
        })
    }

    /// Run one phase's changes other than device creation: requests are
    /// batched and pipelined; returns (kind, requests sent, result) per change.
    async fn run_phase(&self, group: &[&Change], idx: &HashMap<String, u32>) -> Vec<Outcome> {
        let mut out: Vec<Option<Outcome>> = vec![None; group.len()];
        let mut slots = Vec::new();
        for (i, c) in group.iter().enumerate() {
            match c {
                Change::SetIpForward { on } => {
                    let on = *on;
                    let r = self.run_in_ns(move || sysctl::set_ip_forward(on));
                    out[i] = Some((kind_of(c), 1, r.map_err(|e| format!("{c}: {e:#}"))));
                }
                _ => slots.push(i),
            }
        }
        let sent = self.send_built(slots.clone(), |i| self.request(group[i], idx));
        for (i, r) in slots.into_iter().zip(sent.await) {
            let c = group[i];
            out[i] = Some(match r {
                Sent::NotBuilt(e) => (kind_of(c), 0, Err(format!("{c}: {e}"))),
                Sent::Kernel(r) => (kind_of(c), 1, r.map_err(|e| format!("{c}: {e}"))),
            });
        }
        out.into_iter().flatten().collect()
    }

    /// Create a planned device up, with its alias (a second request: the
    /// kernel ignores `IFLA_IFALIAS` at creation).
    async fn create_link(
        &self,
        l: &crate::dataplane::LinkSpec,
        idx: &HashMap<String, u32>,
    ) -> (usize, Result<(), String>) {
        let master = match &l.master {
            Some(m) => match self.index(idx, m) {
                Ok(i) => Some(i),
                Err(e) => return (0, Err(format!("master: {e}"))),
            },
            None => None,
        };
        match &l.kind {
            LinkKind::Bridge => {
                match self
                    .create_bridge_msgs(&l.name, l.mtu, Some(l.mac), master, true, Some(&l.alias))
                    .await
                {
                    Ok(n) => (n, Ok(())),
                    Err(e) => (2, Err(format!("{e:#}"))),
                }
            }
            LinkKind::Vxlan(v) => {
                let underlay = match &v.underlay_dev {
                    Some(d) => match self.index(idx, d) {
                        Ok(i) => Some(i),
                        Err(e) => return (0, Err(format!("underlay: {e}"))),
                    },
                    None => None,
                };
                let new = msg::NewLink {
                    name: l.name.clone(),
                    mtu: Some(l.mtu),
                    mac: Some(l.mac),
                    master,
                    up: true,
                };
                let vx = msg::NewVxlan {
                    vni: v.vni.get(),
                    local: v.local,
                    underlay,
                    port: v.port,
                    proxy: v.proxy,
                };
                if let Err(e) = self
                    .ack(msg::vxlan_new(&new, &vx), NLM_F_CREATE | NLM_F_EXCL)
                    .await
                {
                    let hint = if e.is(libc::EEXIST) && e.message.is_none() {
                        format!(
                            " (another vxlan device may already use VNI {} on port {})",
                            v.vni, v.port
                        )
                    } else {
                        String::new()
                    };
                    return (1, Err(format!("{e}{hint}")));
                }
                let set = msg::SetLink {
                    alias: Some(l.alias.clone()),
                    ..Default::default()
                };
                let r = self.ack(msg::link_set(None, &l.name, &set), 0).await;
                (2, r.map_err(|e| format!("set alias: {e}")))
            }
        }
    }

    /// Apply `changes` (normally [`diff`]'s output) in [`Phase`] order. Within
    /// a phase requests are pipelined: 128 requests per datagram, 4 datagrams
    /// queued; device creation is sequential. Keeps going after a failure;
    /// returns an [`ApplyError`] (in the `anyhow::Error`) listing every
    /// failure at the end.
    pub async fn apply(&self, changes: &[Change]) -> Result<ApplyReport> {
        let t0 = Instant::now();
        let mut rep = ApplyReport {
            changes: changes.len(),
            ..Default::default()
        };
        let mut sorted: Vec<&Change> = changes.iter().collect();
        sorted.sort_by_key(|c| c.phase());
        let mut idx = Indexes {
            map: HashMap::new(),
            stale: true,
            dumps: 0,
        };
        let mut rest = &sorted[..];
        while let Some(first) = rest.first() {
            let phase = first.phase();
            let n = if phase.is_entry() {
                rest.iter().take_while(|c| c.phase().is_entry()).count()
            } else {
                rest.iter().take_while(|c| c.phase() == phase).count()
            };
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let started = Instant::now();
            if phase != Phase::DeleteLinks
                && let Err(e) = idx.refresh(self).await
            {
                rep.errors.push(format!("{e:#}"));
                continue;
            }
            let outcomes: Vec<Outcome> = if phase == Phase::CreateLinks {
                let mut v = Vec::with_capacity(group.len());
                for c in group {
                    // A VTEP may need the index of the bridge made just before.
                    if let Err(e) = idx.refresh(self).await {
                        rep.errors.push(format!("{e:#}"));
                    }
                    if let Change::CreateLink { link } = c {
                        let (sent, r) = self.create_link(link, &idx.map).await;
                        v.push((Kind::Link, sent, r.map_err(|e| format!("{c}: {e}"))));
                    }
                    idx.stale = true;
                }
                v
            } else {
                self.run_phase(group, &idx.map).await
            };
            for (kind, sent, res) in outcomes {
                rep.count(kind, sent);
                if let Err(e) = res {
                    rep.errors.push(e);
                }
            }
            if matches!(
                phase,
                Phase::DeleteLinks | Phase::CreateLinks | Phase::FixLinks
            ) {
                idx.stale = true;
            }
            let took = started.elapsed();
            let mut i = 0;
            while i < group.len() {
                let p = group[i].phase();
                let k = group[i..].iter().take_while(|c| c.phase() == p).count();
                rep.phases.push((p, k, took));
                i += k;
            }
        }
        rep.dumps = idx.dumps;
        rep.elapsed = t0.elapsed();
        if rep.errors.is_empty() {
            Ok(rep)
        } else {
            Err(ApplyError {
                namespace: self.namespace().to_string(),
                report: rep,
            }
            .into())
        }
    }

    /// Delete every managed `vxm-` device (alias `vxmesh:net:`) and every
    /// IPv4 route with protocol 86 (any table). Container veths (alias
    /// `vxmesh:veth:`) and foreign `vxm-` devices are left alone and listed in
    /// `skipped`; ip_forward is left as it is. Keeps going after a failure and
    /// returns an error listing all of them.
    pub async fn teardown(&self) -> Result<TeardownReport> {
        let ns = self.namespace().to_string();
        let (rows, routes) = futures::try_join!(link_rows(self), async {
            self.query(msg::route_dump(), true)
                .await
                .with_context(|| format!("dump routes in {ns}"))
        })?;
        let names: HashMap<u32, String> = rows.iter().map(|r| (r.index, r.name.clone())).collect();
        let routes = routes_of(&routes, &names);
        let mut rep = TeardownReport::default();
        let reqs = routes
            .iter()
            .map(|r| {
                let req = msg::route_del(&msg::Route {
                    dst: r.dst,
                    via: r.via,
                    oif: r.oif,
                    onlink: false,
                    protocol: Some(model::ROUTE_PROTOCOL),
                    table: r.table,
                    priority: r.priority,
                    tos: r.tos,
                });
                (req, 0, true)
            })
            .collect();
        for (r, res) in routes.iter().zip(self.send_all(reqs).await) {
            match res {
                Ok(()) => rep.routes_deleted += 1,
                Err(e) => rep
                    .errors
                    .push(format!("delete route {} (table {}): {e}", r.dst, r.table)),
            }
        }
        let mut doomed = Vec::new();
        for r in rows
            .iter()
            .filter(|r| r.name.starts_with(model::DEVICE_PREFIX))
        {
            match super::actual::ownership(&r.name, r.alias.as_deref()) {
                Ownership::Managed => doomed.push(r.name.clone()),
                other => rep.skipped.push(format!(
                    "{} ({}, {})",
                    r.name,
                    r.kind.as_deref().unwrap_or("unknown kind"),
                    if other == Ownership::Attached {
                        "container veth"
                    } else {
                        "not created by vxmesh"
                    }
                )),
            }
        }
        let reqs = doomed.iter().map(|n| (msg::link_del(n), 0, true)).collect();
        for (name, res) in doomed.into_iter().zip(self.send_all(reqs).await) {
            match res {
                Ok(()) => rep.links_deleted.push(name),
                Err(e) => rep.errors.push(format!("delete device {name}: {e}")),
            }
        }
        rep.links_deleted.sort();
        if rep.errors.is_empty() {
            Ok(rep)
        } else {
            let total = rep.errors.len() + rep.routes_deleted + rep.links_deleted.len();
            Err(anyhow!(summarise(
                &rep.errors,
                total,
                "teardown steps",
                &ns
            )))
        }
    }
}

/// What [`Netlink::teardown`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TeardownReport {
    pub links_deleted: Vec<String>,
    pub routes_deleted: usize,
    /// `vxm-` devices left in place: "name (kind, why)".
    pub skipped: Vec<String>,
    pub errors: Vec<String>,
}

/// What one [`reconcile`] did.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileReport {
    /// Number of changes the diff produced (0 = already converged).
    pub changes: usize,
    /// Netlink requests sent to apply them.
    pub messages: usize,
    pub duration: Duration,
    /// The changes (their `Display` is the log line).
    pub applied: Vec<Change>,
    pub apply: ApplyReport,
}

impl ReconcileReport {
    /// The changes as log lines.
    pub fn lines(&self) -> Vec<String> {
        self.applied.iter().map(ToString::to_string).collect()
    }
}

/// Dump, diff against `plan`, apply: one reconciliation pass.
pub async fn reconcile(nl: &Netlink, plan: &NodePlan) -> Result<ReconcileReport> {
    let t0 = Instant::now();
    let actual = nl.dump().await?;
    let changes = diff(plan, &actual).with_context(|| format!("reconcile {}", nl.namespace()))?;
    apply_logged(nl, changes, t0).await
}

/// The incremental pass: the kernel is known to hold exactly `old` (it was
/// applied and no kernel event came since), so the changes to `new` are
/// computed from the two plans, with no dump. `None` when more than peer
/// entries differ: the caller then runs a full [`reconcile`].
pub async fn reconcile_from(
    nl: &Netlink,
    old: &NodePlan,
    new: &NodePlan,
) -> Result<Option<ReconcileReport>> {
    let t0 = Instant::now();
    let Some(changes) = diff_entries(old, new) else {
        return Ok(None);
    };
    apply_logged(nl, changes, t0).await.map(Some)
}

async fn apply_logged(nl: &Netlink, changes: Vec<Change>, t0: Instant) -> Result<ReconcileReport> {
    const LOGGED: usize = 50;
    for (i, c) in changes.iter().enumerate() {
        if i < LOGGED {
            tracing::info!(namespace = nl.namespace(), "{c}");
        } else {
            tracing::debug!(namespace = nl.namespace(), "{c}");
        }
    }
    if changes.len() > LOGGED {
        tracing::info!(
            namespace = nl.namespace(),
            "... and {} more changes",
            changes.len() - LOGGED
        );
    }
    let apply = if changes.is_empty() {
        ApplyReport::default()
    } else {
        nl.apply(&changes).await?
    };
    Ok(ReconcileReport {
        changes: changes.len(),
        messages: apply.messages(),
        duration: t0.elapsed(),
        applied: changes,
        apply,
    })
}
