//! `vxmesh doctor`: walk the path a packet takes from a local container to a
//! remote one, hop by hop, the way one would with tcpdump on the veth, the
//! bridge and the VTEP, and name the first hop that is broken with a fix in
//! words.
//!
//! The path per peer: bridge (up, gateway address) -> ip_forward (routed) ->
//! VTEP (up, VNI, port, local) -> underlay device (up, owns the local IP) ->
//! route -> neighbour -> FDB entry -> underlay reachability of the peer ->
//! MTU consistency -> the VTEP's tx checksum offload (reported, a warning).
//! Devices come before entries: the kernel drops a down device's routes, so
//! the device is the cause and the missing route only a symptom.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::kernel::{ATTACHED_ALIAS_PREFIX, ActualState, Netlink};
use crate::dataplane::{LinkKind, NetworkState};
use crate::status::{self, Check, SavedPlan};

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

fn hop(name: &str, state: HopState, detail: String, fix: Option<String>) -> Hop {
    Hop {
        hop: name.into(),
        state,
        detail,
        fix,
    }
}

fn ok(name: &str, detail: String) -> Hop {
    hop(name, HopState::Ok, detail, None)
}

fn broken(name: &str, detail: String, fix: String) -> Hop {
    hop(name, HopState::Broken, detail, Some(fix))
}

const AGENT_FIX: &str = "is the agent running? it restores it within a second";

fn bridge_hop(st: &NetworkState, plan: &SavedPlan, actual: &ActualState) -> Hop {
    let Some(b) = actual.link(&st.bridge) else {
        return broken(
            "bridge",
            format!("bridge {} does not exist", st.bridge),
            format!("the bridge {} is missing: {AGENT_FIX}", st.bridge),
        );
    };
    if !b.up {
        return broken(
            "bridge",
            format!("bridge {} is down", st.bridge),
            format!(
                "bring the bridge {} up (administratively down: somebody set it down): {AGENT_FIX}",
                st.bridge
            ),
        );
    }
    if st.mode == Mode::Routed {
        let want: Vec<_> = plan
            .plan
            .addresses
            .iter()
            .filter(|a| a.dev == st.bridge)
            .collect();
        for a in want {
            if !actual.addresses.contains(a) {
                return broken(
                    "bridge",
                    format!("bridge {} lacks its address {}", st.bridge, a.addr),
                    format!(
                        "the gateway address {} of the containers is missing on {}: {AGENT_FIX}",
                        a.addr, st.bridge
                    ),
                );
            }
        }
    }
    ok("bridge", format!("bridge {} up ({})", st.bridge, b.oper))
}

fn forwarding_hop(actual: &ActualState) -> Hop {
    if actual.ip_forward {
        ok("ip_forward", "net.ipv4.ip_forward = 1".into())
    } else {
        broken(
            "ip_forward",
            "net.ipv4.ip_forward = 0: packets from containers are not routed onto the VTEP".into(),
            format!("turn IPv4 forwarding on in this node's network namespace: {AGENT_FIX}"),
        )
    }
}

fn vtep_hop(st: &NetworkState, plan: &SavedPlan, actual: &ActualState) -> Hop {
    let Some(v) = actual.link(&st.vtep) else {
        return broken(
            "vtep",
            format!("VTEP {} does not exist", st.vtep),
            format!("the VTEP {} is missing: {AGENT_FIX}", st.vtep),
        );
    };
    if !v.up {
        return broken(
            "vtep",
            format!("VTEP {} is down", st.vtep),
            format!("bring the VTEP {} up: {AGENT_FIX}", st.vtep),
        );
    }
    let spec = plan.plan.links.iter().find(|l| l.name == st.vtep);
    if let (Some(spec), Some(x)) = (spec, &v.vxlan) {
        if let LinkKind::Vxlan(s) = &spec.kind {
            let mut bad = Vec::new();
            if x.vni != s.vni.get() {
                bad.push(format!("VNI {} (want {})", x.vni, s.vni.get()));
            }
            if x.port != s.port {
                bad.push(format!("dstport {} (want {})", x.port, s.port));
            }
            if x.local != Some(s.local) {
                bad.push(format!(
                    "local {} (want {})",
                    x.local.map_or("-".into(), |l| l.to_string()),
                    s.local
                ));
            }
            if !bad.is_empty() {
                return broken(
                    "vtep",
                    format!("VTEP {} has {}", st.vtep, bad.join(", ")),
                    format!(
                        "the VTEP {} was changed by hand or by another tool: the agent replaces it (is it running?)",
                        st.vtep
                    ),
                );
            }
        }
        if st.mode == Mode::Bridged && v.master.as_deref() != Some(st.bridge.as_str()) {
            return broken(
                "vtep",
                format!("VTEP {} is not a port of {}", st.vtep, st.bridge),
                format!("enslave {} to {} again: {AGENT_FIX}", st.vtep, st.bridge),
            );
        }
        return ok(
            "vtep",
            format!(
                "VTEP {} up, vni {} dstport {} local {}",
                st.vtep,
                x.vni,
                x.port,
                x.local.map_or("-".into(), |l| l.to_string())
            ),
        );
    }
    broken(
        "vtep",
        format!("{} is not a vxlan device", st.vtep),
        format!("{} is not the VTEP vxmesh created: {AGENT_FIX}", st.vtep),
    )
}

/// The underlay device and its MTU, or the broken hop.
fn underlay_hop(st: &NetworkState, actual: &ActualState, facts: &HostFacts) -> (Hop, Option<u32>) {
    let Some(x) = actual.link(&st.vtep).and_then(|v| v.vxlan.clone()) else {
        return (
            broken(
                "underlay_device",
                "no VTEP".into(),
                format!("the VTEP {} is missing: {AGENT_FIX}", st.vtep),
            ),
            None,
        );
    };
    let Some(local) = x.local else {
        return (
            broken(
                "underlay_device",
                format!("VTEP {} has no local address", st.vtep),
                format!("the VTEP {} must be recreated: {AGENT_FIX}", st.vtep),
            ),
            None,
        );
    };
    let owner = facts
        .addresses
        .iter()
        .find(|(_, a, _)| *a == local)
        .map(|(n, _, _)| n.clone());
    let dev = x.link.clone().or(owner.clone());
    let Some(dev) = dev else {
        return (
            broken(
                "underlay_device",
                format!("no device holds the local underlay address {local}"),
                format!(
                    "the underlay address {local} is not on any interface of this host: restore it (or fix underlay_ip of this node)"
                ),
            ),
            None,
        );
    };
    let Some((_, up, mtu)) = facts.links.iter().find(|(n, _, _)| *n == dev) else {
        return (
            broken(
                "underlay_device",
                format!("underlay device {dev} does not exist"),
                format!("the underlay device {dev} is gone: restore it"),
            ),
            None,
        );
    };
    if !up {
        return (
            broken(
                "underlay_device",
                format!("underlay device {dev} is down"),
                format!("bring the underlay device {dev} up"),
            ),
            Some(*mtu),
        );
    }
    if owner.as_deref() != Some(dev.as_str()) {
        return (
            broken(
                "underlay_device",
                format!("underlay device {dev} does not hold the local address {local}"),
                format!("put the underlay address {local} back on {dev}"),
            ),
            Some(*mtu),
        );
    }
    (
        ok(
            "underlay_device",
            format!("{dev} up, holds {local}, mtu {mtu}"),
        ),
        Some(*mtu),
    )
}

fn entry_hop(name: &str, e: &status::EntryStatus, fix_what: &str) -> Hop {
    match e.state {
        Check::Ok => ok(name, e.want.clone()),
        Check::Missing => broken(
            name,
            format!("missing: {}", e.want),
            format!("{fix_what} is missing: {AGENT_FIX}"),
        ),
        Check::Different => broken(
            name,
            format!(
                "different: kernel has {}, want {}",
                e.actual.as_deref().unwrap_or("?"),
                e.want
            ),
            format!("{fix_what} is wrong: {AGENT_FIX}"),
        ),
    }
}

/// Longest-prefix match in /proc/net/route (the caller's namespace):
/// (device, gateway, prefix length).
pub fn underlay_route(dst: Ipv4Addr) -> Option<(String, Ipv4Addr, u8)> {
    let text = std::fs::read_to_string("/proc/self/net/route").ok()?;
    // Addresses are printed as the hex of the in-memory (network order) u32.
    let addr = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    let mut best: Option<(String, Ipv4Addr, u8)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(d), Some(g), Some(m)) = (addr(f[1]), addr(f[2]), addr(f[7])) else {
            continue;
        };
        let (d, m) = (u32::from(d), u32::from(m));
        if u32::from(dst) & m == d & m {
            let len = m.count_ones() as u8;
            if best.as_ref().is_none_or(|b| len > b.2) {
                best = Some((f[0].to_string(), g, len));
            }
        }
    }
    best
}

fn reachability_hop(peer: Ipv4Addr, ping: bool) -> Hop {
    let Some((dev, gw, len)) = underlay_route(peer) else {
        return broken(
            "underlay_reachability",
            format!("no route to the peer's underlay address {peer}"),
            format!(
                "this node has no route to {peer}: fix the underlay network (addresses, routes)"
            ),
        );
    };
    let via = if gw.is_unspecified() {
        format!("dev {dev} (/{len})")
    } else {
        format!("via {gw} dev {dev} (/{len})")
    };
    if !ping {
        return ok("underlay_reachability", format!("route to {peer} {via}"));
    }
    let echo = crate::dataplane::netns::Netns::current()
        .and_then(|ns| crate::probe::icmp_echo(&ns, peer, 56, false, Duration::from_millis(800)));
    match echo {
        Ok(crate::probe::EchoOutcome::Reply { rtt }) => ok(
            "underlay_reachability",
            format!(
                "route to {peer} {via}; ICMP echo reply in {:.3} ms",
                rtt.as_secs_f64() * 1000.0
            ),
        ),
        Ok(other) => hop(
            "underlay_reachability",
            HopState::Warn,
            format!("route to {peer} {via}; ICMP echo: {other}"),
            Some(format!(
                "the peer's underlay address {peer} does not answer ICMP: the host may be down, or a firewall drops ICMP (then check that UDP to the VXLAN port passes)"
            )),
        ),
        Err(e) => hop(
            "underlay_reachability",
            HopState::Warn,
            format!("route to {peer} {via}; ICMP echo not sent: {e:#}"),
            None,
        ),
    }
}

fn mtu_hop(st: &NetworkState, actual: &ActualState, underlay_mtu: Option<u32>) -> Hop {
    let Some(v) = actual.link(&st.vtep) else {
        return broken(
            "mtu",
            "no VTEP".into(),
            format!("the VTEP {} is missing: {AGENT_FIX}", st.vtep),
        );
    };
    let mut bad = Vec::new();
    if let Some(u) = underlay_mtu
        && v.mtu + 50 > u
    {
        bad.push(format!(
            "VTEP {} mtu {} > underlay mtu {u} - 50 (encapsulated packets would not fit)",
            st.vtep, v.mtu
        ));
    }
    if let Some(b) = actual.link(&st.bridge)
        && b.mtu != v.mtu
    {
        bad.push(format!(
            "bridge {} mtu {} != VTEP mtu {}",
            st.bridge, b.mtu, v.mtu
        ));
    }
    for l in &actual.links {
        let ours = l
            .alias
            .as_deref()
            .and_then(|a| a.strip_prefix(ATTACHED_ALIAS_PREFIX))
            .is_some_and(|rest| rest.split(':').next() == Some(st.network.as_str()));
        if ours && l.mtu != v.mtu {
            bad.push(format!(
                "container veth {} mtu {} != VTEP mtu {}",
                l.name, l.mtu, v.mtu
            ));
        }
    }
    if bad.is_empty() {
        ok(
            "mtu",
            format!(
                "VTEP {} mtu {} (underlay {}), bridge and veths equal",
                st.vtep,
                v.mtu,
                underlay_mtu.map_or("?".into(), |u| u.to_string())
            ),
        )
    } else {
        broken(
            "mtu",
            bad.join("; "),
            format!(
                "MTUs disagree on the path: the VTEP must be at most the underlay MTU minus 50 and the bridge and container veths equal to it ({} planned): {AGENT_FIX} for the devices it owns; a container veth gets its MTU at attach",
                st.mtu
            ),
        )
    }
}

/// `ETHTOOL_GTXCSUM` on `dev` in the caller's namespace.
pub fn tx_checksum_offload(dev: &str) -> Option<bool> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    if dev.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    let mut req = Ifreq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: a plain socket and an ioctl on memory owned by this frame.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut Ifreq);
        libc::close(fd);
        if r < 0 {
            return None;
        }
    }
    Some(value.data != 0)
}

fn offload_hop(st: &NetworkState, offload: Option<bool>) -> Hop {
    match offload {
        Some(false) => ok(
            "tx_checksum_offload",
            format!("tx checksum offload off on {}", st.vtep),
        ),
        Some(true) => hop(
            "tx_checksum_offload",
            HopState::Warn,
            format!("tx checksum offload on on {}", st.vtep),
            Some(format!(
                "some kernels and NICs corrupt VXLAN UDP checksums with tx checksum offload on the vxlan device: if peers drop the encapsulated packets, turn tx checksumming off on {}",
                st.vtep
            )),
        ),
        None => hop(
            "tx_checksum_offload",
            HopState::Ok,
            format!("tx checksum offload on {}: unknown (not readable)", st.vtep),
            None,
        ),
    }
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
) -> Result<DoctorReport> {
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
            let mut hops = vec![bridge_hop(st, saved, actual)];
            if st.mode == Mode::Routed {
                hops.push(forwarding_hop(actual));
            }
            hops.push(vtep_hop(st, saved, actual));
            let (u, underlay_mtu) = underlay_hop(st, actual, facts);
            hops.push(u);
            for r in &routes {
                hops.push(entry_hop(
                    "route",
                    &status::check_route(r, actual),
                    &format!("the route to {} via {} on {}", r.dst, r.via, r.dev),
                ));
            }
            for n in &neighs {
                hops.push(entry_hop(
                    "neighbour",
                    &status::check_neigh(n, actual),
                    &format!("the neighbour entry {} -> {} on {}", n.ip, n.mac, n.dev),
                ));
            }
            hops.push(entry_hop(
                "fdb",
                &status::check_fdb(&f, actual),
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
        match local {
            Some(st) => bail!(
                "{to} is in this node's own subnet {} of network {}: the path stays on {}",
                st.subnet,
                st.network,
                st.bridge
            ),
            None => bail!(
                "no peer of this node serves {to}: is it a container address of a remote node?"
            ),
        }
    }
    let first_broken = paths.iter().find_map(|p| p.first_broken.clone());
    Ok(DoctorReport {
        node: saved.node.clone(),
        agent_running,
        ok: first_broken.is_none(),
        first_broken,
        paths,
    })
}

fn host_facts(links: &[crate::dataplane::kernel::LinkInfo]) -> Result<HostFacts> {
    let mut addresses = Vec::new();
    for a in nix::ifaddrs::getifaddrs().context("list interface addresses")? {
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
pub async fn doctor(state_dir: &Path, opts: &DoctorOptions) -> Result<DoctorReport> {
    let saved = status::read_plan(state_dir)?;
    let nl = Netlink::connect().await.context("connect to rtnetlink")?;
    let actual = nl.dump().await?;
    let links = nl.list_links().await?;
    let facts = host_facts(&links)?;
    let saved2 = saved.clone();
    let actual2 = actual.clone();
    let opts = opts.clone();
    let running = crate::state::agent_running(state_dir);
    tokio::task::spawn_blocking(move || {
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
    .context("doctor task")?
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
