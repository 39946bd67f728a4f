//! vxmesh's nftables table in namespaces the tests create (root): planned,
//! applied, repaired after drift, coexisting with iptables-nft tables, and
//! removed by `down`; and the data path: outbound NAT, container to
//! container across nodes keeping its source, published ports (DNAT) from
//! outside, other nodes, the same node (hairpin) and the node itself.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::underlay;
use common::*;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::{Netns, NetnsError, NetnsGuard};
use vxmesh::dataplane::plan::{PlanInput, plan};
use vxmesh::dataplane::{NodePlan, PortProto, PortSpec};
use vxmesh::firewall::{self, FwChange};

fn nft(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .expect("run nft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sh(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn node_plan(peers: usize, filter: bool) -> NodePlan {
    let mut t = String::from(
        "[[network]]\nname = \"demo\"\ncidr = \"172.18.0.0/16\"\nsubnet_len = 24\nvni = 100\n",
    );
    for i in 0..=peers {
        t += &format!(
            "[[node]]\nname = \"host{i}\"\nunderlay_ip = \"198.18.0.{}\"\n",
            i + 1
        );
    }
    let c = vxmesh::config::parse(&t, "test").unwrap();
    let mut p = plan(&PlanInput {
        cluster: &c,
        node: "host0",
        endpoints: None,
        underlay_mtu: 1500,
        vxlan_filter: filter,
    })
    .unwrap();
    p.ports.insert(PortSpec {
        proto: PortProto::Tcp,
        host_port: 8080,
        container_ip: "172.18.0.5".parse().unwrap(),
        container_port: 80,
        network: "demo".into(),
        owner: "test".into(),
    });
    p
}

fn reconcile_in(ns: &Netns, p: &NodePlan) -> Vec<FwChange> {
    let p = p.clone();
    ns.run(move || {
        firewall::reconcile(&p).map_err(|e| vxmesh::dataplane::netns::NetnsError::Spawn {
            name: e.to_string(),
            io: std::io::Error::other("firewall"),
        })
    })
    .expect("firewall reconcile")
    .changes
}

/// The handle of the rule whose comment is `comment` in `nft -a list table`.
fn handle_of(ns: &str, comment: &str) -> String {
    let (_, text) = nft(ns, &["-a", "list", "table", "inet", "vxmesh"]);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule \"{comment}\" in:\n{text}"));
    line.rsplit("# handle ").next().unwrap().trim().to_string()
}

#[test]
fn table_is_applied_repaired_coexists_and_goes_with_down() {
    let name = unique_ns("fw");
    let guard = NetnsGuard::create(&name).unwrap();
    let ns = guard.open().unwrap();
    // iptables-nft tables like the CNI portmap and firewall plugins make.
    sh(
        &name,
        "iptables-nft -t nat -N CNI-HOSTPORT-DNAT && iptables-nft -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT && iptables-nft -t filter -N CNI-FORWARD && iptables-nft -t filter -A FORWARD -j CNI-FORWARD",
    );
    let theirs = |n: &str| sh(n, "iptables-nft-save | grep -v '^#'");
    let before = theirs(&name);

    let exists = |ns: &Netns| ns.run(|| Ok::<_, NetnsError>(firewall::nft::table_exists()));
    assert_eq!(exists(&ns).unwrap(), Some(false), "no table yet");
    let p = node_plan(2, true);
    assert_eq!(reconcile_in(&ns, &p), vec![FwChange::Create]);
    assert_eq!(
        exists(&ns).unwrap(),
        Some(true),
        "the table, asked over nfnetlink"
    );
    assert_eq!(
        reconcile_in(&ns, &p),
        vec![],
        "a second pass changes nothing"
    );
    let (_, text) = nft(&name, &["list", "table", "inet", "vxmesh"]);
    for want in [
        "198.18.0.2",
        "198.18.0.3",
        "udp dport @vxlan_ports ip saddr != @vtep_peers counter name \"vxlan_dropped\" drop",
        "ip saddr @nat_sources ip daddr != @overlay masquerade",
        "tcp dport 8080 dnat ip to 172.18.0.5:80",
        "ct status dnat ip saddr 172.18.0.0/24 ip daddr 172.18.0.5 tcp dport 80 masquerade",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // Drift: a deleted rule, a deleted and a foreign set element come back
    // as planned in one pass.
    let h = handle_of(&name, "outbound-nat");
    assert!(
        nft(
            &name,
            &["delete", "rule", "inet", "vxmesh", "nat_post", "handle", &h]
        )
        .0
    );
    assert!(
        nft(
            &name,
            &[
                "delete",
                "element",
                "inet",
                "vxmesh",
                "vtep_peers",
                "{ 198.18.0.3 }"
            ]
        )
        .0
    );
    assert!(
        nft(
            &name,
            &[
                "add",
                "element",
                "inet",
                "vxmesh",
                "vtep_peers",
                "{ 203.0.113.66 }"
            ]
        )
        .0
    );
    let h = handle_of(&name, "port tcp/8080 test");
    assert!(
        nft(
            &name,
            &["delete", "rule", "inet", "vxmesh", "publish", "handle", &h]
        )
        .0
    );
    let changes = reconcile_in(&ns, &p);
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert_eq!(reconcile_in(&ns, &p), vec![], "repaired in one pass");
    let (_, text) = nft(&name, &["list", "set", "inet", "vxmesh", "vtep_peers"]);
    assert!(
        text.contains("198.18.0.3") && !text.contains("203.0.113.66"),
        "{text}"
    );

    // A peer joins: the set changes, nothing else.
    let grown = node_plan(3, true);
    let changes = reconcile_in(&ns, &grown);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(&changes[0], FwChange::Elements { set: "vtep_peers", add, delete } if add.len() == 1 && delete.is_empty())
    );

    // The filter switched off: its rule goes, the rest stays.
    let off = node_plan(3, false);
    assert_eq!(reconcile_in(&ns, &off).len(), 1);
    let (_, text) = nft(&name, &["list", "chain", "inet", "vxmesh", "vxlan_in"]);
    assert!(!text.contains("drop"), "{text}");

    assert_eq!(theirs(&name), before, "iptables-nft tables untouched");
    // `down`: the table goes, theirs stay.
    let gone = ns
        .run(|| {
            firewall::nft::delete_table().map_err(|e| vxmesh::dataplane::netns::NetnsError::Spawn {
                name: e.to_string(),
                io: std::io::Error::other("firewall"),
            })
        })
        .unwrap();
    assert!(gone);
    assert!(
        !nft(&name, &["list", "table", "inet", "vxmesh"]).0,
        "no vxmesh table after down"
    );
    assert_eq!(exists(&ns).unwrap(), Some(false));
    assert_eq!(
        theirs(&name),
        before,
        "iptables-nft tables untouched by down"
    );
    drop(guard);
}

/// The elements of `set` as `nft list set` prints them, sorted.
fn elements_of(ns: &str, set: &str) -> Vec<String> {
    let (ok, text) = nft(ns, &["-j", "list", "set", "inet", "vxmesh", set]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out: Vec<String> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["set"]["elem"].as_array())
        .flatten()
        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
        .collect();
    out.sort();
    out
}

#[test]
fn peers_joining_and_leaving_change_the_sets_over_nfnetlink_all_or_nothing() {
    use vxmesh::firewall::nfnl::{self, NfnlError};
    use vxmesh::firewall::ruleset::{Elem, PEERS_SET, PORTS_SET};
    let name = unique_ns("fwnl");
    let guard = NetnsGuard::create(&name).unwrap();
    let ns = guard.open().unwrap();
    let two = node_plan(2, true);
    assert_eq!(reconcile_in(&ns, &two), vec![FwChange::Create]);
    assert_eq!(elements_of(&name, PEERS_SET), ["198.18.0.2", "198.18.0.3"]);

    // The agent's path for a peer change: from the previous plan, no dump.
    let four = node_plan(4, true);
    let (a, b) = (two.clone(), four.clone());
    let r = ns
        .run(move || Ok::<_, NetnsError>(firewall::reconcile_from(&a, &b)))
        .unwrap()
        .expect("set elements applied")
        .expect("only elements changed");
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert_eq!(
        elements_of(&name, PEERS_SET),
        ["198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5"]
    );
    assert_eq!(
        reconcile_in(&ns, &four),
        vec![],
        "the kernel holds the plan"
    );

    // Straight over nfnetlink: deletions and additions of two sets in one
    // transaction.
    let addr = |s: &str| Elem::Addr(s.parse().unwrap());
    let run = |ns: &Netns, changes: Vec<(&'static str, Vec<Elem>, Vec<Elem>)>| {
        ns.run(move || {
            let sets: Vec<nfnl::SetChange<'_>> = changes
                .iter()
                .map(|(s, a, d)| (*s, &a[..], &d[..]))
                .collect();
            Ok::<_, NetnsError>(nfnl::update_elements(&sets))
        })
        .unwrap()
    };
    run(
        &ns,
        vec![
            (
                PEERS_SET,
                vec![addr("203.0.113.7")],
                vec![addr("198.18.0.2"), addr("198.18.0.4")],
            ),
            (PORTS_SET, vec![Elem::Port(8472)], vec![]),
        ],
    )
    .expect("applied");
    assert_eq!(
        elements_of(&name, PEERS_SET),
        ["198.18.0.3", "198.18.0.5", "203.0.113.7"]
    );
    assert_eq!(elements_of(&name, PORTS_SET), ["4789", "8472"]);

    // A refused change (deleting an element that is not there) refuses the
    // whole transaction and names its set: the addition beside it is not
    // applied either.
    let err = run(
        &ns,
        vec![
            (PORTS_SET, vec![Elem::Port(9999)], vec![]),
            (PEERS_SET, vec![], vec![addr("192.0.2.1")]),
        ],
    )
    .expect_err("an absent element cannot be deleted");
    assert!(
        matches!(&err, NfnlError::Refused { set, err } if *set == PEERS_SET && err.raw_os_error() == Some(libc::ENOENT)),
        "{err:?}"
    );
    assert_eq!(
        elements_of(&name, PORTS_SET),
        ["4789", "8472"],
        "all or nothing"
    );
    // Without the table there is nothing to change: refused, not hung.
    assert!(nft(&name, &["delete", "table", "inet", "vxmesh"]).0);
    let err = run(&ns, vec![(PEERS_SET, vec![addr("198.18.0.9")], vec![])]).unwrap_err();
    assert!(matches!(err, NfnlError::Refused { .. }), "{err:?}");
    drop(guard);
}

/// A TCP server in `ns` on `addr` that answers every connection with the
/// peer address it sees, and closes.
fn whoami_server(ns: &str, addr: &str) {
    let addr = addr.to_string();
    let listener = Netns::open(ns)
        .unwrap()
        .run(move || -> Result<std::net::TcpListener, NetnsError> {
            Ok(std::net::TcpListener::bind(&addr).expect("bind"))
        })
        .unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = s.write_all(peer.as_bytes());
        }
    });
}

/// Connect from `ns` to `to`; the server's answer (the source it saw), or
/// the error.
fn whoami(ns: &str, to: &str) -> Result<String, String> {
    let to: std::net::SocketAddr = to.parse().unwrap();
    Netns::open(ns)
        .unwrap()
        .run(move || -> Result<Result<String, String>, NetnsError> {
            let r = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    Ok(out)
                })
                .map_err(|e| e.to_string());
            Ok(r)
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_nat_and_published_ports_in_a_routed_lab() {
    let mut s = spec("fwn", 2, 2, Mode::Routed, 1);
    // Only the file change below should make the agents re-plan.
    s.agent_args = vec!["--resync".into(), "3600".into()];
    let lab = up(&s).await;
    let host1 = lab.node("host1").unwrap().clone();
    let on = |node: &str| -> Vec<_> {
        lab.info
            .containers
            .iter()
            .filter(|c| c.node == node)
            .cloned()
            .collect()
    };
    let (a, b, c) = (
        on("host1")[0].clone(),
        on("host1")[1].clone(),
        on("host2")[0].clone(),
    );
    let outside_ns = unique_ns("out");
    let _outside = underlay::stranger(&lab.info.underlay_ns, &outside_ns, "198.18.0.251");
    whoami_server(&outside_ns, "198.18.0.251:9000");
    whoami_server(&a.netns, &format!("{}:80", a.ip));

    // Outbound NAT: the outside host sees host1's address, and has no
    // route to any container subnet.
    assert_eq!(
        whoami(&a.netns, "198.18.0.251:9000"),
        Ok(host1.underlay_ip.to_string())
    );
    // Container to container across nodes keeps its source.
    assert_eq!(
        whoami(&c.netns, &format!("{}:80", a.ip)),
        Ok(c.ip.to_string())
    );

    // outbound_nat = false: the agent drops the masquerade rule; with a
    // route back the outside host sees the container's own address.
    let set_nat = |from: &str, to: &str| {
        let file = std::fs::read_to_string(&lab.info.cluster_file).unwrap();
        let edited = file.replacen(from, to, 1);
        assert_ne!(file, edited);
        std::fs::write(&lab.info.cluster_file, edited).unwrap();
    };
    let masquerading = |host: &str| {
        nft(host, &["list", "chain", "inet", "vxmesh", "nat_post"])
            .1
            .contains("outbound-nat")
    };
    set_nat("outbound_nat = true", "outbound_nat = false");
    let gone = wait_until(Duration::from_secs(30), || !masquerading(&host1.netns)).await;
    assert!(
        gone.is_some(),
        "the agent removed the masquerade rule; its log:\n{}",
        std::fs::read_to_string(&host1.agent_log).unwrap_or_default()
    );
    // Nothing needs NAT now (no port published yet): no NAT chain is left,
    // so the node tracks no connection; the VTEP filter stays.
    let (ok, table) = nft(&host1.netns, &["list", "table", "inet", "vxmesh"]);
    assert!(ok, "{table}");
    assert!(
        !table.contains("type nat") && table.contains("chain vxlan_in"),
        "{table}"
    );
    underlay::ip_ok(&[
        "-n",
        &outside_ns,
        "route",
        "add",
        "172.18.0.0/16",
        "via",
        &host1.underlay_ip.to_string(),
    ]);
    assert_eq!(whoami(&a.netns, "198.18.0.251:9000"), Ok(a.ip.to_string()));
    underlay::ip_ok(&["-n", &outside_ns, "route", "del", "172.18.0.0/16"]);
    set_nat("outbound_nat = false", "outbound_nat = true");
    let back = wait_until(Duration::from_secs(30), || {
        lab.info.nodes.iter().all(|n| {
            masquerading(&n.netns)
                && vxmesh::status::read_plan(&n.state_dir)
                    .is_ok_and(|s| !s.plan.firewall.nat_sources.is_empty())
        })
    })
    .await;
    assert!(
        back.is_some(),
        "the agents put the masquerade rule back (and saved that plan)"
    );

    // Publish tcp 8080 -> a:80 on host1, as the agent does from NodePlan.ports.
    let mut saved = vxmesh::status::read_plan(&host1.state_dir).unwrap().plan;
    saved.ports.insert(PortSpec {
        proto: PortProto::Tcp,
        host_port: 8080,
        container_ip: a.ip,
        container_port: 80,
        network: a.network.clone(),
        owner: "test".into(),
    });
    // The agent's plan has no ports (filling them is the agent's job for
    // Docker and attach): pause it, so no pass of its own takes them away.
    // Pause it between passes, not in the middle of its first one.
    let first_pass = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&host1.agent_log).is_ok_and(|l| l.contains("reconciled"))
    })
    .await;
    assert!(first_pass.is_some(), "host1's agent never finished a pass");
    let agent = nix::unistd::Pid::from_raw(host1.agent_pid.unwrap() as i32);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let host1_ns = Netns::open(&host1.netns).unwrap();
    assert!(!reconcile_in(&host1_ns, &saved).is_empty());
    let published = format!("{}:8080", host1.underlay_ip);
    // From outside: the container sees the client.
    assert_eq!(whoami(&outside_ns, &published), Ok("198.18.0.251".into()));
    // From a container on another node (its node masquerades it).
    assert_eq!(
        whoami(&c.netns, &published),
        Ok(lab.node("host2").unwrap().underlay_ip.to_string())
    );
    // From a container on the same node (hairpin: masqueraded to the host).
    let hairpin = whoami(&b.netns, &published).expect("hairpin connection");
    assert_ne!(hairpin, b.ip.to_string(), "hairpin flow is masqueraded");
    // From the node itself (output chain).
    assert!(whoami(&host1.netns, &published).is_ok());
    // The port withdrawn: no more DNAT.
    saved.ports.clear();
    reconcile_in(&host1_ns, &saved);
    assert!(whoami(&outside_ns, &published).is_err());

    // status and doctor see the table; doctor names a missing masquerade
    // rule and a peer missing from the filter's set.
    let doctor = |lab: &vxmesh_lab::lab::Lab, sub: &str| -> (i32, serde_json::Value) {
        let n = lab.node("host1").unwrap();
        let (code, out, err) = vxmesh(&[
            "--netns",
            &n.netns,
            sub,
            "--state-dir",
            n.state_dir.to_str().unwrap(),
            "--json",
        ]);
        (
            code,
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{sub}: {e}: {out} {err}")),
        )
    };
    let (code, v) = doctor(&lab, "status");
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["firewall"]["table"], true, "{v:#}");
    assert_eq!(v["firewall"]["peers_in_kernel"], 1, "{v:#}");
    assert_eq!(v["firewall"]["networks"][0]["outbound_nat"], true, "{v:#}");
    let h = handle_of(&host1.netns, "outbound-nat");
    assert!(
        nft(
            &host1.netns,
            &["delete", "rule", "inet", "vxmesh", "nat_post", "handle", &h]
        )
        .0
    );
    let (code, v) = doctor(&lab, "doctor");
    assert_ne!(code, 0, "{v:#}");
    assert_eq!(v["first_broken"]["hop"], "outbound_nat", "{v:#}");
    reconcile_in(&host1_ns, &saved);
    let peer = lab.node("host2").unwrap().underlay_ip.to_string();
    assert!(
        nft(
            &host1.netns,
            &[
                "delete",
                "element",
                "inet",
                "vxmesh",
                "vtep_peers",
                &format!("{{ {peer} }}")
            ]
        )
        .0
    );
    let (_, v) = doctor(&lab, "doctor");
    assert_eq!(v["first_broken"]["hop"], "vtep_filter", "{v:#}");
    assert!(
        v["first_broken"]["detail"]
            .as_str()
            .unwrap()
            .contains(&peer),
        "{v:#}"
    );
    let (code, v) = doctor(&lab, "status");
    assert_ne!(v["ok"], true, "{code} {v:#}");
    assert_eq!(v["firewall"]["peers_in_kernel"], 0, "{v:#}");
    reconcile_in(&host1_ns, &saved);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
}
