//! `lab up --encrypt` (issue 16): real agents run the secure underlay; every
//! container pair reaches and the lab's underlay carries WireGuard only for
//! the encrypted network (a plain network beside it stays plain VXLAN).

mod common;
mod secure_common;

use std::time::Duration;

use common::*;
use secure_common::Capture;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::lab::{LabGuard, LabSpec};

/// Bring `s` up with its first network encrypted, check every pair while
/// capturing on the lab's underlay, and return the lab (kept up until the
/// caller drops it) with what the capture saw.
async fn encrypted_lab_checked(mut s: LabSpec) -> (LabGuard, secure_common::Seen) {
    s.encrypt = true;
    let lab = up(&s).await;
    let underlay = Netns::open(&lab.info.underlay_ns).unwrap();
    let cap = Capture::start(&underlay, None);
    let report = lab.check(Duration::from_secs(2)).unwrap();
    let seen = cap.stop();
    assert!(report.failures().is_empty(), "{:#?}", report.failures());
    (lab, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_routed_lab_reaches_every_pair_over_wireguard_only() {
    let (_lab, seen) = encrypted_lab_checked(spec("se", 2, 1, Mode::Routed, 1)).await;
    assert!(seen.wireguard >= 4, "{seen:?}");
    assert_eq!(
        (seen.vxlan, seen.icmp),
        (0, 0),
        "clear text on the underlay: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_bridged_lab_encrypts_one_network_and_leaves_the_other_plain() {
    let (_lab, seen) = encrypted_lab_checked(spec("sm", 2, 2, Mode::Bridged, 2)).await;
    assert!(seen.wireguard >= 4, "net1 is encrypted: {seen:?}");
    assert!(seen.vxlan >= 2, "net2 stays plain VXLAN: {seen:?}");
    assert_eq!(seen.icmp, 0, "{seen:?}");
}
