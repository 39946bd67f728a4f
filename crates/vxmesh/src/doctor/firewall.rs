//! The doctor's firewall hops: the table exists, the outbound masquerade
//! rule is in place (networks with `outbound_nat`), and each peer is in the
//! VTEP filter's set (else its VXLAN packets are dropped).

use std::net::Ipv4Addr;

use super::{Hop, HopState};
use crate::dataplane::NodePlan;
use crate::firewall::ruleset::{Elem, MASQUERADE_RULE, PEERS_SET};
use crate::firewall::{FwChange, Inspection, diff};

fn hop(name: &str, broken: Option<(String, String)>, ok: String) -> Hop {
    match broken {
        Some((detail, fix)) => Hop {
            hop: name.into(),
            state: HopState::Broken,
            detail,
            fix: Some(fix),
        },
        None => Hop {
            hop: name.into(),
            state: HopState::Ok,
            detail: ok,
            fix: None,
        },
    }
}

const REPAIR: &str = "the agent's next full pass restores it (or run `vxmesh agent --once`); check the agent log for nft errors";

/// Node-wide hops: the table and the masquerade rule.
pub fn table_hops(plan: &NodePlan, i: &Inspection) -> Vec<Hop> {
    if plan.firewall.is_empty() {
        return vec![];
    }
    let rebuild = i
        .changes
        .iter()
        .any(|c| matches!(c, FwChange::Create | FwChange::Rebuild { .. }));
    let mut hops = vec![hop(
        "nftables_table",
        (!i.present || rebuild).then(|| {
            (
                if i.present {
                    "table inet vxmesh does not have the planned shape".to_string()
                } else {
                    "table inet vxmesh is missing: no VTEP filter, no outbound NAT, no published ports".to_string()
                },
                REPAIR.to_string(),
            )
        }),
        format!("table inet vxmesh present, {} rule(s)", i.rules),
    )];
    if !plan.firewall.nat_sources.is_empty() {
        let missing = rebuild
            || !i.present
            || i.changes.iter().any(|c| {
                matches!(c, FwChange::RewriteChain { reasons, .. }
                    if reasons.iter().any(|r| r.contains(&format!("\"{MASQUERADE_RULE}\""))))
            });
        hops.push(hop(
            "outbound_nat",
            missing.then(|| {
                (
                    format!("the masquerade rule \"{MASQUERADE_RULE}\" (chain nat_post) is missing or altered: containers cannot reach hosts outside the overlay"),
                    REPAIR.to_string(),
                )
            }),
            "masquerade rule in place".into(),
        ));
    }
    hops
}

/// The filter hop of the path to the peer at `underlay`.
pub fn filter_hop(plan: &NodePlan, i: &Inspection, underlay: Ipv4Addr) -> Option<Hop> {
    if !plan.firewall.vxlan_filter || plan.firewall.is_empty() {
        return None;
    }
    let missing =
        !i.present || diff::missing_elements(&i.changes, PEERS_SET).contains(&Elem::Addr(underlay));
    Some(hop(
        "vtep_filter",
        missing.then(|| {
            (
                format!("peer {underlay} is not in set {PEERS_SET}: the VTEP filter drops its VXLAN packets"),
                REPAIR.to_string(),
            )
        }),
        format!("peer {underlay} accepted by the VTEP filter"),
    ))
}
