//! Which neighbour and FDB notifications are drift. The agent's own
//! changes come back as notifications on its devices, and so do the
//! kernel's dynamic entries (ARP of the containers on a bridge, learned
//! MACs): neither is drift. With the permanent entries the plan wants (by
//! device index), an event is drift only when it contradicts the plan: a
//! planned entry deleted or changed, or a permanent entry vxmesh never
//! planned added to one of its devices.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};

use super::NodePlan;
use super::expected_links::ExpectedLinks;

/// The permanent neighbours (IP -> MAC) and FDB entries (MAC, dst) of a
/// plan, keyed by the index of their device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    neigh: HashMap<(u32, Ipv4Addr), [u8; 6]>,
    fdb: HashSet<(u32, [u8; 6], Ipv4Addr)>,
    /// The plan's devices ([`super::expected_links`]).
    pub links: ExpectedLinks,
}

/// Shared between the agent (sets it before it applies a plan) and the
/// notification watcher; `None`: every event on an owned device counts.
pub type Expectation = Arc<Mutex<Option<Expected>>>;

impl Expected {
    /// The entries of `plan` on the devices `index` knows (name -> index).
    /// Entries of a device not in `index` (not created yet) are left out:
    /// their events then count as drift, which costs a full pass, never a
    /// missed repair.
    pub fn of(plan: &NodePlan, index: &HashMap<String, u32>) -> Expected {
        let mut e = Expected {
            links: ExpectedLinks::of(plan, index),
            ..Expected::default()
        };
        for n in &plan.neighbours {
            if let Some(i) = index.get(&n.dev) {
                e.neigh.insert((*i, n.ip), n.mac.octets());
            }
        }
        for f in &plan.fdb {
            if let Some(i) = index.get(&f.dev) {
                e.fdb.insert((*i, f.mac.octets(), f.dst));
            }
        }
        e
    }

    /// Whether a `RTM_NEWNEIGH` (`added`) or `RTM_DELNEIGH` on an owned
    /// device contradicts the plan.
    pub fn drift(&self, n: &NeighbourMessage, added: bool) -> bool {
        let idx = n.header.ifindex;
        let (dst, mac) = entry(n);
        let permanent = n.header.state == NeighbourState::Permanent;
        match n.header.family {
            AddressFamily::Inet => {
                let Some(dst) = dst else { return true };
                match self.neigh.get(&(idx, dst)) {
                    // Deleted, no longer permanent, or another MAC.
                    Some(want) => !added || !permanent || mac != Some(*want),
                    // The kernel's own (dynamic) entries are not vxmesh's.
                    None => added && permanent,
                }
            }
            AddressFamily::Bridge => {
                let Some(mac) = mac else { return true };
                let planned = dst.is_some_and(|d| self.fdb.contains(&(idx, mac, d)));
                if planned {
                    !added || !permanent
                } else {
                    // vxmesh writes `self permanent` entries only: learned
                    // ones and the bridge's own (master) entries are not drift.
                    added && permanent && n.header.flags.contains(NeighbourFlags::Own)
                }
            }
            // vxmesh writes IPv4 neighbours and FDB entries only: the
            // kernel's IPv6 neighbours (NDP of the containers) are not its.
            AddressFamily::Inet6 => false,
            _ => true,
        }
    }
}

/// The IPv4 destination and the link-layer address of a neighbour message.
fn entry(n: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<[u8; 6]>) {
    let mut dst = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(v)) if v.len() == 4 => {
                dst = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3]))
            }
            NeighbourAttribute::LinkLayerAddress(v) => mac = <[u8; 6]>::try_from(v.as_slice()).ok(),
            _ => {}
        }
    }
    (dst, mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FdbSpec, NeighSpec};
    use crate::model::Mac;

    const VTEP: u32 = 7;
    const BRIDGE: u32 = 6;
    const GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 17);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 2];

    fn expected() -> Expected {
        let mut plan = NodePlan::default();
        plan.neighbours.insert(NeighSpec {
            dev: "vxm-vx100".into(),
            ip: GW,
            mac: Mac(MAC),
        });
        plan.fdb.insert(FdbSpec {
            dev: "vxm-vx100".into(),
            mac: Mac(MAC),
            dst: PEER,
        });
        let index = HashMap::from([("vxm-vx100".to_string(), VTEP)]);
        Expected::of(&plan, &index)
    }

    fn neigh(idx: u32, ip: Ipv4Addr, mac: [u8; 6], state: NeighbourState) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = idx;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m
    }

    fn fdb(
        idx: u32,
        mac: [u8; 6],
        dst: Ipv4Addr,
        state: NeighbourState,
        flags: NeighbourFlags,
    ) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = idx;
        m.header.state = state;
        m.header.flags = flags;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        m
    }

    #[test]
    fn the_agents_own_additions_are_not_drift() {
        let e = expected();
        let p = NeighbourState::Permanent;
        assert!(!e.drift(&neigh(VTEP, GW, MAC, p), true));
        assert!(!e.drift(&fdb(VTEP, MAC, PEER, p, NeighbourFlags::Own), true));
        // Its own deletions of entries no longer planned neither.
        let gone = Ipv4Addr::new(10, 1, 0, 33);
        assert!(!e.drift(&neigh(VTEP, gone, MAC, p), false));
        assert!(!e.drift(&fdb(VTEP, MAC, gone, p, NeighbourFlags::Own), false));
    }

    #[test]
    fn dynamic_entries_of_the_kernel_are_not_drift() {
        let e = expected();
        let container = Ipv4Addr::new(10, 1, 0, 18);
        for s in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Incomplete,
        ] {
            assert!(!e.drift(&neigh(BRIDGE, container, MAC, s), true), "{s:?}");
            assert!(!e.drift(&neigh(BRIDGE, container, MAC, s), false), "{s:?}");
        }
        // A MAC learned by the bridge, and the bridge's own entry of a port.
        let learned = fdb(
            BRIDGE,
            [2; 6],
            Ipv4Addr::UNSPECIFIED,
            NeighbourState::Reachable,
            NeighbourFlags::empty(),
        );
        assert!(!e.drift(&learned, true));
        let local = fdb(
            BRIDGE,
            [2; 6],
            Ipv4Addr::UNSPECIFIED,
            NeighbourState::Permanent,
            NeighbourFlags::empty(),
        );
        assert!(!e.drift(&local, true));
        // IPv6 neighbours (NDP) come and go, on the bridge too.
        let mut ndp = NeighbourMessage::default();
        ndp.header.family = AddressFamily::Inet6;
        ndp.header.ifindex = BRIDGE;
        ndp.header.state = NeighbourState::Stale;
        assert!(!e.drift(&ndp, true));
        assert!(!e.drift(&ndp, false));
    }

    #[test]
    fn planned_entries_deleted_or_changed_are_drift() {
        let e = expected();
        let p = NeighbourState::Permanent;
        // Deleted (the kernel reports a failed state first, then the delete).
        assert!(e.drift(&neigh(VTEP, GW, MAC, NeighbourState::Failed), true));
        assert!(e.drift(&neigh(VTEP, GW, MAC, p), false));
        assert!(e.drift(&fdb(VTEP, MAC, PEER, p, NeighbourFlags::Own), false));
        // Replaced with another MAC.
        assert!(e.drift(&neigh(VTEP, GW, [9; 6], p), true));
        // An FDB entry pointed elsewhere (`bridge fdb replace ... self permanent`).
        let wrong = Ipv4Addr::new(198, 18, 0, 77);
        assert!(e.drift(&fdb(VTEP, MAC, wrong, p, NeighbourFlags::Own), true));
        // A permanent ARP entry vxmesh never planned, on its device.
        assert!(e.drift(&neigh(VTEP, Ipv4Addr::new(10, 1, 0, 99), MAC, p), true));
    }
}
