//! Operator tools on real labs (root; namespaces only): `vxmesh status`
//! compares the agent's last plan with the kernel, `vxmesh doctor` names the
//! first broken hop on the packet path.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use vxmesh::config::Mode;
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::lab::Lab;

/// `vxmesh --netns NS SUB --state-dir DIR --json ARGS`: (exit code, JSON).
fn tool(lab: &Lab, node: &str, sub: &str, args: &[&str]) -> (i32, Value) {
    let n = lab.node(node).unwrap();
    let mut argv = vec![
        "--netns",
        n.netns.as_str(),
        sub,
        "--state-dir",
        n.state_dir.to_str().unwrap(),
        "--json",
    ];
    argv.extend_from_slice(args);
    let (code, out, err) = vxmesh(&argv);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{sub} output is not JSON ({e}): {out}\nstderr: {err}"));
    (code, v)
}

/// Run `ip`/`bridge` with `-n NS` and insist it succeeds (test-side breakage).
fn must(cmd: &str, ns: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{cmd} -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent's plan file appears right after its first publish.
async fn wait_plan(lab: &Lab, node: &str) {
    let dir = lab.node(node).unwrap().state_dir.clone();
    wait_until(Duration::from_secs(10), || {
        vxmesh::status::read_plan(&dir).is_ok()
    })
    .await
    .expect("the agent writes plan.json");
}

/// Repair a node the way its agent would (one reconcile of its plan).
async fn repair(lab: &Lab, node: &str) {
    let n = lab.node(node).unwrap();
    let nl = Netlink::connect_in(&Netns::open(&n.netns).unwrap())
        .await
        .unwrap();
    let saved = vxmesh::status::read_plan(&n.state_dir).unwrap();
    vxmesh::dataplane::reconcile(&nl, &saved.plan)
        .await
        .unwrap();
}

fn entries_of(v: &Value) -> Vec<(String, String)> {
    v["networks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["peers"].as_array().unwrap().iter())
        .flat_map(|p| p["entries"].as_array().unwrap().iter())
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_every_entry_and_a_route_deleted_by_hand() {
    let s = spec("os", 2, 1, Mode::Routed, 1);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        wait_plan(&lab, "host1").await;
        let (code, v) = tool(&lab, "host1", "status", &[]);
        assert_eq!(code, 0, "{v:#}");
        assert_eq!(v["node"], "host1");
        assert_eq!(v["ok"], true, "{v:#}");
        assert_eq!(v["agent_running"], true);
        let net = &v["networks"][0];
        assert_eq!(net["mode"], "routed");
        assert_eq!(net["vni"], 100);
        assert_eq!(net["subnet"], "172.18.10.0/24");
        assert_eq!(net["vtep"], "vxm-vx100");
        let peers = net["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0]["node"], "host2");
        assert_eq!(peers[0]["underlay_ip"], "198.18.0.2");
        let e = entries_of(&v);
        assert_eq!(e.len(), 3, "route, neighbour, FDB: {e:?}");
        assert!(e.iter().all(|(_, s)| s == "ok"), "{e:?}");
        assert!(
            v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["state"] == "ok")
        );

        // Agent stopped: a route deleted by hand stays deleted, and shows.
        lab.stop_agent("host1", Signal::SIGTERM).unwrap();
        let ns = lab.node("host1").unwrap().netns.clone();
        must("ip", &ns, &["route", "del", "172.18.20.0/24"]);
        let (_, v) = tool(&lab, "host1", "status", &[]);
        assert_eq!(v["ok"], false);
        assert_eq!(v["agent_running"], false);
        let e = entries_of(&v);
        assert!(e.contains(&("route".into(), "missing".into())), "{e:?}");
        assert!(e.contains(&("neighbour".into(), "ok".into())), "{e:?}");
        assert!(e.contains(&("fdb".into(), "ok".into())), "{e:?}");
        assert!(
            !v["pending_changes"].as_array().unwrap().is_empty(),
            "diff sees the missing route"
        );
        must(
            "ip",
            &ns,
            &[
                "neigh",
                "replace",
                "172.18.20.0",
                "lladdr",
                "0a:64:00:00:00:99",
                "dev",
                "vxm-vx100",
                "nud",
                "permanent",
            ],
        );
        let (_, v) = tool(&lab, "host1", "status", &[]);
        let neigh = v["networks"][0]["peers"][0]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "neighbour")
            .unwrap()
            .clone();
        assert_eq!(neigh["state"], "different", "{neigh:#}");
        assert!(
            neigh["actual"]
                .as_str()
                .unwrap()
                .contains("0a:64:00:00:00:99"),
            "{neigh:#}"
        );
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_the_first_broken_hop() {
    let s = spec("od", 2, 1, Mode::Routed, 1);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        wait_plan(&lab, "host1").await;
        let (code, v) = tool(&lab, "host1", "doctor", &[]);
        assert_eq!(code, 0, "healthy: {v:#}");
        assert_eq!(v["ok"], true);
        let hops: Vec<&str> = v["paths"][0]["hops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["hop"].as_str().unwrap())
            .collect();
        assert_eq!(
            hops,
            [
                "bridge",
                "ip_forward",
                "vtep",
                "underlay_device",
                "route",
                "neighbour",
                "fdb",
                "underlay_reachability",
                "mtu",
                "tx_checksum_offload",
                "vtep_filter"
            ]
        );
        // --to a remote container selects its peer's path.
        let to = lab
            .info
            .containers
            .iter()
            .find(|c| c.node == "host2")
            .unwrap()
            .ip
            .to_string();
        let (code, v) = tool(&lab, "host1", "doctor", &["--to", &to]);
        assert_eq!(code, 0, "{v:#}");
        assert_eq!(v["paths"].as_array().unwrap().len(), 1);
        assert_eq!(v["paths"][0]["peer"], "host2");

        lab.stop_agent("host1", Signal::SIGTERM).unwrap();
        let ns = lab.node("host1").unwrap().netns.clone();
        let peer_mac = vxmesh::model::vtep_mac(
            vxmesh::model::Vni::new(100).unwrap(),
            "198.18.0.2".parse().unwrap(),
        )
        .to_string();
        type Break = Box<dyn Fn(&str)>;
        let breaks: Vec<(&str, Break)> = vec![
            (
                "route",
                Box::new(|ns| must("ip", ns, &["route", "del", "172.18.20.0/24"])),
            ),
            (
                "neighbour",
                Box::new(|ns| {
                    must(
                        "ip",
                        ns,
                        &["neigh", "del", "172.18.20.0", "dev", "vxm-vx100"],
                    )
                }),
            ),
            (
                "fdb",
                Box::new(move |ns| {
                    must(
                        "bridge",
                        ns,
                        &[
                            "fdb",
                            "del",
                            &peer_mac,
                            "dev",
                            "vxm-vx100",
                            "dst",
                            "198.18.0.2",
                        ],
                    )
                }),
            ),
            (
                "vtep",
                Box::new(|ns| must("ip", ns, &["link", "set", "vxm-vx100", "down"])),
            ),
            (
                "ip_forward",
                Box::new(|ns| {
                    Netns::open(ns)
                        .unwrap()
                        .run(|| vxmesh::dataplane::sysctl::set_ip_forward(false))
                        .unwrap()
                }),
            ),
            (
                "bridge",
                Box::new(|ns| must("ip", ns, &["link", "set", "vxm-br0", "down"])),
            ),
            (
                "mtu",
                Box::new(|ns| must("ip", ns, &["link", "set", "vxm-vx100", "mtu", "1400"])),
            ),
        ];
        for (want, brk) in &breaks {
            brk(&ns);
            let (code, v) = tool(&lab, "host1", "doctor", &["--no-ping"]);
            assert_ne!(code, 0, "{want} broken: {v:#}");
            assert_eq!(v["ok"], false);
            assert_eq!(
                v["first_broken"]["hop"], *want,
                "first broken hop: {:#}",
                v["first_broken"]
            );
            assert!(
                v["first_broken"]["fix"]
                    .as_str()
                    .is_some_and(|f| !f.is_empty()),
                "a fix in words"
            );
            repair(&lab, "host1").await;
            let (code, v) = tool(&lab, "host1", "doctor", &["--no-ping"]);
            assert_eq!(code, 0, "repaired after {want}: {v:#}");
        }
        // The human rendering names the hop and the fix too.
        breaks[2].1(&ns);
        let n = lab.node("host1").unwrap();
        let (code, out, _) = vxmesh(&[
            "--netns",
            &n.netns,
            "doctor",
            "--state-dir",
            n.state_dir.to_str().unwrap(),
        ]);
        assert_ne!(code, 0);
        assert!(out.contains("first broken hop: fdb"), "{out}");
        assert!(out.contains("is the agent running?"), "{out}");
        repair(&lab, "host1").await;

        // The underlay device down: named before the (intact) entries.
        must("ip", &ns, &["link", "set", "eth0", "down"]);
        let (code, v) = tool(&lab, "host1", "doctor", &["--no-ping"]);
        must("ip", &ns, &["link", "set", "eth0", "up"]);
        assert_ne!(code, 0);
        assert_eq!(v["first_broken"]["hop"], "underlay_device", "{v:#}");
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_in_bridged_mode_follows_one_endpoint() {
    let s = spec("ob", 2, 1, Mode::Bridged, 1);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        wait_plan(&lab, "host1").await;
        let remote = lab
            .info
            .containers
            .iter()
            .find(|c| c.node == "host2")
            .unwrap()
            .ip;
        let to = remote.to_string();
        let (code, v) = tool(&lab, "host1", "doctor", &["--to", &to]);
        assert_eq!(code, 0, "{v:#}");
        let path = &v["paths"][0];
        assert_eq!(v["paths"].as_array().unwrap().len(), 1);
        let hops: Vec<&str> = path["hops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["hop"].as_str().unwrap())
            .collect();
        assert!(!hops.contains(&"ip_forward") && !hops.contains(&"route"));

        // A local address is not a path over the overlay: refused with a reason.
        let local = lab
            .info
            .containers
            .iter()
            .find(|c| c.node == "host1")
            .unwrap()
            .ip
            .to_string();
        let n = lab.node("host1").unwrap().clone();
        let (code, _, err) = vxmesh(&[
            "--netns",
            &n.netns,
            "doctor",
            "--state-dir",
            n.state_dir.to_str().unwrap(),
            "--to",
            &local,
        ]);
        assert_ne!(code, 0);
        assert!(err.contains("no peer of this node serves"), "{err}");

        lab.stop_agent("host1", Signal::SIGTERM).unwrap();
        let mac = vxmesh::model::container_mac(remote).to_string();
        must(
            "bridge",
            &n.netns,
            &["fdb", "del", &mac, "dev", "vxm-vx200", "dst", "198.18.0.2"],
        );
        let (code, v) = tool(&lab, "host1", "doctor", &["--to", &to, "--no-ping"]);
        assert_ne!(code, 0);
        assert_eq!(v["first_broken"]["hop"], "fdb", "{v:#}");
        assert!(
            v["first_broken"]["fix"].as_str().unwrap().contains(&mac),
            "{v:#}"
        );
    }
    assert_gone(&name);
}
