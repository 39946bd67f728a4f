//! Published ports through CNI chaining: podman with the conflist
//! `[vxmesh, portmap, tuning, firewall]` (Debian's containernetworking-plugins,
//! portmap with the `portMappings` capability) serves `podman run -p
//! 8080:80` on one lab host to a client on another host, next to vxmesh's
//! own nftables table, and removing the container (DEL through the chain)
//! removes portmap's DNAT rules. Root; namespaces only.
//!
//! Needs podman, runc, busybox-static, nsenter, unshare, iptables and the
//! reference plugins (scripts/deps.sh). Missing tools fail, never skip.

mod common;
mod common_podman;

use std::net::SocketAddrV4;
use std::process::Command;
use std::time::Duration;

use common::*;
use common_podman::*;
use serde_json::json;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::probe::tcp_hello;

/// The conflist of the README, after vxmesh.
fn chain() -> Vec<serde_json::Value> {
    vec![
        json!({ "type": "portmap", "capabilities": { "portMappings": true } }),
        json!({ "type": "tuning" }),
        json!({ "type": "firewall" }),
    ]
}

/// The namespace's whole nftables ruleset (portmap's iptables-nft tables and
/// vxmesh's own table).
fn ruleset(ns: &str) -> String {
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["nft", "list", "ruleset"])
        .output()
        .expect("run nft");
    assert!(o.status.success(), "nft list ruleset in {ns}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn dnat_to_port_8080(rules: &str) -> bool {
    rules
        .lines()
        .any(|l| l.contains("dport 8080") && l.contains("dnat"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_publishes_a_port_through_the_chained_portmap_plugin() {
    let missing: Vec<&str> = [
        "podman", "runc", "conmon", "nsenter", "unshare", "timeout", "iptables",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}: run scripts/deps.sh"
    );
    for p in ["portmap", "tuning", "firewall"] {
        assert!(
            std::path::Path::new(REFERENCE_PLUGINS).join(p).exists(),
            "{REFERENCE_PLUGINS}/{p} is missing: run scripts/deps.sh (containernetworking-plugins)"
        );
    }
    let s = spec("pmp", 2, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let tag = lab.info.name.clone();
    let (h1, h2) = (
        lab.node("host1").unwrap().clone(),
        lab.node("host2").unwrap().clone(),
    );
    let _cni_cache = CniCacheGuard::new();
    let work = tempfile::Builder::new()
        .prefix("vxm-podman-img-")
        .tempdir()
        .unwrap();
    let tarball = build_image(work.path());
    let image = format!("localhost/vxm-busybox:{}", tag.to_lowercase());
    let mut p1 = Podman::with_chain(&h1, &tag, &chain());
    p1.import(&tarball, &image);

    let serve = "while true; do echo vxmesh-hello podman | nc -l -p 80; done";
    let c = p1.start_with(
        &format!("{tag}-web"),
        &image,
        &["-p", "8080:80"],
        &["sh", "-c", serve],
    );
    assert!(c.ip.starts_with("172.18.10."), "container got '{}'", c.ip);
    let rules = ruleset(&h1.netns);
    assert!(
        dnat_to_port_8080(&rules),
        "no DNAT of port 8080 on host1:\n{rules}"
    );
    assert!(
        rules.contains("table inet vxmesh"),
        "vxmesh's own table is missing next to portmap's:\n{rules}"
    );

    // A client on host2 reaches the container through host1's address.
    let h2ns = Netns::open(&h2.netns).unwrap();
    let dst = SocketAddrV4::new(h1.underlay_ip, 8080);
    let mut answer = Err(anyhow::anyhow!("not tried"));
    for _ in 0..20 {
        answer = tcp_hello(&h2ns, dst, Duration::from_secs(2));
        if answer.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(answer.unwrap(), "podman", "host2 -> {dst}");

    // DEL runs through the chain: portmap's DNAT rules go with the container.
    p1.ok(&["rm", "--force", "--time", "0", &c.id]);
    let rules = ruleset(&h1.netns);
    assert!(
        !dnat_to_port_8080(&rules),
        "DNAT of 8080 left after rm:\n{rules}"
    );
    assert!(tcp_hello(&h2ns, dst, Duration::from_millis(500)).is_err());
    drop(p1);
}
