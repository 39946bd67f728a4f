//! Reconciling real namespaces (run as root): a plan from empty is complete
//! and idempotent (also in two steps, devices before entries), drift is repaired, a removed peer takes exactly its
//! entries, bridged mode enslaves a proxy VTEP, and 10 000 peers apply fast.
//!
//! Every test works in its own freshly made namespaces (removed on drop,
//! also on panic), creates nothing in the root namespace and sends no
//! traffic.

mod common;
mod kernel_common;

use kernel_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_plan_from_empty_is_complete_and_idempotent() {
    let t = TestNs::new("rt");
    let nl = underlay(&t).await;
    let plan = routed(0..3);
    let r = reconcile(&nl, &plan).await.unwrap();
    // 2 links + 2 addresses + ip_forward + 3 x (route, neighbour, fdb).
    assert_eq!(r.changes, 14, "{:#?}", r.lines());
    // Each link: create + alias; addresses 2; 9 entries.
    assert_eq!(r.messages, 4 + 2 + 9);
    assert!(r.apply.errors.is_empty());

    let st = nl.dump().await.unwrap();
    let vx = st.link("vxm-vx100").unwrap();
    assert_eq!(vx.ownership(), Ownership::Managed);
    assert_eq!(vx.kind.as_deref(), Some("vxlan"));
    assert_eq!(vx.mtu, 1450);
    assert_eq!(vx.mac, Some(vtep_mac(vni(100), LOCAL)));
    assert!(vx.up);
    let x = vx.vxlan.as_ref().unwrap();
    assert_eq!(
        (
            x.vni,
            x.local,
            x.link.as_deref(),
            x.port,
            x.learning,
            x.proxy
        ),
        (100, Some(LOCAL), Some("eth0"), 4789, false, false)
    );
    let br = st.link("vxm-br0").unwrap();
    assert_eq!(
        (br.kind.as_deref(), br.mtu, br.alias.as_deref()),
        (Some("bridge"), 1450, Some("vxmesh:net:demo"))
    );
    assert_eq!(st.addresses.len(), 2);
    assert_eq!(owned(&st), (3, 3, 3));
    assert!(st.ip_forward && t.ip_forward());
    assert!(diff(&plan, &st).unwrap().is_empty());

    // What an operator sees.
    let link = t.ip(&["-d", "link", "show", "vxm-vx100"]);
    for want in [
        "vxlan id 100",
        "local 198.18.0.1",
        "dev eth0",
        "dstport 4789",
        "nolearning",
        "alias vxmesh:net:demo",
        "mtu 1450",
    ] {
        assert!(link.contains(want), "missing {want:?} in\n{link}");
    }
    let routes = t.ip(&["route", "show", "proto", "86"]);
    let (subnet, gw, mac, underlay) = peer(1);
    let metric = vxmesh::dataplane::kernel::route_metric(subnet);
    assert!(
        routes.contains(&format!(
            "{subnet} via {gw} dev vxm-vx100 metric {metric} onlink"
        )),
        "{routes}"
    );
    let neigh = t.ip(&["neigh", "show", "dev", "vxm-vx100"]);
    assert!(
        neigh.contains(&format!("{gw} lladdr {mac} PERMANENT")),
        "{neigh}"
    );
    let fdb = t.bridge(&["fdb", "show", "dev", "vxm-vx100"]);
    assert!(
        fdb.contains(&format!("{mac} dst {underlay} self permanent")),
        "{fdb}"
    );
    assert_eq!(counts(&t, "vxm-vx100"), (3, 3, 3));
    let addrs = t.ip(&["-4", "addr", "show"]);
    assert!(
        addrs.contains("inet 172.18.10.1/24") && addrs.contains("inet 172.18.10.0/32"),
        "{addrs}"
    );

    // Converged: a second pass sends nothing.
    let again = reconcile(&nl, &plan).await.unwrap();
    assert_eq!(
        (again.changes, again.messages),
        (0, 0),
        "{:#?}",
        again.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_pass_makes_the_devices_first_then_the_same_entries() {
    let t = TestNs::new("stg");
    let nl = underlay(&t).await;
    let plan = routed(0..3);
    let staged = vxmesh::dataplane::reconcile_local(&nl, &plan)
        .await
        .unwrap();
    // The node's own part is in place (what attach needs), no peer yet.
    let st = nl.dump().await.unwrap();
    assert!(st.link("vxm-br0").is_some() && st.link("vxm-vx100").is_some());
    assert_eq!(st.addresses.len(), 2);
    assert!(st.ip_forward);
    assert_eq!(owned(&st), (0, 0, 0));
    assert_eq!(counts(&t, "vxm-vx100"), (0, 0, 0));
    let r = staged.finish(&nl).await.unwrap();
    // Together exactly what one reconcile sends from empty (see above).
    assert_eq!(r.changes, 14, "{:#?}", r.lines());
    assert_eq!(r.messages, 4 + 2 + 9);
    assert!(r.apply.errors.is_empty());
    let st = nl.dump().await.unwrap();
    assert_eq!(owned(&st), (3, 3, 3));
    assert!(diff(&plan, &st).unwrap().is_empty());
    // Converged: staged again, nothing in either step.
    let again = vxmesh::dataplane::reconcile_local(&nl, &plan)
        .await
        .unwrap()
        .finish(&nl)
        .await
        .unwrap();
    assert_eq!((again.changes, again.messages), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired() {
    let t = TestNs::new("drift");
    let nl = underlay(&t).await;
    let plan = routed(0..3);
    converge(&nl, &plan).await;
    let (subnet, gw, mac, underlay) = peer(2);

    let sub = subnet.to_string();
    let gws = gw.to_string();
    let macs = mac.to_string();
    let uls = underlay.to_string();
    let drifts: Vec<(&str, Vec<&str>, &str)> = vec![
        ("ip", vec!["route", "del", &sub], "replace route"),
        (
            "ip",
            vec!["neigh", "del", &gws, "dev", "vxm-vx100"],
            "replace neigh",
        ),
        (
            "bridge",
            vec!["fdb", "del", &macs, "dev", "vxm-vx100", "dst", &uls],
            "replace fdb",
        ),
        (
            "ip",
            vec!["link", "set", "vxm-br0", "down"],
            "set link vxm-br0 up",
        ),
        (
            "ip",
            vec!["link", "set", "vxm-vx100", "mtu", "1400"],
            "set link vxm-vx100 mtu 1450",
        ),
        (
            "ip",
            vec!["addr", "del", "172.18.10.1/24", "dev", "vxm-br0"],
            "add address 172.18.10.1/24",
        ),
    ];
    for (tool, args, want) in drifts {
        run(tool, t.name(), &args);
        let r = reconcile(&nl, &plan).await.unwrap();
        assert_eq!(r.changes, 1, "after {tool} {args:?}: {:#?}", r.lines());
        assert!(r.lines()[0].starts_with(want), "{:?}", r.lines());
        assert_eq!(r.messages, 1);
        let again = reconcile(&nl, &plan).await.unwrap();
        assert_eq!(again.changes, 0, "{:#?}", again.lines());
    }
    assert_eq!(counts(&t, "vxm-vx100"), (3, 3, 3));

    // The VTEP itself: recreated with everything on it.
    t.ip(&["link", "del", "vxm-vx100"]);
    assert_eq!(
        t.ip(&["route", "show", "proto", "86"]),
        "",
        "routes went with the device"
    );
    let r = reconcile(&nl, &plan).await.unwrap();
    assert_eq!(r.changes, 1 + 1 + 9, "{:#?}", r.lines());
    assert_eq!(counts(&t, "vxm-vx100"), (3, 3, 3));
    let again = reconcile(&nl, &plan).await.unwrap();
    assert_eq!(again.changes, 0, "{:#?}", again.lines());

    // A VTEP with the wrong VNI (same name, still ours) is recreated.
    let mut other = plan.clone();
    if let LinkKind::Vxlan(v) = &mut other.links[1].kind {
        v.vni = vni(101);
    }
    converge(&nl, &other).await;
    let r = reconcile(&nl, &plan).await.unwrap();
    assert!(
        r.lines()[0].starts_with("delete vxlan vxm-vx100 (id 101 -> 100)"),
        "{:?}",
        r.lines()
    );
    assert_eq!(counts(&t, "vxm-vx100"), (3, 3, 3));
    assert!(
        t.ip(&["-d", "link", "show", "vxm-vx100"])
            .contains("vxlan id 100 ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_peer_removes_exactly_its_three_entries() {
    let t = TestNs::new("peer");
    let nl = underlay(&t).await;
    converge(&nl, &routed(0..3)).await;
    let before = nl.dump().await.unwrap();
    let r = reconcile(&nl, &routed(0..2)).await.unwrap();
    let (subnet, gw, mac, underlay) = peer(2);
    assert_eq!(
        r.lines(),
        vec![
            format!(
                "delete route {subnet} via {gw} dev vxm-vx100 proto 86 metric {}",
                vxmesh::dataplane::kernel::route_metric(subnet)
            ),
            format!("delete neigh {gw} dev vxm-vx100"),
            format!("delete fdb {mac} dst {underlay} dev vxm-vx100"),
        ]
    );
    assert_eq!(r.messages, 3);
    let after = nl.dump().await.unwrap();
    assert_eq!(counts(&t, "vxm-vx100"), (2, 2, 2));
    // Nothing else moved. (A link's operational state is the kernel's
    // own and settles after the link comes up: a bridge without ports
    // went from "down" to "unknown" between the dumps once; it is not
    // something a pass sets.)
    let set_by_vxmesh = |links: &[vxmesh::dataplane::kernel::ActualLink]| {
        links
            .iter()
            .cloned()
            .map(|mut l| {
                l.oper = String::new();
                l
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(set_by_vxmesh(&before.links), set_by_vxmesh(&after.links));
    assert_eq!(before.addresses, after.addresses);
    assert!(after.routes.iter().all(|r| r.dst != subnet));
    assert!(after.fdb.iter().all(|e| e.mac != mac));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_plan_enslaves_a_proxy_vtep_without_learning() {
    let t = TestNs::new("br");
    let nl = underlay(&t).await;
    let plan = bridged();
    let r = reconcile(&nl, &plan).await.unwrap();
    assert_eq!(r.changes, 2 + 1 + 2 + 2, "{:#?}", r.lines());
    let st = nl.dump().await.unwrap();
    let vx = st.link("vxm-vx200").unwrap();
    assert_eq!(vx.master.as_deref(), Some("vxm-br200"));
    assert_eq!(vx.port_learning, Some(false));
    assert!(vx.vxlan.as_ref().unwrap().proxy);
    assert!(st.addresses.is_empty(), "bridged bridge has no IP");
    assert!(!st.ip_forward, "bridged mode leaves ip_forward alone");
    let link = t.ip(&["-d", "link", "show", "vxm-vx200"]);
    assert!(
        link.contains("master vxm-br200") && link.contains("nolearning proxy"),
        "{link}"
    );
    let port = t.bridge(&["-d", "link", "show", "dev", "vxm-vx200"]);
    assert!(port.contains("learning off"), "{port}");
    assert_eq!(counts(&t, "vxm-vx200"), (0, 2, 2));
    let again = reconcile(&nl, &plan).await.unwrap();
    assert_eq!(
        (again.changes, again.messages),
        (0, 0),
        "{:#?}",
        again.lines()
    );

    // Learning turned back on and the port released: both repaired.
    t.ip(&[
        "link",
        "set",
        "vxm-vx200",
        "type",
        "bridge_slave",
        "learning",
        "on",
    ]);
    assert_eq!(
        reconcile(&nl, &plan).await.unwrap().lines(),
        vec!["set bridge-port learning off on vxm-vx200"]
    );
    t.ip(&["link", "set", "vxm-vx200", "nomaster"]);
    let r = reconcile(&nl, &plan).await.unwrap();
    assert_eq!(
        r.lines(),
        vec![
            "set link vxm-vx200 master vxm-br200",
            "set bridge-port learning off on vxm-vx200"
        ]
    );
    assert!(
        t.bridge(&["-d", "link", "show", "dev", "vxm-vx200"])
            .contains("learning off")
    );
    // The bridge keeps the planned MTU even with no port (no auto-adjust).
    t.ip(&["link", "set", "vxm-vx200", "nomaster"]);
    assert!(t.ip(&["link", "show", "vxm-br200"]).contains("mtu 1450"));
    reconcile(&nl, &plan).await.unwrap();

    // Routed and bridged side by side, isolated by VNI.
    let mut both = routed(0..2);
    both.links.extend(plan.links.clone());
    both.neighbours.extend(plan.neighbours.clone());
    both.fdb.extend(plan.fdb.clone());
    converge(&nl, &both).await;
    assert_eq!(counts(&t, "vxm-vx200"), (2, 2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_peers_apply_fast_and_increment_exactly() {
    const N: u32 = 10_000;
    let t = TestNs::new("scale");
    let nl = underlay(&t).await;
    let plan = routed(0..N);
    let t0 = Instant::now();
    let actual = nl.dump().await.unwrap();
    let changes = diff(&plan, &actual).unwrap();
    let rep = nl.apply(&changes).await.unwrap();
    let total = t0.elapsed();
    println!(
        "10k peers: {} changes, {} netlink messages ({} links, {} addresses, {} routes, {} neighbours, {} fdb) + {} link dumps; apply {:?}, dump+diff+apply {:?}",
        rep.changes,
        rep.messages(),
        rep.links,
        rep.addresses,
        rep.routes,
        rep.neighbours,
        rep.fdb,
        rep.dumps,
        rep.elapsed,
        total
    );
    assert_eq!(rep.changes, 2 + 2 + 1 + 3 * N as usize);
    assert_eq!(
        (rep.routes, rep.neighbours, rep.fdb),
        (N as usize, N as usize, N as usize)
    );
    let t1 = Instant::now();
    let st = nl.dump().await.unwrap();
    println!("10k peers: dump of the converged state {:?}", t1.elapsed());
    for (phase, n, d) in &rep.phases {
        println!("  phase {phase:?}: {n} changes in {d:?}");
    }
    assert_eq!(owned(&st), (N as usize, N as usize, N as usize));
    let t2 = Instant::now();
    let again = reconcile(&nl, &plan).await.unwrap();
    println!("10k peers: converged reconcile pass {:?}", t2.elapsed());
    assert_eq!((again.changes, again.messages), (0, 0));

    // One more peer: exactly its three requests.
    let bigger = routed(0..N + 1);
    let r = reconcile(&nl, &bigger).await.unwrap();
    assert_eq!((r.changes, r.messages), (3, 3), "{:#?}", r.lines());
    assert!(
        r.lines()[2].starts_with("replace route"),
        "route last: {:?}",
        r.lines()
    );
    // One peer gone: exactly its three deletes.
    let mut fewer = bigger.clone();
    let (subnet, gw, mac, _) = peer(17);
    fewer.routes.retain(|r| r.dst != subnet);
    fewer.neighbours.retain(|n| n.ip != gw);
    fewer.fdb.retain(|e| e.mac != mac);
    let r = reconcile(&nl, &fewer).await.unwrap();
    assert_eq!((r.changes, r.messages), (3, 3), "{:#?}", r.lines());
    let st = nl.dump().await.unwrap();
    assert_eq!(owned(&st), (N as usize, N as usize, N as usize));
}
