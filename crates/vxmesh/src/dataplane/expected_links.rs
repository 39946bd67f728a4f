//! Which link notifications are drift. The agent's own device creations
//! (a VTEP, a bridge: several notifications each, in passing states such
//! as down or not yet on the bridge) and its deletions of devices no
//! longer planned are not; a planned device deleted, renamed or changed
//! (down, MTU, MAC, alias, bridge) is, and so is a container veth knocked
//! off its bridge. Container attach and detach wake the agent without
//! forcing a full pass.

use std::collections::HashMap;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use super::NodePlan;
use crate::model;
use crate::names::VethAlias;

/// What a kernel notification asks of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not vxmesh's business, or its own change.
    Ignore,
    /// A pass, which may apply peer changes from the last plan.
    Wake,
    /// Drift: the next pass dumps, diffs and repairs.
    Drift,
}

/// How a planned device must look once the plan is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LinkWant {
    mtu: u32,
    mac: [u8; 6],
    alias: String,
    master: Option<String>,
}

/// The devices of a plan with the indexes the agent last listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpectedLinks {
    want: HashMap<String, LinkWant>,
    /// Owned devices by name as last listed (before this plan's changes).
    index: HashMap<String, u32>,
    /// Network -> its bridge, for container veths.
    bridges: HashMap<String, String>,
}

impl ExpectedLinks {
    /// The devices of `plan`; `index`: vxmesh's devices as last listed
    /// (name -> index). A planned device missing there is being created:
    /// its notifications are the agent's own until the list is refreshed.
    pub fn of(plan: &NodePlan, index: &HashMap<String, u32>) -> ExpectedLinks {
        ExpectedLinks {
            want: plan
                .links
                .iter()
                .map(|l| {
                    let want = LinkWant {
                        mtu: l.mtu,
                        mac: l.mac.octets(),
                        alias: l.alias.clone(),
                        master: l.master.clone(),
                    };
                    (l.name.clone(), want)
                })
                .collect(),
            index: index.clone(),
            bridges: plan
                .networks
                .iter()
                .map(|(n, st)| (n.clone(), st.bridge.clone()))
                .collect(),
        }
    }

    /// The verdict on an `RTM_NEWLINK` (`deleted` false) or `RTM_DELLINK`.
    pub fn verdict(&self, l: &LinkMessage, deleted: bool) -> Verdict {
        let idx = l.header.index;
        let name = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        });
        // The planned device this index was when last listed.
        let listed_as = self
            .index
            .iter()
            .find(|(n, i)| **i == idx && self.want.contains_key(*n))
            .map(|(n, _)| n.as_str());
        if let Some(was) = listed_as
            && name.is_some_and(|n| n != was)
        {
            return Verdict::Drift; // renamed
        }
        let planned = name
            .and_then(|n| self.want.get_key_value(n))
            .or_else(|| listed_as.and_then(|n| self.want.get_key_value(n)));
        if let Some((name, want)) = planned {
            if deleted {
                return Verdict::Drift;
            }
            if self.index.get(name) != Some(&idx) {
                // Not listed yet: the agent is creating it.
                return Verdict::Ignore;
            }
            return if self.contradicts(l, want) {
                Verdict::Drift
            } else {
                Verdict::Ignore
            };
        }
        if !name.is_some_and(|n| n.starts_with(model::DEVICE_PREFIX)) && listed_as.is_none() {
            // Not a device vxmesh names (events on owned indexes are
            // filtered by the watcher before they get here).
            return if self.index.values().any(|i| *i == idx) {
                Verdict::Drift
            } else {
                Verdict::Ignore
            };
        }
        let alias = attr_alias(l);
        match alias.and_then(VethAlias::network_of) {
            // A container veth: the attach or detach in progress, or
            // someone took it off its bridge (repaired by a full pass).
            Some(network) => match self.bridges.get(network) {
                Some(bridge) if !deleted && l.header.interface_family != AddressFamily::Bridge => {
                    let on_bridge = self.index.get(bridge).is_none_or(|b| master(l) == Some(*b));
                    if l.header.flags.contains(LinkFlags::Up) && on_bridge {
                        Verdict::Wake
                    } else {
                        Verdict::Drift
                    }
                }
                _ => Verdict::Wake,
            },
            None if deleted => {
                // Its own deletion of a device no longer planned; a veth
                // whose alias the notification lacks (a detach).
                if alias.is_some_and(is_managed) {
                    Verdict::Ignore
                } else {
                    Verdict::Wake
                }
            }
            // A device marked vxmesh's that the plan does not want: the
            // full pass removes it.
            None if alias.is_some_and(is_managed) => Verdict::Drift,
            // A veth before the attach writes its alias.
            None => Verdict::Wake,
        }
    }

    /// Whether a notification on a listed planned device says it no longer
    /// matches the plan. Bridge-port notifications (`AF_BRIDGE`) carry no
    /// alias: only what they carry is compared.
    fn contradicts(&self, l: &LinkMessage, want: &LinkWant) -> bool {
        let full = l.header.interface_family != AddressFamily::Bridge;
        if full && !l.header.flags.contains(LinkFlags::Up) {
            return true;
        }
        let mut alias_seen = false;
        for a in &l.attributes {
            let wrong = match a {
                LinkAttribute::Mtu(m) => *m != want.mtu,
                LinkAttribute::Address(m) => m.as_slice() != want.mac,
                LinkAttribute::IfAlias(s) => {
                    alias_seen = true;
                    *s != want.alias
                }
                _ => false,
            };
            if wrong {
                return true;
            }
        }
        if full && !alias_seen {
            return true;
        }
        let want_master = want
            .master
            .as_ref()
            .map(|m| self.index.get(m).copied().ok_or(()));
        match want_master {
            // The bridge is being created: its index is not known yet.
            Some(Err(())) => false,
            Some(Ok(b)) => master(l) != Some(b),
            None => full && master(l).is_some(),
        }
    }
}

fn master(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn attr_alias(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.as_str()),
        _ => None,
    })
}

fn is_managed(alias: &str) -> bool {
    alias.starts_with(super::kernel::MANAGED_ALIAS_PREFIX)
}

#[cfg(test)]
#[path = "expected_links_tests.rs"]
mod tests;
