//! The status report: the diff's verdicts arranged per device, per network
//! and per peer, each object in `ip`/`bridge` notation.

use std::fmt::Display;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::diff::{self, Extra, LinkDrift, Verdict, Verdicts};
use crate::dataplane::kernel::{ActualFdb, ActualNeigh, ActualRoute, ActualState};
use crate::dataplane::{FdbSpec, LinkSpec, NeighSpec, NodePlan, RouteSpec};
use crate::model::{Mac, Vni};

use super::SavedPlan;

/// The verdict of one planned object, as the report shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    Ok,
    Missing,
    Different,
}

impl<D> From<&Verdict<D>> for Check {
    fn from(v: &Verdict<D>) -> Self {
        match v {
            Verdict::Ok => Check::Ok,
            Verdict::Missing => Check::Missing,
            Verdict::Different(_) => Check::Different,
        }
    }
}

/// One kernel entry (route, neighbour, FDB entry, address) compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryStatus {
    /// "route", "neighbour", "fdb" or "address".
    pub kind: String,
    /// The entry as planned (`ip`/`bridge` notation).
    pub want: String,
    pub state: Check,
    /// What the kernel has instead (`different`).
    pub actual: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    /// "bridge" or "vxlan".
    pub kind: String,
    pub state: Check,
    pub up: Option<bool>,
    pub oper: Option<String>,
    pub mtu: Option<u32>,
    pub want_mtu: u32,
    /// Every attribute that differs from the plan.
    pub drift: Vec<String>,
    /// The device's planned addresses.
    pub addresses: Vec<EntryStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub name: String,
    pub mode: Mode,
    pub vni: Vni,
    pub subnet: Ipv4Net,
    pub pool: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub bridge: String,
    pub vtep: String,
    pub mtu: u32,
    /// Carried over the secure underlay (`encrypt = true`).
    #[serde(default)]
    pub encrypt: bool,
    pub peers: Vec<PeerStatus>,
}

/// A remote node (routed) or endpoint (bridged) and its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Node name, if the underlay IP is a known node.
    pub node: Option<String>,
    /// Where the VTEP sends: the peer's underlay address, or its transport
    /// address for an encrypted network.
    pub underlay_ip: Ipv4Addr,
    /// Routed: the peer's VTEP MAC. Bridged: the endpoint's MAC.
    pub mac: Mac,
    /// Routed: the peer's VTEP address (neighbour). Bridged: the endpoint IP(s).
    pub ips: Vec<Ipv4Addr>,
    pub entries: Vec<EntryStatus>,
    pub ok: bool,
}

/// An object vxmesh owns that the plan does not list (the reconciler
/// removes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraStatus {
    /// "device", "address", "route", "neighbour" or "fdb".
    pub kind: String,
    /// The object as the kernel has it.
    pub actual: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub applied_at: u64,
    pub plan_age_secs: u64,
    pub agent_running: bool,
    pub ip_forward: Option<EntryStatus>,
    pub devices: Vec<DeviceStatus>,
    pub networks: Vec<NetworkStatus>,
    /// Objects vxmesh owns that the plan does not list.
    #[serde(default)]
    pub extra: Vec<ExtraStatus>,
    /// What the reconciler would change now (`diff`), one line each.
    pub pending_changes: Vec<String>,
    /// Everything planned is in place.
    pub ok: bool,
    /// vxmesh's nftables table (`None` when not inspected).
    #[serde(default)]
    pub firewall: Option<super::FirewallStatus>,
    /// The secure underlay (`None`: no encrypted network served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<super::SecureStatus>,
}

pub fn route_text(r: &RouteSpec) -> String {
    format!("{} via {} dev {} onlink", r.dst, r.via, r.dev)
}

pub fn neigh_text(n: &NeighSpec) -> String {
    format!("{} lladdr {} dev {} permanent", n.ip, n.mac, n.dev)
}

pub fn fdb_text(f: &FdbSpec) -> String {
    format!("{} dst {} dev {} self permanent", f.mac, f.dst, f.dev)
}

pub(super) fn opt<T: Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

fn actual_route_text(a: &ActualRoute) -> String {
    format!(
        "{} via {} dev {}{} metric {}",
        a.dst,
        opt(&a.via),
        opt(&a.dev),
        if a.onlink { " onlink" } else { "" },
        a.priority
    )
}

fn actual_neigh_text(a: &ActualNeigh) -> String {
    format!(
        "{} lladdr {} dev {}{}",
        a.ip,
        opt(&a.mac),
        a.dev,
        if a.permanent { " permanent" } else { "" }
    )
}

/// The remotes of one MAC: `MAC dst A,B dev DEV`.
fn actual_fdb_text(mac: Mac, dev: &str, remotes: &[&ActualFdb]) -> String {
    let dsts: Vec<String> = remotes
        .iter()
        .map(|a| {
            let dst = opt(&a.dst);
            if a.permanent {
                dst
            } else {
                format!("{dst} (not permanent)")
            }
        })
        .collect();
    format!("{mac} dst {} dev {dev}", dsts.join(","))
}

fn entry<D>(
    kind: &str,
    want: String,
    verdict: Option<&Verdict<D>>,
    kernel: impl Fn(&D) -> String,
) -> EntryStatus {
    let verdict = verdict.unwrap_or(&Verdict::Missing);
    EntryStatus {
        kind: kind.into(),
        want,
        state: verdict.into(),
        actual: match verdict {
            Verdict::Different(d) => Some(kernel(d)),
            _ => None,
        },
    }
}

/// The diff's verdict of a planned route.
pub fn route_status(r: &RouteSpec, v: &Verdicts) -> EntryStatus {
    entry("route", route_text(r), v.route(r), |rs| {
        rs.iter()
            .map(|a| actual_route_text(a))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The diff's verdict of a planned neighbour.
pub fn neigh_status(n: &NeighSpec, v: &Verdicts) -> EntryStatus {
    entry("neighbour", neigh_text(n), v.neighbour(n), |a| {
        actual_neigh_text(a)
    })
}

/// The diff's verdict of a planned FDB entry.
pub fn fdb_status(f: &FdbSpec, v: &Verdicts) -> EntryStatus {
    entry("fdb", fdb_text(f), v.fdb_entry(f), |rs| {
        actual_fdb_text(f.mac, &f.dev, rs)
    })
}

fn device_status(
    l: &LinkSpec,
    verdict: &Verdict<Vec<LinkDrift>>,
    plan: &NodePlan,
    verdicts: &Verdicts,
    actual: &ActualState,
) -> DeviceStatus {
    let addresses = plan
        .addresses
        .iter()
        .filter(|a| a.dev == l.name)
        .map(|a| {
            entry(
                "address",
                format!("{} dev {}", a.addr, a.dev),
                verdicts.address(a),
                |()| String::new(),
            )
        })
        .collect();
    let have = actual.link(&l.name);
    DeviceStatus {
        name: l.name.clone(),
        kind: l.kind.name().into(),
        state: verdict.into(),
        up: have.map(|a| a.up),
        oper: have.map(|a| a.oper.clone()),
        mtu: have.map(|a| a.mtu),
        want_mtu: l.mtu,
        drift: match verdict {
            Verdict::Different(drift) => drift.iter().map(ToString::to_string).collect(),
            _ => vec![],
        },
        addresses,
    }
}

fn extra_status(e: &Extra) -> ExtraStatus {
    let (kind, actual) = match e {
        Extra::Device(l) => ("device", format!("{} {}", l.kind_name(), l.name)),
        Extra::Address(a) => ("address", format!("{} dev {}", a.addr, a.dev)),
        Extra::Route(r) => ("route", actual_route_text(r)),
        Extra::Neighbour(n) => ("neighbour", actual_neigh_text(n)),
        Extra::Fdb(f) => ("fdb", actual_fdb_text(f.mac, &f.dev, &[f])),
    };
    ExtraStatus {
        kind: kind.into(),
        actual,
    }
}

/// The peers of one network: one per planned FDB entry on its VTEP, with the
/// neighbours that resolve to that MAC and the routes via those neighbours.
pub fn peers_of(vtep: &str, saved: &SavedPlan) -> Vec<(FdbSpec, Vec<NeighSpec>, Vec<RouteSpec>)> {
    let p = &saved.plan;
    p.fdb
        .iter()
        .filter(|f| f.dev == vtep)
        .map(|f| {
            let neighs: Vec<NeighSpec> = p
                .neighbours
                .iter()
                .filter(|n| n.dev == vtep && n.mac == f.mac)
                .cloned()
                .collect();
            let routes: Vec<RouteSpec> = p
                .routes
                .iter()
                .filter(|r| r.dev == vtep && neighs.iter().any(|n| n.ip == r.via))
                .cloned()
                .collect();
            (f.clone(), neighs, routes)
        })
        .collect()
}

/// Render the diff of a saved plan against the kernel's actual state.
pub fn compare(
    saved: &SavedPlan,
    actual: &ActualState,
    agent_running: bool,
    now: u64,
) -> StatusReport {
    let plan = &saved.plan;
    let comparison = diff::compare(plan, actual);
    let v = &comparison.verdicts;
    let devices: Vec<DeviceStatus> = v
        .links
        .iter()
        .map(|(l, verdict)| device_status(l, verdict, plan, v, actual))
        .collect();
    let mut networks = Vec::new();
    // An encrypted network's VTEP sends to transport addresses.
    let mut names = saved.nodes.clone();
    if let Some(sp) = &plan.secure {
        names.extend(sp.peers.iter().map(|(n, p)| (p.transport, n.clone())));
    }
    for st in plan.networks.values() {
        let peers = peers_of(&st.vtep, saved)
            .into_iter()
            .map(|(f, neighs, routes)| {
                let mut entries = Vec::new();
                entries.extend(routes.iter().map(|r| route_status(r, v)));
                entries.extend(neighs.iter().map(|n| neigh_status(n, v)));
                entries.push(fdb_status(&f, v));
                PeerStatus {
                    node: names.get(&f.dst).cloned(),
                    underlay_ip: f.dst,
                    mac: f.mac,
                    ips: neighs.iter().map(|n| n.ip).collect(),
                    ok: entries.iter().all(|e| e.state == Check::Ok),
                    entries,
                }
            })
            .collect();
        networks.push(NetworkStatus {
            name: st.network.clone(),
            mode: st.mode,
            vni: st.vni,
            subnet: st.subnet,
            pool: st.pool,
            gateway: st.gateway,
            bridge: st.bridge.clone(),
            vtep: st.vtep.clone(),
            mtu: st.mtu,
            encrypt: plan
                .firewall
                .secure_vnis
                .iter()
                .any(|(vni, _)| *vni == st.vni.get()),
            peers,
        });
    }
    let ip_forward = v.ip_forward.as_ref().map(|verdict| {
        entry(
            "sysctl",
            "net.ipv4.ip_forward = 1".into(),
            Some(verdict),
            |()| "net.ipv4.ip_forward = 0".into(),
        )
    });
    let pending_changes = match &comparison.changes {
        Ok(changes) => changes.iter().map(|c| c.to_string()).collect(),
        Err(e) => vec![format!("cannot reconcile: {e}")],
    };
    let ok = devices
        .iter()
        .all(|d| d.state == Check::Ok && d.addresses.iter().all(|a| a.state == Check::Ok))
        && networks.iter().all(|n| n.peers.iter().all(|p| p.ok))
        && ip_forward.as_ref().is_none_or(|e| e.state == Check::Ok);
    StatusReport {
        node: saved.node.clone(),
        applied_at: saved.applied_at,
        plan_age_secs: now.saturating_sub(saved.applied_at),
        agent_running,
        ip_forward,
        devices,
        networks,
        extra: v.extra.iter().map(extra_status).collect(),
        pending_changes,
        ok,
        firewall: None,
        secure: None,
    }
}
