//! Bridged-mode (L2, proxy ARP, VNI isolation) acceptance tests on real labs.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::probe;

fn ns(name: &str) -> Netns {
    Netns::open(name).unwrap()
}

/// (permanent neighbours, fdb entries with a dst) on a host's VTEP.
fn entries(host_ns: &str, vtep: &str) -> (usize, usize) {
    let neigh = ip(host_ns, &["neigh", "show", "dev", vtep, "nud", "permanent"])
        .lines()
        .count();
    let fdb = bridge(host_ns, &["fdb", "show", "dev", vtep])
        .lines()
        .filter(|l| l.contains(" dst "))
        .count();
    (neigh, fdb)
}

fn rx_packets(host_ns: &str, dev: &str) -> u64 {
    let out = ip(host_ns, &["-s", "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_overlapping_networks_reach_within_and_never_across() {
    let s = spec("bd", 3, 2, Mode::Bridged, 2);
    let name = s.name.clone();
    {
        let lab = up(&s).await;
        assert_eq!(lab.info.containers.len(), 12);
        // Same subnet; some addresses exist in both networks, some in one only.
        let ips = |net: &str| {
            let mut v: Vec<_> = lab
                .info
                .containers
                .iter()
                .filter(|c| c.network == net)
                .map(|c| c.ip)
                .collect();
            v.sort();
            v
        };
        let (a, b) = (ips("net1"), ips("net2"));
        assert!(
            a.iter().any(|ip| b.contains(ip)),
            "a shared address: {a:?} {b:?}"
        );
        assert!(
            b.iter().any(|ip| !a.contains(ip)),
            "an address only net2 has: {a:?} {b:?}"
        );
        let report = lab.check(Duration::from_secs(1)).unwrap();
        assert!(report.failures().is_empty(), "{}", report.matrix());
        let within = report.results.iter().filter(|r| r.expect_reach).count();
        let across = report.results.iter().filter(|r| !r.expect_reach).count();
        assert_eq!(within, 2 * 6 * 5, "all same-network ordered pairs");
        assert!(across > 0, "isolation was probed");
        // Bridged devices: no IP on the bridge, VTEP enslaved with proxy + nolearning.
        let h1 = &lab.info.nodes[0].netns;
        let link = ip(h1, &["-d", "link", "show", "vxm-vx200"]);
        assert!(link.contains("master vxm-br200"), "{link}");
        assert!(
            link.contains("proxy") && link.contains("nolearning"),
            "{link}"
        );
        assert!(
            link.contains("learning off")
                || link.contains("learning 0")
                || !link.contains(" learning on"),
            "{link}"
        );
        assert!(!ip(h1, &["-4", "addr", "show", "dev", "vxm-br200"]).contains("inet "));
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cli_bridged() {
    let name = unique("bcli");
    let (code, out, err) = vxmesh(&[
        "lab",
        "demo",
        "--name",
        &name,
        "--mode",
        "bridged",
        "--nodes",
        "3",
        "--containers",
        "2",
        "--networks",
        "2",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("PASS") && out.contains("iso"), "{out}");
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arp_is_answered_locally_by_proxy() {
    let s = spec("bp", 2, 1, Mode::Bridged, 1);
    let lab = up(&s).await;
    let c1 = lab.container_on("host1").unwrap().clone();
    let c2 = lab.container_on("host2").unwrap().clone();
    let h2 = lab.node("host2").unwrap().netns.clone();
    // Forget c2's MAC in c1, so the next packet must ARP first.
    assert!(
        std::process::Command::new("ip")
            .args(["-n", &c1.netns, "neigh", "flush", "all"])
            .status()
            .unwrap()
            .success()
    );
    let before = rx_packets(&h2, "vxm-vx200");
    let out = probe::icmp_echo(&ns(&c1.netns), c2.ip, 56, false, Duration::from_secs(1)).unwrap();
    assert!(matches!(out, probe::EchoOutcome::Reply { .. }), "{out:?}");
    let after = rx_packets(&h2, "vxm-vx200");
    // Exactly the echo request crossed the underlay: the ARP request was answered on host1.
    assert_eq!(after - before, 1, "packets received by host2's VTEP");
    let neigh = ip(&c1.netns, &["neigh", "show", &c2.ip.to_string()]);
    assert!(
        neigh.contains(&vxmesh::model::container_mac(c2.ip).to_string()),
        "{neigh}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_drift_kill_and_restart() {
    let s = spec("bk", 2, 1, Mode::Bridged, 1);
    let mut lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().netns.clone();
    let c1 = lab.container_on("host1").unwrap().clone();
    let c2 = lab.container_on("host2").unwrap().clone();
    let want = entries(&h1, "vxm-vx200");
    assert_eq!(want.0, 16, "every address of host2's /28 slice");
    let reach = || {
        matches!(
            probe::icmp_echo(&ns(&c1.netns), c2.ip, 56, false, Duration::from_millis(300)),
            Ok(probe::EchoOutcome::Reply { .. })
        )
    };
    // Drift: neighbour, the VTEP, the bridge.
    for step in [
        vec![
            "neigh".to_string(),
            "del".into(),
            c2.ip.to_string(),
            "dev".into(),
            "vxm-vx200".into(),
        ],
        vec![
            "link".into(),
            "set".into(),
            "vxm-vx200".into(),
            "nomaster".into(),
        ],
        vec!["link".into(), "del".into(), "vxm-vx200".into()],
        vec!["link".into(), "del".into(), "vxm-br200".into()],
    ] {
        assert!(
            std::process::Command::new("ip")
                .arg("-n")
                .arg(&h1)
                .args(&step)
                .status()
                .unwrap()
                .success()
        );
        let took = wait_until(Duration::from_secs(2), || {
            entries(&h1, "vxm-vx200") == want && reach()
        })
        .await;
        assert!(took.is_some(), "not repaired after ip {step:?}");
    }
    // Restart without loss.
    let stream = probe::continuous(&ns(&c1.netns), c2.ip, Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    lab.stop_agent("host1", Signal::SIGTERM).unwrap();
    lab.start_agent("host1").unwrap();
    lab.wait_agent_ready("host1", Duration::from_secs(10))
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stats = stream.stop();
    assert_eq!(stats.lost, 0, "{stats:?}");
    // kill -9 and restart: same entries, no duplicates.
    lab.stop_agent("host1", Signal::SIGKILL).unwrap();
    lab.start_agent("host1").unwrap();
    lab.wait_agent_ready("host1", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || entries(&h1, "vxm-vx200") == want)
            .await
            .is_some()
    );
    assert!(reach());
}
