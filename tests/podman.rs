//! A real container runtime: podman (CNI network backend, runc) attaches its
//! containers through vxmesh as a CNI plugin, on two lab hosts, and the
//! containers reach each other across hosts over the overlay. The podman
//! fixture (one private installation per lab host) is tests/common_podman.
//!
//! Needs podman, runc, busybox-static, nsenter and unshare (scripts/deps.sh).
//! Missing tools make the test fail, never skip.

mod common;
mod common_podman;

use std::time::{Duration, Instant};

use common::*;
use common_podman::*;
use vxmesh::config::Mode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_containers_reach_each_other_across_hosts() {
    let t0 = Instant::now();
    let missing: Vec<&str> = [
        "podman", "runc", "conmon", "nsenter", "unshare", "timeout", "tar",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}: run scripts/deps.sh (packages podman, runc, busybox-static)"
    );

    let s = spec("pm", 2, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let tag = lab.info.name.clone();
    let (h1, h2) = (
        lab.node("host1").unwrap().clone(),
        lab.node("host2").unwrap().clone(),
    );
    // Dropped after the podman fixtures (declared later), before the lab.
    let _cni_cache = CniCacheGuard::new();

    // The image: a static busybox rootfs tarball.
    let work = tempfile::Builder::new()
        .prefix("vxm-podman-img-")
        .tempdir()
        .unwrap();
    let tarball = build_image(work.path());
    let image = format!("localhost/vxm-busybox:{}", tag.to_lowercase());

    let mut p1 = Podman::new(&h1, &tag);
    let mut p2 = Podman::new(&h2, &tag);
    p1.import(&tarball, &image);
    p2.import(&tarball, &image);
    let networks = p1.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(
        networks.lines().any(|l| l == format!("{NETWORK} vxmesh")),
        "podman does not see the vxmesh network:\n{networks}"
    );
    let t_setup = t0.elapsed();

    let c1 = p1.start(&format!("{tag}-c1"), &image);
    let c2 = p2.start(&format!("{tag}-c2"), &image);
    let t_run = t0.elapsed();

    // Addresses from each node's subnet, held by that node's vxmesh IPAM; the
    // host end of each container's veth is vxmesh's, in the lab host.
    for (c, node, net, gw) in [
        (&c1, &h1, "172.18.10.", "172.18.10.1"),
        (&c2, &h2, "172.18.20.", "172.18.20.1"),
    ] {
        assert!(
            c.ip.starts_with(net),
            "container {} on {} got '{}', want an address in {net}0/24",
            c.id,
            node.name,
            c.ip
        );
        assert_eq!(c.gateway, gw);
        assert_eq!(
            allocations(node),
            vec![c.ip.clone()],
            "IPAM of {}",
            node.name
        );
        let veth = vxmesh::attach::host_veth_name("demo", &c.id, "eth0");
        assert_eq!(
            host_veths(&node.netns),
            vec![veth.clone()],
            "host veth on {}",
            node.name
        );
        assert!(
            c.sandbox.starts_with("/run/netns/") && c.sandbox.exists(),
            "podman made the namespace: {}",
            c.sandbox.display()
        );
    }

    // Across hosts, both directions, with the container's own ping.
    for (from, p, to) in [(&c1, &p1, &c2), (&c2, &p2, &c1)] {
        let o = p.run(&[
            "exec", &from.id, "ping", "-c", "3", "-A", "-W", "2", "-w", "6", &to.ip,
        ]);
        assert!(
            o.status.success(),
            "ping {} -> {} failed:\n{}",
            from.ip,
            to.ip,
            text(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("3 packets received"),
            "ping {} -> {}:\n{}",
            from.ip,
            to.ip,
            text(&o)
        );
    }
    let t_ping = t0.elapsed();

    // Removing the containers runs the plugin's DEL: no veth left, addresses
    // released, podman's namespaces and libcni's cached results gone.
    p1.ok(&["rm", "--force", "--time", "0", &c1.id]);
    p2.ok(&["rm", "--force", "--time", "0", &c2.id]);
    for (c, node) in [(&c1, &h1), (&c2, &h2)] {
        assert!(
            host_veths(&node.netns).is_empty(),
            "host veths left on {}: {:?}",
            node.name,
            host_veths(&node.netns)
        );
        assert!(
            allocations(node).is_empty(),
            "addresses still allocated on {}: {:?}",
            node.name,
            allocations(node)
        );
        assert!(
            !c.sandbox.exists(),
            "namespace {} left behind",
            c.sandbox.display()
        );
        assert!(
            cni_cache_entries(&c.id).is_empty(),
            "libcni still caches {}: {:?}",
            c.id,
            cni_cache_entries(&c.id)
        );
    }
    assert!(p1.ok(&["ps", "-a", "-q"]).is_empty() && p2.ok(&["ps", "-a", "-q"]).is_empty());
    let total = t0.elapsed();
    eprintln!(
        "podman test: lab + images {t_setup:.1?}, 2 containers up {:.1?}, pings {:.1?}, removal {:.1?}, total {total:.1?}",
        t_run - t_setup,
        t_ping - t_run,
        total - t_ping
    );
    assert!(total < Duration::from_secs(60), "took {total:?}");
}
