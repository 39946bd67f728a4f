//! `vxmesh doctor`: walk the path a packet takes from a local container to a
//! remote one, hop by hop, the way one would with tcpdump on the veth, the
//! bridge and the VTEP, and name the first hop that is broken with a fix in
//! words.
//!
//! The path per peer: bridge (up, gateway address) -> ip_forward (routed) ->
//! VTEP (up, VNI, port, local) -> underlay device (up, owns the local IP) ->
//! route -> neighbour -> FDB entry -> underlay reachability of the peer ->
//! MTU consistency -> the VTEP's tx checksum offload (reported, a warning).
//! Over the secure underlay (encrypted networks) the path continues through
//! the TUN device, the keys and the WireGuard session ([`secure`]).
//! Devices come before entries: the kernel drops a down device's routes, so
//! the device is the cause and the missing route only a symptom. The device
//! and entry hops render the diff's verdicts (the checks `status` shows); the
//! underlay, reachability, MTU and offload hops read the host.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::diff;
use crate::dataplane::kernel::{ActualState, Netlink, NetlinkError};
use crate::status::{self, SavedPlan, StatusError};

mod firewall;
mod hops;
pub mod secure;

use hops::*;
pub use hops::{tx_checksum_offload, underlay_route};

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(
        "{to} is in this node's own subnet {subnet} of network {network}: the path stays on {bridge}"
    )]
    LocalAddress {
        to: Ipv4Addr,
        subnet: Ipv4Net,
        network: String,
        bridge: String,
    },
    #[error("no peer of this node serves {to}: is it a container address of a remote node?")]
    NoPeerServes { to: Ipv4Addr },
    #[error("connect to rtnetlink")]
    Connect(#[source] NetlinkError),
    #[error("read the kernel state")]
    Kernel(#[source] NetlinkError),
    #[error("list interface addresses")]
    Addresses(#[source] nix::Error),
    #[error("read the nftables table inet vxmesh")]
    Firewall(#[source] crate::firewall::NftError),
    #[error("doctor task")]
    Task(#[source] tokio::task::JoinError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HopState {
    Ok,
    /// Worth knowing, not a break (offload on, ICMP unanswered).
    Warn,
    Broken,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// bridge, ip_forward, vtep, underlay_device, route, neighbour, fdb,
    /// underlay_reachability, mtu, tx_checksum_offload.
    pub hop: String,
    pub state: HopState,
    pub detail: String,
    /// What to do, in words (broken and warn hops).
    pub fix: Option<String>,
}

/// The path to one peer of one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPath {
    pub network: String,
    pub peer: Option<String>,
    pub underlay_ip: Ipv4Addr,
    /// The destination asked for (`--to`), if any.
    pub to: Option<Ipv4Addr>,
    pub hops: Vec<Hop>,
    pub first_broken: Option<Hop>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    pub node: String,
    pub agent_running: bool,
    pub paths: Vec<PeerPath>,
    /// The first broken hop over all paths.
    pub first_broken: Option<Hop>,
    pub ok: bool,
    /// Node-wide hops of vxmesh's nftables table (table, outbound NAT).
    #[serde(default)]
    pub firewall: Vec<Hop>,
}

#[derive(Clone, Debug, Default)]
pub struct DoctorOptions {
    pub to: Option<Ipv4Addr>,
    /// Send one ICMP echo to each peer's underlay IP.
    pub ping: bool,
}

/// What the doctor needs from the node besides the dump (read live).
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// (interface name, address, prefix length) of every IPv4 address.
    pub addresses: Vec<(String, Ipv4Addr, u8)>,
    /// (name, up, mtu) of every device.
    pub links: Vec<(String, bool, u32)>,
}

/// Examine every path (or the one to `opts.to`). Pure but for the
/// reachability hop (a route lookup in /proc and, with `ping`, one echo).
pub fn examine(
    saved: &SavedPlan,
    actual: &ActualState,
    facts: &HostFacts,
    offload: &dyn Fn(&str) -> Option<bool>,
    agent_running: bool,
    opts: &DoctorOptions,
) -> Result<DoctorReport, DoctorError> {
    let verdicts = diff::compare(&saved.plan, actual).verdicts;
    let mut paths = Vec::new();
    let mut reachable: std::collections::HashMap<Ipv4Addr, Hop> = Default::default();
    for st in saved.plan.networks.values() {
        for (f, neighs, routes) in status::peers_of(&st.vtep, saved) {
            if let Some(to) = opts.to {
                let hit =
                    routes.iter().any(|r| r.dst.contains(&to)) || neighs.iter().any(|n| n.ip == to);
                if !hit {
                    continue;
                }
            }
            let mut hops = vec![bridge_hop(st, saved, &verdicts, actual)];
            if st.mode == Mode::Routed {
                hops.push(forwarding_hop(actual));
            }
            hops.push(vtep_hop(st, &verdicts, actual));
            let (u, underlay_mtu) = underlay_hop(st, actual, facts);
            hops.push(u);
            for r in &routes {
                hops.push(entry_hop(
                    "route",
                    &status::route_status(r, &verdicts),
                    &format!("the route to {} via {} on {}", r.dst, r.via, r.dev),
                ));
            }
            for n in &neighs {
                hops.push(entry_hop(
                    "neighbour",
                    &status::neigh_status(n, &verdicts),
                    &format!("the neighbour entry {} -> {} on {}", n.ip, n.mac, n.dev),
                ));
            }
            hops.push(entry_hop(
                "fdb",
                &status::fdb_status(&f, &verdicts),
                &format!("the FDB entry for {} (dst {}) on {}", f.mac, f.dst, f.dev),
            ));
            // One lookup (and echo) per underlay IP: bridged peers share it.
            let reach = reachable
                .entry(f.dst)
                .or_insert_with(|| reachability_hop(f.dst, opts.ping));
            hops.push(reach.clone());
            hops.push(mtu_hop(st, actual, underlay_mtu));
            hops.push(offload_hop(st, offload(&st.vtep)));
            let first_broken = hops.iter().find(|h| h.state == HopState::Broken).cloned();
            paths.push(PeerPath {
                network: st.network.clone(),
                peer: saved.nodes.get(&f.dst).cloned(),
                underlay_ip: f.dst,
                to: opts.to,
                hops,
                first_broken,
            });
        }
    }
    if let Some(to) = opts.to
        && paths.is_empty()
    {
        let local = saved
            .plan
            .networks
            .values()
            .find(|st| st.mode == Mode::Routed && st.subnet.contains(&to));
        return Err(match local {
            Some(st) => DoctorError::LocalAddress {
                to,
                subnet: st.subnet,
                network: st.network.clone(),
                bridge: st.bridge.clone(),
            },
            None => DoctorError::NoPeerServes { to },
        });
    }
    let first_broken = paths.iter().find_map(|p| p.first_broken.clone());
    Ok(DoctorReport {
        node: saved.node.clone(),
        agent_running,
        ok: first_broken.is_none(),
        first_broken,
        paths,
        firewall: Vec::new(),
    })
}

/// Add the firewall hops: the table's own, and the VTEP filter's per path
/// (right after the FDB hop's place: the peer's packets arrive, then the
/// filter judges them). The first broken hop stays the first on the path.
fn add_firewall(
    r: &mut DoctorReport,
    plan: &crate::dataplane::NodePlan,
    i: &crate::firewall::Inspection,
) {
    r.firewall = firewall::table_hops(plan, i);
    for p in &mut r.paths {
        if let Some(h) = firewall::filter_hop(plan, i, p.underlay_ip) {
            if p.first_broken.is_none() && h.state == HopState::Broken {
                p.first_broken = Some(h.clone());
            }
            p.hops.push(h);
        }
    }
    if r.first_broken.is_none() {
        r.first_broken = r
            .firewall
            .iter()
            .chain(r.paths.iter().filter_map(|p| p.first_broken.as_ref()))
            .find(|h| h.state == HopState::Broken)
            .cloned();
    }
    r.ok = r.first_broken.is_none();
}

fn host_facts(links: &[crate::dataplane::kernel::LinkInfo]) -> Result<HostFacts, DoctorError> {
    let mut addresses = Vec::new();
    for a in nix::ifaddrs::getifaddrs().map_err(DoctorError::Addresses)? {
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            let len = a
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
            addresses.push((a.interface_name.clone(), sin.ip(), len));
        }
    }
    Ok(HostFacts {
        addresses,
        links: links
            .iter()
            .map(|l| (l.name.clone(), l.up, l.mtu))
            .collect(),
    })
}

/// Run the doctor on the node in the current network namespace.
pub async fn doctor(state_dir: &Path, opts: &DoctorOptions) -> Result<DoctorReport, DoctorError> {
    let saved = status::read_plan(state_dir)?;
    let nl = Netlink::connect().await.map_err(DoctorError::Connect)?;
    let actual = nl.dump().await.map_err(DoctorError::Kernel)?;
    let links = nl.list_links().await.map_err(DoctorError::Kernel)?;
    let facts = host_facts(&links)?;
    let saved2 = saved.clone();
    let actual2 = actual.clone();
    let opts = opts.clone();
    let running = crate::state::agent_running(state_dir);
    let mut report = tokio::task::spawn_blocking(move || {
        examine(
            &saved2,
            &actual2,
            &facts,
            &tx_checksum_offload,
            running,
            &opts,
        )
    })
    .await
    .map_err(DoctorError::Task)??;
    if let Some(sp) = &saved.plan.secure {
        let link = nl.get_link(&sp.dev).await.map_err(DoctorError::Kernel)?;
        let agent = crate::secure::underlay::report::read_report(state_dir);
        let now = crate::secure::underlay::report::now_ms();
        let st = status::secure_status(sp, link.as_ref(), agent.as_ref(), now);
        let uptime = agent
            .as_ref()
            .map(|a| std::time::Duration::from_millis(now.saturating_sub(a.started_ms)));
        secure::add_secure(&mut report, sp, &st, uptime);
    }
    let plan = saved.plan.clone();
    let inspection = tokio::task::spawn_blocking(move || crate::firewall::inspect(&plan))
        .await
        .map_err(DoctorError::Task)?
        .map_err(DoctorError::Firewall)?;
    add_firewall(&mut report, &saved.plan, &inspection);
    Ok(report)
}

/// Human-readable rendering.
pub fn render(r: &DoctorReport) -> String {
    let mut out = String::new();
    for p in &r.paths {
        out.push_str(&format!(
            "network {} -> peer {} (underlay {}){}\n",
            p.network,
            p.peer.as_deref().unwrap_or("?"),
            p.underlay_ip,
            p.to.map_or(String::new(), |t| format!(", to {t}"))
        ));
        for h in &p.hops {
            let m = match h.state {
                HopState::Ok => "ok",
                HopState::Warn => "WARN",
                HopState::Broken => "BROKEN",
            };
            out.push_str(&format!("  {m:6} {:22} {}\n", h.hop, h.detail));
            if h.state != HopState::Ok
                && let Some(f) = &h.fix
            {
                out.push_str(&format!("         -> {f}\n"));
            }
        }
    }
    for h in &r.firewall {
        let m = match h.state {
            HopState::Ok => "ok",
            HopState::Warn => "WARN",
            HopState::Broken => "BROKEN",
        };
        out.push_str(&format!("firewall {m:6} {:22} {}\n", h.hop, h.detail));
        if h.state != HopState::Ok
            && let Some(f) = &h.fix
        {
            out.push_str(&format!("         -> {f}\n"));
        }
    }
    match &r.first_broken {
        None => out.push_str(&format!("node {}: every path is healthy\n", r.node)),
        Some(h) => {
            out.push_str(&format!(
                "node {}: first broken hop: {}: {}\n  fix: {}\n",
                r.node,
                h.hop,
                h.detail,
                h.fix.as_deref().unwrap_or("-")
            ));
            if !r.agent_running {
                out.push_str(
                    "  (no agent holds this state dir's lock: the agent is not running)\n",
                );
            }
        }
    }
    out
}
