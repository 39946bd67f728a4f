//! Dynamic membership on etcd: acceptance tests on real labs whose etcd runs
//! in a namespace of its own on the lab's underlay (198.18.0.254:2379;
//! nothing in the root namespace). Root; namespaces only.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh::store::etcd;
use vxmesh_lab::lab::{Lab, LabContainer, LabSpec, LabStore};
use vxmesh_lab::probe::{self, PairJob};

const TTL: Duration = Duration::from_secs(3);

fn ns(name: &str) -> Netns {
    Netns::open(name).unwrap()
}

fn etcd_spec(tag: &str, nodes: usize, containers: usize, mode: Mode) -> LabSpec {
    let mut s = spec(tag, nodes, containers, mode, 1);
    s.store = LabStore::Etcd;
    s.ttl = TTL;
    s
}

fn reach(src: &LabContainer, dst: Ipv4Addr) -> bool {
    matches!(
        probe::icmp_echo(&ns(&src.netns), dst, 56, false, Duration::from_millis(100)),
        Ok(probe::EchoOutcome::Reply { .. })
    )
}

/// Every ordered pair between `node`'s containers and the others.
fn pairs_involving(lab: &Lab, node: &str) -> Vec<PairJob> {
    let cs = &lab.info.containers;
    let mut jobs = Vec::new();
    for a in cs {
        for b in cs {
            if a.name != b.name && a.network == b.network && (a.node == node || b.node == node) {
                jobs.push(PairJob::new(&a.netns, b.ip));
            }
        }
    }
    jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_then_a_sixth_joins_and_a_crashed_one_expires() {
    let s = etcd_spec("ej", 5, 1, Mode::Routed);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        // etcd's data (its write-ahead log, fsynced before every write is
        // applied) is on a tmpfs of the lab's own, not on the disk every
        // host's files share.
        let data = lab.info.dir.join("etcd");
        let fs = nix::sys::statfs::statfs(&data).unwrap();
        assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert_eq!(report.results.len(), 20);
        assert!(report.failures().is_empty(), "{}", report.matrix());
        for n in &lab.info.nodes {
            assert_eq!(
                entries_on(&n.netns, "vxm-vx100"),
                (4, 4, 4),
                "entries on {}",
                n.name
            );
        }
        // Subnets were claimed in etcd, one per node, all different.
        let mut subnets: Vec<_> = lab.info.nodes.iter().map(|n| n.subnets["demo"]).collect();
        subnets.sort();
        subnets.dedup();
        assert_eq!(subnets.len(), 5);

        // A sixth host joins the running lab.
        let node = lab.add_host().await.unwrap();
        // Its underlay neighbours are pinned both ways, and etcd's for it.
        let permanent = |ns: &str| ip(ns, &["neigh", "show", "dev", "eth0", "nud", "permanent"]);
        let new = lab.node(&node).unwrap().clone();
        let mine = permanent(&new.netns);
        assert_eq!(mine.lines().count(), 6, "5 hosts + etcd:\n{mine}");
        assert!(
            mine.contains("198.18.0.254 lladdr 02:00:c6:12:00:fe PERMANENT"),
            "{mine}"
        );
        for o in lab.info.nodes.iter().filter(|o| o.name != node) {
            assert!(
                mine.contains(&format!("{} lladdr", o.underlay_ip)),
                "{mine}"
            );
            let theirs = permanent(&o.netns);
            assert!(
                theirs.contains(&format!(
                    "{} lladdr 02:00:c6:12:00:06 PERMANENT",
                    new.underlay_ip
                )),
                "{}:\n{theirs}",
                o.name
            );
        }
        let t0 = Instant::now();
        lab.start_agent(&node).unwrap();
        lab.wait_agent_ready(&node, Duration::from_secs(10))
            .await
            .unwrap();
        let ready = t0.elapsed();
        lab.attach_node_containers(&node).await.unwrap();
        let attached = t0.elapsed();
        let jobs = pairs_involving(&lab, &node);
        assert_eq!(jobs.len(), 10);
        let took = loop {
            let last = probe::probe_pairs(&jobs, Duration::from_millis(100));
            if last.iter().all(|r| r.reached) {
                break t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(5) {
                panic!(
                    "pairs involving {node} not reachable: {:#?}",
                    last.iter().filter(|r| !r.reached).collect::<Vec<_>>()
                );
            }
        };
        eprintln!(
            "MEASURED join: {node}'s agent ready {ready:?}, containers attached {attached:?}, all {} pairs involving it reachable {took:?} after its agent started",
            jobs.len()
        );
        assert!(
            took <= Duration::from_secs(2),
            "{node} took {took:?} (> 2 s) to be reachable"
        );
        for n in &lab.info.nodes {
            let ok = wait_until(Duration::from_secs(2), || {
                entries_on(&n.netns, "vxm-vx100") == (5, 5, 5)
            })
            .await;
            assert!(
                ok.is_some(),
                "{}: {:?}",
                n.name,
                entries_on(&n.netns, "vxm-vx100")
            );
        }

        // host3 crashes (kill -9, nothing withdrawn): peers drop its three
        // entries the settle window after its lease expires.
        let settle = vxmesh::store::etcd::settle_window(TTL);
        let victim = lab.node("host3").unwrap().clone();
        let t1 = Instant::now();
        lab.remove_node("host3", true).await.unwrap();
        let route = format!("{} via", victim.subnets["demo"]);
        let peers = lab.info.nodes.clone();
        let took = wait_until(TTL + settle + Duration::from_secs(3), || {
            peers.iter().all(|n| {
                entries_on(&n.netns, "vxm-vx100") == (4, 4, 4)
                    && !ip(&n.netns, &["route", "show", "proto", "86"]).contains(&route)
            })
        })
        .await
        .map(|_| t1.elapsed());
        eprintln!(
            "MEASURED crash: peers dropped host3's entries {took:?} after kill -9 (lease TTL {TTL:?}, settle {settle:?})"
        );
        let took = took.expect("peers did not drop the crashed node");
        assert!(
            took <= TTL + settle + Duration::from_secs(2),
            "took {took:?}"
        );
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert!(report.failures().is_empty(), "{}", report.matrix());
    }
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_drops_a_node_that_left_meanwhile() {
    let s = etcd_spec("es", 3, 1, Mode::Routed);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let h1 = lab.node("host1").unwrap().netns.clone();
        let h3 = lab.node("host3").unwrap().netns.clone();
        let gone = format!("{} via", lab.node("host2").unwrap().subnets["demo"]);
        lab.stop_agent("host1", Signal::SIGTERM).unwrap();
        // host2 leaves gracefully: host3 drops it at once, host1 cannot (stopped).
        lab.remove_node("host2", false).await.unwrap();
        let took = wait_until(Duration::from_secs(1), || {
            entries_on(&h3, "vxm-vx100") == (1, 1, 1)
        })
        .await;
        assert!(
            took.is_some(),
            "host3 kept host2: {:?}",
            entries_on(&h3, "vxm-vx100")
        );
        eprintln!(
            "MEASURED graceful leave: host3 dropped host2 {:?} after the revoke",
            took.unwrap()
        );
        assert_eq!(
            entries_on(&h1, "vxm-vx100"),
            (2, 2, 2),
            "the stopped agent touched nothing"
        );
        let claim = lab.node("host1").unwrap().subnets.clone();
        lab.start_agent("host1").unwrap();
        lab.wait_agent_ready("host1", Duration::from_secs(10))
            .await
            .unwrap();
        // SIGTERM kept the lease: the restarted agent has its old subnet.
        assert_eq!(lab.node("host1").unwrap().subnets, claim);
        let took = wait_until(Duration::from_secs(3), || {
            entries_on(&h1, "vxm-vx100") == (1, 1, 1)
        })
        .await;
        assert!(
            took.is_some(),
            "restarted host1 kept host2's entries: {:?}; its log:\n{}",
            entries_on(&h1, "vxm-vx100"),
            std::fs::read_to_string(&lab.node("host1").unwrap().agent_log).unwrap_or_default()
        );
        assert!(!ip(&h1, &["route", "show", "proto", "86"]).contains(&gone));
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert_eq!(report.results.len(), 2);
        assert!(report.failures().is_empty(), "{}", report.matrix());
    }
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_on_etcd_programs_real_endpoints_and_containers_migrate() {
    let s = etcd_spec("eb", 3, 2, Mode::Bridged);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let report = lab.check(Duration::from_secs(1)).unwrap();
        assert_eq!(report.results.len(), 30);
        assert!(report.failures().is_empty(), "{}", report.matrix());
        let vtep = "vxm-vx200";
        // Only real endpoints: 4 remote containers, not 2 slices of 16 addresses.
        for n in &lab.info.nodes {
            assert_eq!(
                entries_on(&n.netns, vtep),
                (0, 4, 4),
                "entries on {}",
                n.name
            );
        }
        let host = |n: &str| lab.node(n).unwrap().clone();
        let (h1, h2, h3) = (host("host1"), host("host2"), host("host3"));

        // An attach on host1 reaches every peer's neighbour and FDB tables.
        let t0 = Instant::now();
        let x = lab
            .add_container("host1", "net1", "host1-x", None)
            .await
            .unwrap();
        let attach = t0.elapsed();
        let mac = vxmesh::model::container_mac(x.ip).to_string();
        let seen = |n: &vxmesh_lab::lab::LabNode, dst: Ipv4Addr| {
            ip(
                &n.netns,
                &["neigh", "show", "dev", vtep, "nud", "permanent"],
            )
            .contains(&format!("{} lladdr {mac}", x.ip))
                && bridge(&n.netns, &["fdb", "show", "dev", vtep])
                    .contains(&format!("{mac} dst {dst}"))
        };
        let took = wait_until(Duration::from_secs(2), || {
            seen(&h2, h1.underlay_ip) && seen(&h3, h1.underlay_ip)
        })
        .await;
        eprintln!(
            "MEASURED attach: attach took {attach:?}; in every peer's neighbour/FDB table {took:?} after it returned"
        );
        let took = took.expect("the new endpoint did not reach every peer");
        assert!(took <= Duration::from_secs(1), "{took:?}");
        for n in [&h2, &h3] {
            assert_eq!(
                entries_on(&n.netns, vtep),
                (0, 5, 5),
                "entries on {}",
                n.name
            );
        }

        // Migration: host1-n1c1 detached on host1, re-attached on host2 with the same IP.
        let c = lab
            .info
            .containers
            .iter()
            .find(|c| c.name == "host1-n1c1")
            .unwrap()
            .clone();
        let watcher = lab
            .info
            .containers
            .iter()
            .find(|c| c.name == "host3-n1c1")
            .unwrap()
            .clone();
        let local = lab
            .info
            .containers
            .iter()
            .find(|c| c.name == "host1-n1c2")
            .unwrap()
            .clone();
        assert!(reach(&watcher, c.ip));
        let t0 = Instant::now();
        let moved = lab.move_container(&c.name, "host2").await.unwrap();
        let moved_in = t0.elapsed();
        assert_eq!(moved.ip, c.ip, "same address on the new host");
        let took = wait_until(Duration::from_secs(3), || {
            reach(&watcher, c.ip) && reach(&local, c.ip)
        })
        .await;
        eprintln!(
            "MEASURED migration: detach+attach took {moved_in:?}; reachable again (from host3 and host1) {:?} after the move started",
            took.map(|_| t0.elapsed())
        );
        assert!(took.is_some(), "the moved container is unreachable");
        assert!(t0.elapsed() <= Duration::from_secs(1), "{:?}", t0.elapsed());
        // Now a remote endpoint for host1, local for host2; counts follow
        // (7 containers: host1 keeps 2, host2 has 3, host3 2).
        let mac = vxmesh::model::container_mac(c.ip).to_string();
        let ok = wait_until(Duration::from_secs(1), || {
            bridge(&h1.netns, &["fdb", "show", "dev", vtep])
                .contains(&format!("{mac} dst {}", h2.underlay_ip))
                && bridge(&h3.netns, &["fdb", "show", "dev", vtep])
                    .contains(&format!("{mac} dst {}", h2.underlay_ip))
                && entries_on(&h1.netns, vtep) == (0, 5, 5)
                && entries_on(&h2.netns, vtep) == (0, 4, 4)
                && entries_on(&h3.netns, vtep) == (0, 5, 5)
        })
        .await;
        assert!(
            ok.is_some(),
            "{:?} {:?} {:?}",
            entries_on(&h1.netns, vtep),
            entries_on(&h2.netns, vtep),
            entries_on(&h3.netns, vtep)
        );
        // The address cannot be taken twice: host1 asking for it is refused.
        let e = lab
            .add_container("host1", "net1", "host1-dup", Some(c.ip))
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("is attached on node host2"),
            "{e:#}"
        );

        // host2's lease vanishes behind its agent's back (as after a long
        // partition): the agent gets a new one and re-publishes its record and
        // endpoints (the moved container too, published by attach, not by the
        // agent), writes the new lease into the state file, and attach uses it.
        let lease =
            |n: &vxmesh_lab::lab::LabNode| match vxmesh::state::read_network(&n.state_dir, "net1")
                .unwrap()
                .allocator
            {
                vxmesh::store::AllocatorSpec::Etcd(sec) => sec.lease,
                vxmesh::store::AllocatorSpec::Local => panic!("net1 allocates in etcd"),
            };
        let old = lease(&h2);
        let t0 = Instant::now();
        let left = lab
            .in_underlay(|co| async move {
                Ok(etcd::leave_node(&co, etcd::DEFAULT_PREFIX, "net1", "host2").await?)
            })
            .await
            .unwrap();
        assert!(left);
        let ok = wait_until(Duration::from_secs(5), || {
            lease(&h2) != old && entries_on(&h3.netns, vtep) == (0, 5, 5) && reach(&watcher, c.ip)
        })
        .await;
        assert!(
            ok.is_some(),
            "host2 did not come back: {:?}",
            entries_on(&h3.netns, vtep)
        );
        eprintln!(
            "MEASURED re-grant: host2 re-published under a new lease {:?} after its lease was revoked",
            t0.elapsed()
        );
        let y = lab
            .add_container("host2", "net1", "host2-y", None)
            .await
            .unwrap();
        let ok = wait_until(Duration::from_secs(1), || reach(&watcher, y.ip)).await;
        assert!(ok.is_some(), "attach with the new lease");
        let report = lab.check(Duration::from_secs(1)).unwrap();
        assert!(report.failures().is_empty(), "{}", report.matrix());
    }
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_net_create_leave_and_agent_leave() {
    // Exactly one store.
    let (code, _, err) = vxmesh(&[
        "agent",
        "--node",
        "h",
        "--cluster",
        "/nonexistent",
        "--store",
        "etcd://192.0.2.1:2379",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("give exactly one"), "{err}");
    let (code, _, err) = vxmesh(&["agent", "--node", "h"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--cluster FILE") && err.contains("--store etcd://"),
        "{err}"
    );
    let (code, _, err) = vxmesh(&[
        "agent",
        "--node",
        "h",
        "--store",
        "etcd://192.0.2.1:2379",
        "--network",
        "demo",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--underlay-ip"), "{err}");
    let (code, _, err) = vxmesh(&[
        "agent",
        "--node",
        "h",
        "--store",
        "nonsense",
        "--network",
        "demo",
        "--underlay-ip",
        "192.0.2.9",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("etcd://HOST:2379"), "{err}");

    // Agents leave on SIGTERM with --leave; a long TTL tells leave from expiry.
    let mut s = etcd_spec("ec", 3, 1, Mode::Routed);
    s.ttl = Duration::from_secs(15);
    s.agent_args = vec!["--leave".into()];
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let ul = lab.info.underlay_ns.clone();
        // Every member, reached from the underlay namespace (the lab's own address).
        let store_url = lab.etcd().unwrap().store.clone();
        let store = store_url.as_str();
        // net create validates like a cluster file, is idempotent, refuses changes.
        let create = |args: &[&str]| {
            let mut v = vec!["--netns", &ul, "net", "create"];
            v.extend_from_slice(args);
            vxmesh(&v)
        };
        let create_other = |vni: &str| {
            create(&[
                "other",
                "--store",
                store,
                "--mode",
                "bridged",
                "--cidr",
                "10.20.0.0/24",
                "--vni",
                vni,
            ])
        };
        let (code, out, err) = create_other("300");
        assert_eq!(code, 0, "{out}{err}");
        let (code, _, err) = create_other("300");
        assert_eq!(code, 0, "idempotent: {err}");
        let (code, _, err) = create_other("301");
        assert_ne!(code, 0);
        assert!(
            err.contains("already exists with different settings")
                && err.contains("vni 300 there, 301 requested"),
            "{err}"
        );
        for (args, want) in [
            (
                vec!["bad", "--cidr", "10.0.0.1/16", "--vni", "5"],
                "host bits set",
            ),
            (
                vec!["bad", "--cidr", "10.0.0.0/16", "--vni", "0"],
                "VNI 0 is out of range",
            ),
            (
                vec![
                    "bad",
                    "--cidr",
                    "10.0.0.0/16",
                    "--vni",
                    "5",
                    "--subnet-len",
                    "8",
                ],
                "subnet_len",
            ),
            (
                vec!["bad", "--cidr", "10.0.0.0/16", "--vni", "5", "--mtu", "100"],
                "MTU 100 is out of range",
            ),
        ] {
            let mut a = args.clone();
            a.extend(["--store", store]);
            let (code, _, err) = create(&a);
            assert_ne!(code, 0, "{args:?} accepted");
            assert!(err.contains(want), "{args:?}: {err}");
        }
        let (code, out, err) = vxmesh(&["--netns", &ul, "net", "show", "other", "--store", store]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("\"vni\": 300"), "{out}");
        // An encrypted network with its own secure underlay settings: shown
        // by create and show; the flags need --encrypt.
        let secret = |port: &str| {
            create(&[
                "secret",
                "--store",
                store,
                "--cidr",
                "10.30.0.0/16",
                "--vni",
                "302",
                "--encrypt",
                "--transport-cidr",
                "100.64.9.0/24",
                "--wg-port",
                port,
            ])
        };
        let (code, out, err) = secret("51999");
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("encrypted: transport 100.64.9.0/24, port 51999"),
            "{out}"
        );
        let (code, _, err) = secret("51998");
        assert_ne!(code, 0);
        assert!(err.contains("port 51999 there, 51998 requested"), "{err}");
        let (code, out, err) = vxmesh(&["--netns", &ul, "net", "show", "secret", "--store", store]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("\"transport_cidr\": \"100.64.9.0/24\""),
            "{out}"
        );
        let (code, _, err) = create(&[
            "plain",
            "--store",
            store,
            "--cidr",
            "10.31.0.0/16",
            "--vni",
            "303",
            "--wg-port",
            "51999",
        ]);
        assert_ne!(code, 0);
        assert!(err.contains("--encrypt"), "{err}");

        let h1 = lab.node("host1").unwrap().netns.clone();
        // SIGTERM an agent run with --leave: peers drop it at once.
        lab.stop_agent("host2", Signal::SIGTERM).unwrap();
        let took = wait_until(Duration::from_secs(2), || {
            entries_on(&h1, "vxm-vx100") == (1, 1, 1)
        })
        .await;
        assert!(
            took.is_some(),
            "host2 did not leave on SIGTERM: {:?}",
            entries_on(&h1, "vxm-vx100")
        );
        // `vxmesh leave` for a stopped node (run from the underlay namespace).
        lab.stop_agent("host3", Signal::SIGKILL).unwrap();
        assert_eq!(entries_on(&h1, "vxm-vx100"), (1, 1, 1));
        let (code, out, err) = vxmesh(&[
            "--netns",
            &ul,
            "leave",
            "--store",
            store,
            "--network",
            "demo",
            "--node",
            "host3",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("node host3 left network demo"), "{out}");
        let took = wait_until(Duration::from_secs(2), || {
            entries_on(&h1, "vxm-vx100") == (0, 0, 0)
        })
        .await;
        assert!(
            took.is_some(),
            "host3 still there: {:?}",
            entries_on(&h1, "vxm-vx100")
        );
        let (code, out, _) = vxmesh(&[
            "--netns",
            &ul,
            "leave",
            "--store",
            store,
            "--network",
            "demo",
            "--node",
            "host3",
        ]);
        assert_eq!(code, 0);
        assert!(out.contains("already gone"), "{out}");
    }
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cli_etcd_bridged() {
    let name = unique("ecli");
    let (code, out, err) = vxmesh(&[
        "lab",
        "demo",
        "--name",
        &name,
        "--store",
        "etcd",
        "--mode",
        "bridged",
        "--nodes",
        "3",
        "--containers",
        "1",
        "--networks",
        "2",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("PASS") && out.contains("etcd store") && out.contains("iso"),
        "{out}"
    );
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_cli_etcd_routed() {
    // VXMESH_LAB_NODES / VXMESH_LAB_CONTAINERS scale it (see lab_size):
    // the 250-host demo on etcd, with the lab's default TTL.
    let (nodes, containers) = lab_size(3, 1);
    let name = unique("ecr");
    let (code, out, err) = vxmesh(&[
        "lab",
        "demo",
        "--name",
        &name,
        "--store",
        "etcd",
        "--nodes",
        &nodes.to_string(),
        "--containers",
        &containers.to_string(),
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let n = nodes * containers;
    assert!(
        out.contains("PASS") && out.contains(&format!("({} probes in", n * (n - 1))),
        "{out}"
    );
    println!("{out}");
    assert_all_gone(&name);
}
