//! Routed-mode acceptance tests on real labs (root; namespaces only).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::{Mode, NodeFile};
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::probe;

fn ns(name: &str) -> Netns {
    Netns::open(name).unwrap()
}

async fn zero_change_pass(lab: &vxmesh_lab::lab::Lab, node: &str) -> (usize, usize) {
    let n = lab.node(node).unwrap();
    let nl = Netlink::connect_in(&ns(&n.netns)).await.unwrap();
    let cluster = vxmesh::config::load(&lab.info.cluster_file).unwrap();
    let snap = vxmesh::store::Snapshot {
        cluster,
        endpoints: None,
    };
    let plan = vxmesh::agent::plan_node(&nl, &snap, node).await.unwrap();
    let r = vxmesh::dataplane::reconcile(&nl, &plan).await.unwrap();
    (r.changes, r.messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_three_nodes_all_pairs_and_clean_teardown() {
    let s = spec("rd", 3, 2, Mode::Routed, 1);
    let name = s.name.clone();
    {
        let lab = up(&s).await;
        assert_eq!(lab.info.containers.len(), 6);
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert_eq!(report.results.len(), 30, "every ordered pair probed");
        assert!(report.failures().is_empty(), "{}", report.matrix());
        // Exactly three entries per remote node on every host.
        for n in &lab.info.nodes {
            assert_eq!(vtep_entries(&n.netns), (2, 2, 2), "entries on {}", n.name);
        }
        // The lab pins each host's underlay neighbours (the hosts share one
        // kernel's limit on learned ones): permanent, with the fixed MACs.
        for n in &lab.info.nodes {
            let neigh = ip(
                &n.netns,
                &["neigh", "show", "dev", "eth0", "nud", "permanent"],
            );
            for o in lab.info.nodes.iter().filter(|o| o.name != n.name) {
                let [a, b, c, d] = o.underlay_ip.octets();
                let want = format!(
                    "{} lladdr 02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x} PERMANENT",
                    o.underlay_ip
                );
                assert!(neigh.contains(&want), "{} lacks '{want}':\n{neigh}", n.name);
            }
            assert_eq!(neigh.lines().count(), 2, "{}:\n{neigh}", n.name);
            // The underlay is IPv4 only: no IPv6 address (nor its
            // multicast chatter, flooded to every host) on the link.
            let v6 = ip(&n.netns, &["-6", "addr", "show", "dev", "eth0"]);
            assert!(v6.trim().is_empty(), "{} eth0 has IPv6:\n{v6}", n.name);
        }
        // The underlay namespace is a plain switch: no IPv6 on its links,
        // no netfilter hooks for the frames its bridge forwards.
        let ul = &lab.info.underlay_ns;
        assert!(ip(ul, &["-6", "addr"]).trim().is_empty(), "IPv6 in {ul}");
        let hooks = ns(ul)
            .run(|| vxmesh::dataplane::sysctl::read("/proc/sys/net/bridge/bridge-nf-call-iptables"))
            .unwrap();
        assert_eq!(hooks, "0", "bridge-nf-call-iptables in {ul}");
        // Subnets follow the reference lab.
        assert_eq!(
            lab.info.nodes[0].subnets["demo"].to_string(),
            "172.18.10.0/24"
        );
        assert_eq!(
            lab.info.nodes[1].subnets["demo"].to_string(),
            "172.18.20.0/24"
        );
        // The planner/reconciler is idempotent: another pass changes nothing.
        assert_eq!(zero_change_pass(&lab, "host1").await, (0, 0));
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cli_passes_and_leaves_nothing() {
    // VXMESH_LAB_NODES / VXMESH_LAB_CONTAINERS scale it (see lab_size).
    let (nodes, containers) = lab_size(3, 2);
    let name = unique("cli");
    let (code, out, err) = vxmesh(&[
        "lab",
        "demo",
        "--name",
        &name,
        "--nodes",
        &nodes.to_string(),
        "--containers",
        &containers.to_string(),
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("PASS"), "{out}");
    let n = nodes * containers;
    assert!(
        out.contains(&format!("({} probes in", n * (n - 1))),
        "every ordered pair probed: {out}"
    );
    println!("{out}");
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_within_two_seconds() {
    let s = spec("rdr", 2, 1, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().netns.clone();
    let c1 = lab.container_on("host1").unwrap().clone();
    let c2 = lab.container_on("host2").unwrap().clone();
    let reach = |c1: &vxmesh_lab::lab::LabContainer, dst: Ipv4Addr| {
        matches!(
            probe::icmp_echo(&ns(&c1.netns), dst, 56, false, Duration::from_millis(300)),
            Ok(probe::EchoOutcome::Reply { .. })
        )
    };
    assert!(reach(&c1, c2.ip));
    let steps: Vec<Vec<&str>> = vec![
        vec!["route", "del", "172.18.20.0/24"],
        vec!["neigh", "del", "172.18.20.0", "dev", "vxm-vx100"],
        vec!["link", "del", "vxm-br0"],
        vec!["addr", "flush", "dev", "vxm-br0"],
    ];
    for step in steps {
        // Injecting drift by hand is what an operator would do; only tests run `ip`.
        let st = std::process::Command::new("ip")
            .arg("-n")
            .arg(&h1)
            .args(&step)
            .status()
            .unwrap();
        assert!(st.success(), "inject {step:?}");
        let took = wait_until(Duration::from_secs(2), || {
            vtep_entries(&h1) == (1, 1, 1) && reach(&c1, c2.ip)
        })
        .await;
        assert!(
            took.is_some(),
            "not repaired within 2 s after `ip {}`: entries {:?}",
            step.join(" "),
            vtep_entries(&h1)
        );
        eprintln!("repaired `ip {}` in {:?}", step.join(" "), took.unwrap());
    }
    // FDB entry removal. (A deleted VTEP, its MTU and a rewritten FDB entry:
    // tests/faults.rs.)
    let fdb = bridge(&h1, &["fdb", "show", "dev", "vxm-vx100"]);
    let mac = fdb
        .lines()
        .find(|l| l.contains(" dst "))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let st = std::process::Command::new("bridge")
        .args([
            "-n",
            &h1,
            "fdb",
            "del",
            &mac,
            "dev",
            "vxm-vx100",
            "dst",
            "198.18.0.2",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let took = wait_until(Duration::from_secs(2), || {
        vtep_entries(&h1) == (1, 1, 1) && reach(&c1, c2.ip)
    })
    .await;
    assert!(took.is_some(), "fdb entry not restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_loses_no_replies() {
    let s = spec("rr", 2, 1, Mode::Routed, 1);
    let mut lab = up(&s).await;
    let c1 = lab.container_on("host1").unwrap().clone();
    let c2 = lab.container_on("host2").unwrap().clone();
    let stream = probe::continuous(&ns(&c1.netns), c2.ip, Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for node in ["host1", "host2"] {
        lab.stop_agent(node, Signal::SIGTERM).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        lab.start_agent(node).unwrap();
        lab.wait_agent_ready(node, Duration::from_secs(10))
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let stats = stream.stop();
    assert!(stats.sent > 50, "{stats:?}");
    assert_eq!(
        stats.lost, 0,
        "replies lost across agent restarts: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_join_and_leave_via_cluster_file() {
    let s = spec("rj", 3, 1, Mode::Routed, 1);
    let lab = up(&s).await;
    let orig = lab.read_cluster().unwrap();
    let mut file = orig.clone();
    file.nodes.push(NodeFile {
        name: "host9".into(),
        underlay_ip: "198.18.0.99".into(),
        underlay_dev: None,
        subnet: Some("172.18.90.0/24".into()),
        subnets: Default::default(),
        public_key: None,
        next_public_key: None,
    });
    let before: Vec<_> = lab
        .info
        .nodes
        .iter()
        .map(|n| vtep_entries(&n.netns))
        .collect();
    lab.write_cluster(&file).unwrap();
    for n in &lab.info.nodes {
        let ok = wait_until(Duration::from_secs(3), || {
            vtep_entries(&n.netns) == (3, 3, 3)
        })
        .await;
        assert!(
            ok.is_some(),
            "{} did not gain host9's three entries: {:?}",
            n.name,
            vtep_entries(&n.netns)
        );
        let r = ip(&n.netns, &["route", "show", "proto", "86"]);
        let line = r
            .lines()
            .find(|l| l.starts_with("172.18.90.0/24 via 172.18.90.0 dev vxm-vx100"))
            .unwrap_or_else(|| panic!("no route to host9 on {}: {r}", n.name));
        assert!(line.contains("onlink"), "{line}");
        assert!(bridge(&n.netns, &["fdb", "show", "dev", "vxm-vx100"]).contains("dst 198.18.0.99"));
        // A join changes peer entries only: applied from the plans, no dump:
        // its neighbour, FDB entry and route, and its address in the VTEP
        // filter's set. (The line is written once the pass ends, after the
        // kernel has it.)
        let incremental = || {
            std::fs::read_to_string(&n.agent_log).is_ok_and(|log| {
                log.lines()
                    .any(|l| l.contains("reconciled changes=4 incremental=true"))
            })
        };
        assert!(
            wait_until(Duration::from_secs(2), incremental)
                .await
                .is_some(),
            "{}: the join was not applied incrementally:\n{}",
            n.name,
            std::fs::read_to_string(&n.agent_log).unwrap_or_default()
        );
    }
    lab.write_cluster(&orig).unwrap();
    for (n, b) in lab.info.nodes.iter().zip(before) {
        let ok = wait_until(Duration::from_secs(3), || vtep_entries(&n.netns) == b).await;
        assert!(ok.is_some(), "{} did not drop host9's entries", n.name);
        assert!(!ip(&n.netns, &["route", "show", "proto", "86"]).contains("172.18.90.0"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_cluster_files_are_refused_and_change_nothing() {
    let s = spec("ri", 2, 1, Mode::Routed, 1);
    let lab = up(&s).await;
    let h1 = lab.node("host1").unwrap().netns.clone();
    let good = std::fs::read_to_string(&lab.info.cluster_file).unwrap();
    // `ip -d link` minus the bridge's ticking timers.
    let links = |ns: &str| {
        ip(ns, &["-d", "link"])
            .split_whitespace()
            .filter(|w| !w.contains('.'))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // What vxmesh could touch; learned (ageing) neighbours and FDB entries are not compared.
    let snapshot = |ns: &str| {
        (
            links(ns),
            ip(ns, &["route"]),
            ip(ns, &["neigh", "show", "nud", "permanent"]),
            bridge(ns, &["fdb", "show", "dev", "vxm-vx100"]),
            ip(ns, &["-4", "addr"]),
        )
    };
    // A second state dir so the running agent's lock is not in the way; --once.
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("172.18.0.0/16", "172.18.0.0/33"),
            "network[0].cidr",
        ),
        (
            good.replace("172.18.20.0/24", "172.19.20.0/24"),
            "is outside network 'demo' cidr",
        ),
        (
            good.replace("172.18.20.0/24", "172.18.10.0/24"),
            "overlaps the one of node[0]",
        ),
        (
            good.replace("name = \"host2\"", "name = \"host1\""),
            "node 'host1' is already declared",
        ),
        (
            good.replace("198.18.0.2", "198.18.0.1"),
            "is already the underlay IP",
        ),
        (
            good.replace("vni = 100", "vni = 16777216"),
            "VNI 16777216 is out of range",
        ),
        (
            good.replace("port = 4789", "port = 0"),
            "UDP port 0 is out of range",
        ),
        (
            good.replace("vni = 100", "vni = 100\nmtu = 100"),
            "MTU 100 is out of range",
        ),
        (
            good.replace("vni = 100", "vni = 100\nbogus = 1"),
            "unknown field `bogus`",
        ),
    ];
    for (text, want) in cases {
        assert_ne!(text, good, "case '{want}' must change the file");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, &text).unwrap();
        let before = snapshot(&h1);
        let (code, _out, err) = vxmesh(&[
            "--netns",
            &h1,
            "agent",
            "--once",
            "--cluster",
            bad.to_str().unwrap(),
            "--node",
            "host1",
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "case '{want}' accepted");
        assert!(err.contains(want), "case '{want}': stderr was {err}");
        assert_eq!(snapshot(&h1), before, "case '{want}' changed the host");
    }
    // Unknown node, too.
    let (code, _, err) = vxmesh(&[
        "validate",
        "--cluster",
        lab.info.cluster_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vxmesh(&[
        "--netns",
        &h1,
        "agent",
        "--once",
        "--cluster",
        lab.info.cluster_file.to_str().unwrap(),
        "--node",
        "nosuch",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("node 'nosuch' is not in"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_transfer_and_mtu() {
    let s = spec("rm", 2, 1, Mode::Routed, 1);
    let lab = up(&s).await;
    let c1 = lab.container_on("host1").unwrap().clone();
    let c2 = lab.container_on("host2").unwrap().clone();
    let r = probe::tcp_transfer(
        &ns(&c2.netns),
        c2.ip,
        &ns(&c1.netns),
        256 << 20,
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(r.sent_sha256, r.received_sha256);
    eprintln!("256 MiB across hosts: {r:?}");
    // Overlay MTU = 1500 - 50. A full-size DF packet passes, one byte more does not.
    let full = probe::icmp_payload_for_ip_len(1450);
    let out = probe::icmp_echo(&ns(&c1.netns), c2.ip, full, true, Duration::from_secs(1)).unwrap();
    assert!(
        matches!(out, probe::EchoOutcome::Reply { .. }),
        "full-MTU packet: {out:?}"
    );
    let out = probe::icmp_echo(
        &ns(&c1.netns),
        c2.ip,
        full + 1,
        true,
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(
        matches!(out, probe::EchoOutcome::Refused { .. }),
        "MTU+1 with DF must be refused: {out:?}"
    );
    // Without DF the kernel fragments it and it arrives.
    let out = probe::icmp_echo(
        &ns(&c1.netns),
        c2.ip,
        full + 1,
        false,
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(
        matches!(out, probe::EchoOutcome::Reply { .. }),
        "fragmented packet: {out:?}"
    );
}
