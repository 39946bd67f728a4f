//! `lab up --encrypt` (issue 16): real agents run the secure underlay; every
//! container pair reaches and the lab's underlay carries WireGuard only for
//! the encrypted network (a plain network beside it stays plain VXLAN).

mod common;
mod secure_common;

use std::time::Duration;

use vxmesh_lab::probe;

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

/// Packets of `dev` in the named namespace in `direction` ("tx": handed by
/// the kernel to the data path; "rx": written by the data path). Bursts
/// count once: the device moves them whole with segmentation offload.
fn dev_packets(netns: &str, dev: &str, direction: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"][direction]["packets"].as_u64().unwrap()
}

/// A bulk TCP transfer over an encrypted network arrives intact in both
/// modes; the sender's TUN device took it in bursts that the data path
/// cut itself (segmentation offload), and the receiver's data path wrote
/// the decrypted datagrams back in bursts (receive offload): far fewer
/// packets on either device than on the wire.
async fn bulk_transfer_is_intact_and_handed_over_in_bursts(s: LabSpec) {
    let (lab, _) = encrypted_lab_checked(s).await;
    let c1 = lab.container_on("host1").unwrap().clone();
    let c2 = lab.container_on("host2").unwrap().clone();
    let host1 = lab.info.nodes[0].netns.clone();
    let host2 = lab.info.nodes[1].netns.clone();
    let before = dev_packets(&host1, "vxm-wg0", "tx");
    let written_before = dev_packets(&host2, "vxm-wg0", "rx");
    let bytes: u64 = 64 << 20;
    let r = probe::tcp_transfer(
        &Netns::open(&c2.netns).unwrap(),
        c2.ip,
        &Netns::open(&c1.netns).unwrap(),
        bytes,
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(r.sent_sha256, r.received_sha256);
    let handed = dev_packets(&host1, "vxm-wg0", "tx") - before;
    let written = dev_packets(&host2, "vxm-wg0", "rx") - written_before;
    // The wire carries at least bytes / 1400 packets (47 935 here).
    let wire = bytes / 1400;
    assert!(
        handed < wire / 3,
        "{handed} packets handed to vxm-wg0 for {wire}+ on the wire: no bursts"
    );
    assert!(
        written < wire / 3,
        "{written} packets written to vxm-wg0 on the receiver for {wire}+ on the wire: no bursts"
    );
    eprintln!(
        "64 MiB encrypted: {r:?}; {handed} TUN reads, {written} TUN writes for >= {wire} packets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_crosses_a_routed_encrypted_network_in_bursts() {
    bulk_transfer_is_intact_and_handed_over_in_bursts(spec("sb", 2, 1, Mode::Routed, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_crosses_a_bridged_encrypted_network_in_bursts() {
    bulk_transfer_is_intact_and_handed_over_in_bursts(spec("sd", 2, 1, Mode::Bridged, 1)).await;
}
