//! The hops `vxmesh doctor` walks: one function per hop, each turning what
//! the kernel shows into a [`Hop`] with a fix in words when it is broken.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::config::Mode;
use crate::dataplane::NetworkState;
use crate::dataplane::diff::{LinkDrift, Verdict, Verdicts};
use crate::dataplane::kernel::ActualState;
use crate::names::VethAlias;
use crate::status::{self, Check, SavedPlan};

use super::{Hop, HopState, HostFacts};

pub(super) fn hop(name: &str, state: HopState, detail: String, fix: Option<String>) -> Hop {
    Hop {
        hop: name.into(),
        state,
        detail,
        fix,
    }
}

pub(super) fn ok(name: &str, detail: String) -> Hop {
    hop(name, HopState::Ok, detail, None)
}

pub(super) fn broken(name: &str, detail: String, fix: String) -> Hop {
    hop(name, HopState::Broken, detail, Some(fix))
}

const AGENT_FIX: &str = "is the agent running? it restores it within a second";

/// The drift of a planned device, or `None` when the kernel lacks it (or
/// the plan does not list it).
fn device_drift<'v>(verdicts: &'v Verdicts, name: &str) -> Option<&'v [LinkDrift]> {
    match verdicts.link(name)? {
        Verdict::Missing => None,
        Verdict::Ok => Some(&[]),
        Verdict::Different(drift) => Some(drift),
    }
}

fn has(drift: &[LinkDrift], pred: impl Fn(&LinkDrift) -> bool) -> bool {
    drift.iter().any(pred)
}

pub(super) fn bridge_hop(
    st: &NetworkState,
    plan: &SavedPlan,
    verdicts: &Verdicts,
    actual: &ActualState,
) -> Hop {
    let Some(drift) = device_drift(verdicts, &st.bridge) else {
        return broken(
            "bridge",
            format!("bridge {} does not exist", st.bridge),
            format!("the bridge {} is missing: {AGENT_FIX}", st.bridge),
        );
    };
    if has(drift, |d| *d == LinkDrift::Down) {
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
        let want = plan.plan.addresses.iter().filter(|a| a.dev == st.bridge);
        for a in want {
            if !verdicts.address(a).is_some_and(Verdict::is_ok) {
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
    let oper = actual
        .link(&st.bridge)
        .map_or("unknown", |b| b.oper.as_str());
    ok("bridge", format!("bridge {} up ({oper})", st.bridge))
}

pub(super) fn forwarding_hop(actual: &ActualState) -> Hop {
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

pub(super) fn vtep_hop(st: &NetworkState, verdicts: &Verdicts, actual: &ActualState) -> Hop {
    let Some(drift) = device_drift(verdicts, &st.vtep) else {
        return broken(
            "vtep",
            format!("VTEP {} does not exist", st.vtep),
            format!("the VTEP {} is missing: {AGENT_FIX}", st.vtep),
        );
    };
    if has(drift, |d| *d == LinkDrift::Down) {
        return broken(
            "vtep",
            format!("VTEP {} is down", st.vtep),
            format!("bring the VTEP {} up: {AGENT_FIX}", st.vtep),
        );
    }
    let x = actual.link(&st.vtep).and_then(|v| v.vxlan.as_ref());
    let not_vxlan =
        |d: &LinkDrift| matches!(d, LinkDrift::Kind { .. } | LinkDrift::NoVxlanAttributes);
    let Some(x) = x.filter(|_| !has(drift, not_vxlan)) else {
        return broken(
            "vtep",
            format!("{} is not a vxlan device", st.vtep),
            format!("{} is not the VTEP vxmesh created: {AGENT_FIX}", st.vtep),
        );
    };
    // What is set at creation: the agent replaces the device.
    let bad: Vec<String> = drift
        .iter()
        .filter(|d| d.needs_recreate())
        .map(ToString::to_string)
        .collect();
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
    if st.mode == Mode::Bridged && has(drift, |d| matches!(d, LinkDrift::Master { .. })) {
        return broken(
            "vtep",
            format!("VTEP {} is not a port of {}", st.vtep, st.bridge),
            format!("enslave {} to {} again: {AGENT_FIX}", st.vtep, st.bridge),
        );
    }
    ok(
        "vtep",
        format!(
            "VTEP {} up, vni {} dstport {} local {}",
            st.vtep,
            x.vni,
            x.port,
            x.local.map_or("-".into(), |l| l.to_string())
        ),
    )
}

/// The underlay device and its MTU, or the broken hop.
pub(super) fn underlay_hop(
    st: &NetworkState,
    actual: &ActualState,
    facts: &HostFacts,
) -> (Hop, Option<u32>) {
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

pub(super) fn entry_hop(name: &str, e: &status::EntryStatus, fix_what: &str) -> Hop {
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

pub(super) fn reachability_hop(peer: Ipv4Addr, ping: bool) -> Hop {
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
    // The namespace and ICMP layers have errors of their own: shown as text.
    let echo = match crate::dataplane::netns::Netns::current() {
        Ok(ns) => crate::icmp::icmp_echo(&ns, peer, 56, false, Duration::from_millis(800))
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("{e:#}")),
    };
    match echo {
        Ok(crate::icmp::EchoOutcome::Reply { rtt }) => ok(
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
            format!("route to {peer} {via}; ICMP echo not sent: {e}"),
            None,
        ),
    }
}

pub(super) fn mtu_hop(st: &NetworkState, actual: &ActualState, underlay_mtu: Option<u32>) -> Hop {
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
        let ours = l.alias.as_deref().and_then(VethAlias::network_of) == Some(st.network.as_str());
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

pub(super) fn offload_hop(st: &NetworkState, offload: Option<bool>) -> Hop {
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
