//! `vxmesh status`: what the agent last applied on this node (STATE/plan.json)
//! against what the kernel holds now, per network, device and peer entry.
//!
//! The agent writes [`SavedPlan`] atomically after each successful pass; the
//! status reads it, dumps the owned kernel objects and marks every planned
//! object `ok`, `missing` or `different` (with what the kernel has instead).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::kernel::{ActualState, Netlink};
use crate::dataplane::{FdbSpec, LinkKind, LinkSpec, NeighSpec, NodePlan, RouteSpec};
use crate::model::{Mac, Vni};

/// File name of the saved plan in the state dir.
pub const PLAN_FILE: &str = "plan.json";

/// The plan the agent last applied, with who and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPlan {
    pub node: String,
    /// Seconds since the epoch of the first pass that applied this plan (the
    /// file is rewritten only when the plan changes).
    pub applied_at: u64,
    /// Underlay IP -> node name of every node of the cluster.
    pub nodes: BTreeMap<Ipv4Addr, String>,
    pub plan: NodePlan,
}

/// Write the plan atomically to `STATE/plan.json`.
pub fn write_plan(state_dir: &Path, saved: &SavedPlan) -> Result<()> {
    let data = serde_json::to_vec_pretty(saved).context("serialise the plan")?;
    Ok(crate::state::write_atomic(
        &state_dir.join(PLAN_FILE),
        &data,
    )?)
}

/// Read `STATE/plan.json`.
pub fn read_plan(state_dir: &Path) -> Result<SavedPlan> {
    let path = state_dir.join(PLAN_FILE);
    let data = std::fs::read(&path).with_context(|| {
        format!(
            "read {}: has the agent completed a pass with this --state-dir?",
            path.display()
        )
    })?;
    parse_plan(&data).with_context(|| format!("parse {}", path.display()))
}

/// Parse the contents of a `STATE/plan.json` file.
pub fn parse_plan(data: &[u8]) -> Result<SavedPlan> {
    Ok(serde_json::from_slice(data)?)
}

/// The state of one planned object in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    Ok,
    Missing,
    Different,
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
    pub peers: Vec<PeerStatus>,
}

/// A remote node (routed) or endpoint (bridged) and its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Node name, if the underlay IP is a known node.
    pub node: Option<String>,
    pub underlay_ip: Ipv4Addr,
    /// Routed: the peer's VTEP MAC. Bridged: the endpoint's MAC.
    pub mac: Mac,
    /// Routed: the peer's VTEP address (neighbour). Bridged: the endpoint IP(s).
    pub ips: Vec<Ipv4Addr>,
    pub entries: Vec<EntryStatus>,
    pub ok: bool,
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
    /// What the reconciler would change now (`diff`), one line each.
    pub pending_changes: Vec<String>,
    /// Everything planned is in place.
    pub ok: bool,
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

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

pub fn check_route(r: &RouteSpec, actual: &ActualState) -> EntryStatus {
    let found: Vec<_> = actual.routes.iter().filter(|a| a.dst == r.dst).collect();
    let (state, act) = if found.is_empty() {
        (Check::Missing, None)
    } else if found.iter().any(|a| {
        a.via == Some(r.via) && a.dev.as_deref() == Some(r.dev.as_str()) && a.is_vxmesh_shape()
    }) {
        (Check::Ok, None)
    } else {
        let a = found[0];
        (
            Check::Different,
            Some(format!(
                "{} via {} dev {}{} metric {}",
                a.dst,
                opt(&a.via),
                opt(&a.dev),
                if a.onlink { " onlink" } else { "" },
                a.priority
            )),
        )
    };
    EntryStatus {
        kind: "route".into(),
        want: route_text(r),
        state,
        actual: act,
    }
}

pub fn check_neigh(n: &NeighSpec, actual: &ActualState) -> EntryStatus {
    let found = actual
        .neighbours
        .iter()
        .find(|a| a.dev == n.dev && a.ip == n.ip);
    let (state, act) = match found {
        None => (Check::Missing, None),
        Some(a) if a.mac == Some(n.mac) && a.permanent => (Check::Ok, None),
        Some(a) => (
            Check::Different,
            Some(format!(
                "{} lladdr {} dev {}{}",
                a.ip,
                opt(&a.mac),
                a.dev,
                if a.permanent { " permanent" } else { "" }
            )),
        ),
    };
    EntryStatus {
        kind: "neighbour".into(),
        want: neigh_text(n),
        state,
        actual: act,
    }
}

pub fn check_fdb(f: &FdbSpec, actual: &ActualState) -> EntryStatus {
    let found: Vec<_> = actual
        .fdb
        .iter()
        .filter(|a| a.dev == f.dev && a.mac == f.mac)
        .collect();
    let (state, act) = if found.is_empty() {
        (Check::Missing, None)
    } else if found.len() == 1 && found[0].dst == Some(f.dst) {
        (Check::Ok, None)
    } else {
        let dsts: Vec<String> = found.iter().map(|a| opt(&a.dst)).collect();
        (
            Check::Different,
            Some(format!("{} dst {} dev {}", f.mac, dsts.join(","), f.dev)),
        )
    };
    EntryStatus {
        kind: "fdb".into(),
        want: fdb_text(f),
        state,
        actual: act,
    }
}

fn check_device(l: &LinkSpec, plan: &NodePlan, actual: &ActualState) -> DeviceStatus {
    let kind = match &l.kind {
        LinkKind::Bridge => "bridge",
        LinkKind::Vxlan(_) => "vxlan",
    };
    let addresses: Vec<EntryStatus> = plan
        .addresses
        .iter()
        .filter(|a| a.dev == l.name)
        .map(|a| {
            let ok = actual.addresses.iter().any(|x| x == a);
            EntryStatus {
                kind: "address".into(),
                want: format!("{} dev {}", a.addr, a.dev),
                state: if ok { Check::Ok } else { Check::Missing },
                actual: None,
            }
        })
        .collect();
    let Some(a) = actual.link(&l.name) else {
        return DeviceStatus {
            name: l.name.clone(),
            kind: kind.into(),
            state: Check::Missing,
            up: None,
            oper: None,
            mtu: None,
            want_mtu: l.mtu,
            drift: vec![],
            addresses,
        };
    };
    let mut drift = Vec::new();
    if a.kind.as_deref() != Some(kind) {
        drift.push(format!("kind {} (want {kind})", a.kind_name()));
    }
    if !a.up {
        drift.push("down (want up)".into());
    }
    if a.mtu != l.mtu {
        drift.push(format!("mtu {} (want {})", a.mtu, l.mtu));
    }
    if a.mac != Some(l.mac) {
        drift.push(format!("mac {} (want {})", opt(&a.mac), l.mac));
    }
    if a.master != l.master {
        drift.push(format!(
            "master {} (want {})",
            opt(&a.master),
            opt(&l.master)
        ));
    }
    if let LinkKind::Vxlan(v) = &l.kind {
        match &a.vxlan {
            None => drift.push("no vxlan attributes".into()),
            Some(x) => {
                if x.vni != v.vni.get() {
                    drift.push(format!("vni {} (want {})", x.vni, v.vni.get()));
                }
                if x.local != Some(v.local) {
                    drift.push(format!("local {} (want {})", opt(&x.local), v.local));
                }
                if x.port != v.port {
                    drift.push(format!("dstport {} (want {})", x.port, v.port));
                }
                if x.learning {
                    drift.push("learning (want nolearning)".into());
                }
                if x.proxy != v.proxy {
                    drift.push(format!("proxy {} (want {})", x.proxy, v.proxy));
                }
            }
        }
    }
    let state = if drift.is_empty() {
        Check::Ok
    } else {
        Check::Different
    };
    DeviceStatus {
        name: l.name.clone(),
        kind: kind.into(),
        state,
        up: Some(a.up),
        oper: Some(a.oper.clone()),
        mtu: Some(a.mtu),
        want_mtu: l.mtu,
        drift,
        addresses,
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

/// Compare a saved plan with the kernel's actual state.
pub fn compare(
    saved: &SavedPlan,
    actual: &ActualState,
    agent_running: bool,
    now: u64,
) -> StatusReport {
    let plan = &saved.plan;
    let devices: Vec<DeviceStatus> = plan
        .links
        .iter()
        .map(|l| check_device(l, plan, actual))
        .collect();
    let mut networks = Vec::new();
    for st in plan.networks.values() {
        let peers = peers_of(&st.vtep, saved)
            .into_iter()
            .map(|(f, neighs, routes)| {
                let mut entries = Vec::new();
                entries.extend(routes.iter().map(|r| check_route(r, actual)));
                entries.extend(neighs.iter().map(|n| check_neigh(n, actual)));
                entries.push(check_fdb(&f, actual));
                PeerStatus {
                    node: saved.nodes.get(&f.dst).cloned(),
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
            peers,
        });
    }
    let ip_forward = plan.ip_forward.then(|| EntryStatus {
        kind: "sysctl".into(),
        want: "net.ipv4.ip_forward = 1".into(),
        state: if actual.ip_forward {
            Check::Ok
        } else {
            Check::Different
        },
        actual: (!actual.ip_forward).then(|| "net.ipv4.ip_forward = 0".into()),
    });
    let pending_changes = match crate::dataplane::diff::diff(plan, actual) {
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
        pending_changes,
        ok,
    }
}

/// Status of the node in the current network namespace.
pub async fn status(state_dir: &Path) -> Result<StatusReport> {
    let saved = read_plan(state_dir)?;
    let nl = Netlink::connect().await.context("connect to rtnetlink")?;
    let actual = nl.dump().await?;
    Ok(compare(
        &saved,
        &actual,
        crate::state::agent_running(state_dir),
        crate::state::now_secs(),
    ))
}

fn mark(c: Check) -> &'static str {
    match c {
        Check::Ok => "ok",
        Check::Missing => "MISSING",
        Check::Different => "DIFFERENT",
    }
}

fn entry_line(e: &EntryStatus) -> String {
    let mut s = format!("{:9} {:9} {}", mark(e.state), e.kind, e.want);
    if let Some(a) = &e.actual {
        s.push_str(&format!("  (kernel: {a})"));
    }
    s
}

/// Human-readable rendering.
pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "node {}: plan applied {} s ago, agent {}, {}",
        r.node,
        r.plan_age_secs,
        if r.agent_running {
            "running"
        } else {
            "NOT running"
        },
        if r.ok { "all in place" } else { "DRIFT" }
    ));
    if let Some(f) = &r.ip_forward {
        line(format!("  {}", entry_line(f)));
    }
    line("devices:".into());
    for d in &r.devices {
        line(format!(
            "  {:9} {:6} {:14} {} mtu {} {}",
            mark(d.state),
            d.kind,
            d.name,
            match d.up {
                Some(true) => "up",
                Some(false) => "down",
                None => "absent",
            },
            d.mtu.map_or("-".into(), |m| m.to_string()),
            d.drift.join("; ")
        ));
        for a in &d.addresses {
            line(format!("    {}", entry_line(a)));
        }
    }
    for n in &r.networks {
        line(format!(
            "network {} ({}, vni {}): subnet {} pool {} gateway {} vtep {} bridge {} mtu {}",
            n.name,
            n.mode,
            n.vni.get(),
            n.subnet,
            n.pool,
            opt(&n.gateway),
            n.vtep,
            n.bridge,
            n.mtu
        ));
        for p in &n.peers {
            line(format!(
                "  peer {} underlay {} mac {} {}: {}",
                p.node.as_deref().unwrap_or("?"),
                p.underlay_ip,
                p.mac,
                p.ips
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                if p.ok { "ok" } else { "NOT OK" }
            ));
            for e in &p.entries {
                line(format!("    {}", entry_line(e)));
            }
        }
    }
    if !r.pending_changes.is_empty() {
        line(format!(
            "the reconciler would make {} change(s):",
            r.pending_changes.len()
        ));
        for c in &r.pending_changes {
            line(format!("  {c}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::kernel::{ActualFdb, ActualNeigh, ActualRoute, route_metric};

    fn mac(last: u8) -> Mac {
        Mac([0x0a, 0x64, 0xc6, 0x12, 0, last])
    }

    fn saved() -> SavedPlan {
        let mut plan = NodePlan::default();
        plan.routes.insert(RouteSpec {
            dst: "172.18.20.0/24".parse().unwrap(),
            via: "172.18.20.0".parse().unwrap(),
            dev: "vxm-vx100".into(),
        });
        plan.neighbours.insert(NeighSpec {
            dev: "vxm-vx100".into(),
            ip: "172.18.20.0".parse().unwrap(),
            mac: mac(2),
        });
        plan.fdb.insert(FdbSpec {
            dev: "vxm-vx100".into(),
            mac: mac(2),
            dst: "198.18.0.2".parse().unwrap(),
        });
        SavedPlan {
            node: "host1".into(),
            applied_at: 100,
            nodes: [("198.18.0.2".parse().unwrap(), "host2".to_string())].into(),
            plan,
        }
    }

    fn actual_of(s: &SavedPlan) -> ActualState {
        let r = s.plan.routes.first().unwrap();
        let n = s.plan.neighbours.first().unwrap();
        let f = s.plan.fdb.first().unwrap();
        ActualState {
            routes: vec![ActualRoute {
                dst: r.dst,
                via: Some(r.via),
                dev: Some(r.dev.clone()),
                oif: Some(7),
                onlink: true,
                table: 254,
                priority: route_metric(r.dst),
                tos: 0,
                scope: 0,
                kind: 1,
            }],
            neighbours: vec![ActualNeigh {
                dev: n.dev.clone(),
                ip: n.ip,
                mac: Some(n.mac),
                permanent: true,
            }],
            fdb: vec![ActualFdb {
                dev: f.dev.clone(),
                mac: f.mac,
                dst: Some(f.dst),
                permanent: true,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn entries_in_place_are_ok() {
        let s = saved();
        let a = actual_of(&s);
        assert_eq!(
            check_route(s.plan.routes.first().unwrap(), &a).state,
            Check::Ok
        );
        assert_eq!(
            check_neigh(s.plan.neighbours.first().unwrap(), &a).state,
            Check::Ok
        );
        assert_eq!(check_fdb(s.plan.fdb.first().unwrap(), &a).state, Check::Ok);
        let peers = peers_of("vxm-vx100", &s);
        assert_eq!(peers.len(), 1);
        assert_eq!((peers[0].1.len(), peers[0].2.len()), (1, 1));
    }

    #[test]
    fn missing_and_different_entries_show_the_drift() {
        let s = saved();
        let mut a = actual_of(&s);
        a.routes.clear();
        a.neighbours[0].mac = Some(mac(9));
        a.fdb[0].dst = Some("198.18.0.9".parse().unwrap());
        assert_eq!(
            check_route(s.plan.routes.first().unwrap(), &a).state,
            Check::Missing
        );
        let n = check_neigh(s.plan.neighbours.first().unwrap(), &a);
        assert_eq!(n.state, Check::Different);
        assert!(n.actual.unwrap().contains("0a:64:c6:12:00:09"));
        let f = check_fdb(s.plan.fdb.first().unwrap(), &a);
        assert_eq!(f.state, Check::Different);
        assert!(f.actual.unwrap().contains("198.18.0.9"));
    }

    #[test]
    fn saved_plan_round_trips_through_json() {
        let s = saved();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SavedPlan>(&text).unwrap(), s);
    }
}
