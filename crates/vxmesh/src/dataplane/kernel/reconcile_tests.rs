//! The split of a full pass into the node's own changes and peer entries.

use std::net::Ipv4Addr;

use super::*;
use crate::dataplane::change::Phase;
use crate::dataplane::kernel::ApplyReport;

fn changes() -> Vec<Change> {
    vec![
        Change::SetIpForward { on: true },
        Change::DeleteNeighbour {
            dev: "vxm-vx100".into(),
            ip: Ipv4Addr::new(172, 18, 2, 0),
        },
        Change::SetPortLearning {
            dev: "vxm-vx100".into(),
            learning: false,
        },
        Change::DeleteNeighbour {
            dev: "vxm-vx100".into(),
            ip: Ipv4Addr::new(172, 18, 3, 0),
        },
        Change::DeleteLink {
            name: "vxm-old".into(),
            kind: "vxlan".into(),
            reason: "not planned".into(),
        },
    ]
}

#[test]
fn the_local_step_holds_every_change_but_the_peer_entries() {
    let (local, entries) = split_entries(changes());
    assert!(local.iter().all(|c| !c.phase().is_entry()));
    assert!(entries.iter().all(|c| c.phase().is_entry()));
    assert_eq!(local.len() + entries.len(), changes().len());
    // Each keeps its order.
    assert_eq!(
        entries.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec![
            "delete neigh 172.18.2.0 dev vxm-vx100",
            "delete neigh 172.18.3.0 dev vxm-vx100"
        ]
    );
    assert_eq!(local[0], Change::SetIpForward { on: true });
    // Applied one after the other, the two steps keep the phase order of
    // one apply: every local phase comes before every entry phase.
    let last_local = local.iter().map(Change::phase).max().unwrap();
    let first_entry = entries.iter().map(Change::phase).min().unwrap();
    assert!(last_local < first_entry);
    assert!(Phase::Forwarding < Phase::DeleteRoutes);
}

#[test]
fn the_reports_of_the_two_steps_add_up() {
    let a = ApplyReport {
        changes: 3,
        links: 2,
        sysctl: 1,
        dumps: 1,
        ..Default::default()
    };
    let b = ApplyReport {
        changes: 6,
        routes: 2,
        neighbours: 2,
        fdb: 2,
        dumps: 1,
        ..Default::default()
    };
    let m = a.merged(b);
    assert_eq!((m.changes, m.messages(), m.sysctl, m.dumps), (9, 8, 1, 2));
}
