//! Applying changes: phase by phase, requests pipelined in batches, every
//! failure kept with its change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage;

use super::actual::link_rows;
use super::report::Kind;
use super::report::{ApplyError, ApplyFailure, ApplyReport, ChangeError, ChangeFailure};
use super::{BATCH_SIZE, BATCHES_IN_FLIGHT, KernelError, Netlink, msg};
use crate::dataplane::diff::{Change, Phase};
use crate::dataplane::netns::NetnsError;
use crate::dataplane::{LinkKind, sysctl};
use crate::model;

/// Device name -> index, refreshed (one link dump) after devices changed.
struct Indexes {
    map: HashMap<String, u32>,
    stale: bool,
    dumps: usize,
}

impl Indexes {
    async fn refresh(&mut self, nl: &Netlink) -> Result<(), ApplyFailure> {
        if self.stale {
            self.map = link_rows(nl)
                .await
                .map_err(|kernel| ApplyFailure::ResolveDevices {
                    namespace: nl.namespace().to_string(),
                    kernel,
                })?
                .into_iter()
                .map(|r| (r.name, r.index))
                .collect();
            self.stale = false;
            self.dumps += 1;
        }
        Ok(())
    }
}

type Outcome = (Kind, usize, Result<(), ChangeFailure>);

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
    NotBuilt(ChangeFailure),
    /// The kernel's answer.
    Kernel(Result<(), KernelError>),
}

impl Netlink {
    fn index(&self, idx: &HashMap<String, u32>, dev: &str) -> Result<u32, ChangeFailure> {
        idx.get(dev)
            .copied()
            .ok_or_else(|| ChangeFailure::NoDevice(dev.to_string()))
    }

    /// Send single requests pipelined in batches; one result per request.
    pub(super) async fn send_all(&self, reqs: Vec<Request>) -> Vec<Result<(), KernelError>> {
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
        build: impl Fn(T) -> Result<Request, ChangeFailure>,
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
    fn request(&self, c: &Change, idx: &HashMap<String, u32>) -> Result<Request, ChangeFailure> {
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
                return Err(ChangeFailure::NotSingleRequest);
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
                    let r = self.run_in_ns(move || Ok::<_, NetnsError>(sysctl::set_ip_forward(on)));
                    let r = match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(ChangeFailure::Sysctl(Arc::new(e))),
                        Err(e) => Err(ChangeFailure::Netns(Arc::new(e))),
                    };
                    out[i] = Some((Kind::of(c), 1, r));
                }
                _ => slots.push(i),
            }
        }
        let sent = self.send_built(slots.clone(), |i| self.request(group[i], idx));
        for (i, r) in slots.into_iter().zip(sent.await) {
            let c = group[i];
            out[i] = Some(match r {
                Sent::NotBuilt(e) => (Kind::of(c), 0, Err(e)),
                Sent::Kernel(r) => (Kind::of(c), 1, r.map_err(ChangeFailure::Kernel)),
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
    ) -> (usize, Result<(), ChangeFailure>) {
        let master = match &l.master {
            Some(m) => match idx.get(m) {
                Some(i) => Some(*i),
                None => return (0, Err(ChangeFailure::NoMaster(m.clone()))),
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
                    Err(e) => (2, Err(ChangeFailure::Bridge(Arc::new(e)))),
                }
            }
            LinkKind::Vxlan(v) => {
                let underlay = match &v.underlay_dev {
                    Some(d) => match idx.get(d) {
                        Some(i) => Some(*i),
                        None => return (0, Err(ChangeFailure::NoUnderlay(d.clone()))),
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
                    let failure = if e.is(libc::EEXIST) && e.message.is_none() {
                        ChangeFailure::VniInUse {
                            kernel: e,
                            vni: v.vni.get(),
                            port: v.port,
                        }
                    } else {
                        ChangeFailure::Kernel(e)
                    };
                    return (1, Err(failure));
                }
                let set = msg::SetLink {
                    alias: Some(l.alias.clone()),
                    ..Default::default()
                };
                let r = self.ack(msg::link_set(None, &l.name, &set), 0).await;
                (2, r.map_err(ChangeFailure::SetAlias))
            }
        }
    }

    /// Apply `changes` (normally [`diff`]'s output) in [`Phase`] order. Within
    /// a phase requests are pipelined: 128 requests per datagram, 4 datagrams
    /// queued; device creation is sequential. Keeps going after a failure;
    /// returns an [`ApplyError`] listing every
    /// failure at the end.
    pub async fn apply(&self, changes: &[Change]) -> Result<ApplyReport, ApplyError> {
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
                rep.errors.push(e);
                continue;
            }
            let outcomes: Vec<Outcome> = if phase == Phase::CreateLinks {
                let mut v = Vec::with_capacity(group.len());
                for c in group {
                    // A VTEP may need the index of the bridge made just before.
                    if let Err(e) = idx.refresh(self).await {
                        rep.errors.push(e);
                    }
                    if let Change::CreateLink { link } = c {
                        let (sent, r) = self.create_link(link, &idx.map).await;
                        v.push((Kind::Link, sent, r));
                    }
                    idx.stale = true;
                }
                v
            } else {
                self.run_phase(group, &idx.map).await
            };
            for (change, (kind, sent, res)) in group.iter().zip(outcomes) {
                rep.count(kind, sent);
                if let Err(failure) = res {
                    rep.errors.push(ApplyFailure::Change(ChangeError {
                        change: (*change).clone(),
                        failure,
                    }));
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
            })
        }
    }
}
