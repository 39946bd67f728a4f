//! The netlink layer against a real kernel (run as root). Every test works in
//! its own freshly made namespaces (removed on drop, also on panic), creates
//! nothing in the root namespace and sends no traffic. `ip`/`bridge` are used
//! only to inspect and to inject drift.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ipnet::Ipv4Net;
use vxmesh::dataplane::diff::diff;
use vxmesh::dataplane::kernel::{LinkOptions, Netlink, Ownership};
use vxmesh::dataplane::netns::{Netns, NetnsGuard};
use vxmesh::dataplane::{
    AddrSpec, FdbSpec, LinkKind, LinkSpec, NeighSpec, NodePlan, RouteSpec, VxlanSpec, reconcile,
};
use vxmesh::model::{Mac, Vni, container_mac, vtep_mac};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A namespace unique per test and process, deleted on drop.
struct TestNs {
    ns: Netns,
    _guard: NetnsGuard,
}

impl TestNs {
    fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("vxm-t-{tag}-{}-{n}", std::process::id());
        let guard = NetnsGuard::create(&name).expect("create test namespace");
        TestNs {
            ns: guard.open().unwrap(),
            _guard: guard,
        }
    }

    fn name(&self) -> &str {
        self.ns.name()
    }

    async fn nl(&self) -> Netlink {
        Netlink::connect_in(&self.ns).await.expect("connect")
    }

    /// `ip -n NS ARGS` stdout (inspection / drift injection only).
    fn ip(&self, args: &[&str]) -> String {
        run("ip", self.name(), args)
    }

    fn bridge(&self, args: &[&str]) -> String {
        run("bridge", self.name(), args)
    }

    fn ip_forward(&self) -> bool {
        self.ns.run(vxmesh::dataplane::sysctl::ip_forward).unwrap()
    }
}

fn run(tool: &str, ns: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Underlay inside the namespace: veth eth0 <-> eth1, eth0 198.18.0.1/15, up.
async fn underlay(t: &TestNs) -> Netlink {
    let nl = t.nl().await;
    nl.create_veth("eth0", "eth1", None, 1500).await.unwrap();
    for d in ["eth0", "eth1"] {
        nl.set_link(
            d,
            LinkOptions {
                up: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    nl.add_address("eth0", "198.18.0.1/15".parse().unwrap())
        .await
        .unwrap();
    nl
}

fn vni(v: u32) -> Vni {
    Vni::new(v).unwrap()
}

fn bridge_spec(name: &str, net: &str) -> LinkSpec {
    LinkSpec {
        name: name.into(),
        kind: LinkKind::Bridge,
        mtu: 1450,
        mac: "0e:64:c6:12:00:01".parse().unwrap(),
        master: None,
        port_learning: false,
        alias: format!("vxmesh:net:{net}"),
    }
}

fn vtep_spec(v: u32, proxy: bool, master: Option<&str>, net: &str) -> LinkSpec {
    LinkSpec {
        name: format!("vxm-vx{v}"),
        kind: LinkKind::Vxlan(VxlanSpec {
            vni: vni(v),
            local: LOCAL,
            underlay_dev: Some("eth0".into()),
            port: 4789,
            proxy,
        }),
        mtu: 1450,
        mac: vtep_mac(vni(v), LOCAL),
        master: master.map(String::from),
        port_learning: false,
        alias: format!("vxmesh:net:{net}"),
    }
}

/// Peer `i` (0-based): a /26 of 172.16.0.0/12 (172.18.x for the first ones),
/// underlay 198.18.0.0/15 + 2 + i.
fn peer(i: u32) -> (Ipv4Net, Ipv4Addr, Mac, Ipv4Addr) {
    let underlay = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 2)) + i);
    let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 18, 20, 0)) + i * 64);
    let subnet = Ipv4Net::new(net, 26).unwrap().trunc();
    assert!(
        "172.16.0.0/12"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(&subnet)
    );
    (
        subnet,
        subnet.network(),
        vtep_mac(vni(100), underlay),
        underlay,
    )
}

/// Routed: bridge vxm-br0 172.18.10.1/24, VTEP vxm-vx100 172.18.10.0/32 and
/// `peers` remote nodes (route + permanent neighbour + FDB entry each).
fn routed(peers: std::ops::Range<u32>) -> NodePlan {
    let mut p = NodePlan {
        links: vec![
            bridge_spec("vxm-br0", "demo"),
            vtep_spec(100, false, None, "demo"),
        ],
        ip_forward: true,
        ..Default::default()
    };
    p.addresses.insert(AddrSpec {
        dev: "vxm-br0".into(),
        addr: "172.18.10.1/24".parse().unwrap(),
    });
    p.addresses.insert(AddrSpec {
        dev: "vxm-vx100".into(),
        addr: "172.18.10.0/32".parse().unwrap(),
    });
    for i in peers {
        let (subnet, gw, mac, underlay) = peer(i);
        p.routes.insert(RouteSpec {
            dst: subnet,
            via: gw,
            dev: "vxm-vx100".into(),
        });
        p.neighbours.insert(NeighSpec {
            dev: "vxm-vx100".into(),
            ip: gw,
            mac,
        });
        p.fdb.insert(FdbSpec {
            dev: "vxm-vx100".into(),
            mac,
            dst: underlay,
        });
    }
    p
}

/// Bridged: bridge vxm-br200 (no IP), VTEP vxm-vx200 proxy enslaved, two
/// remote endpoints.
fn bridged() -> NodePlan {
    let mut br = bridge_spec("vxm-br200", "blue");
    br.mac = "0e:c8:c6:12:00:01".parse().unwrap();
    let mut p = NodePlan {
        links: vec![br, vtep_spec(200, true, Some("vxm-br200"), "blue")],
        ..Default::default()
    };
    for i in 2..4u8 {
        let ip = Ipv4Addr::new(10, 20, 0, i);
        let mac = container_mac(ip);
        p.neighbours.insert(NeighSpec {
            dev: "vxm-vx200".into(),
            ip,
            mac,
        });
        p.fdb.insert(FdbSpec {
            dev: "vxm-vx200".into(),
            mac,
            dst: Ipv4Addr::new(198, 18, 0, i),
        });
    }
    p
}

/// (routes proto 86, permanent neighbours, FDB entries with dst) per `ip`.
fn counts(t: &TestNs, vtep: &str) -> (usize, usize, usize) {
    let routes = t.ip(&["route", "show", "proto", "86"]).lines().count();
    let neigh = t
        .ip(&["neigh", "show", "dev", vtep, "nud", "permanent"])
        .lines()
        .count();
    let fdb = t
        .bridge(&["fdb", "show", "dev", vtep])
        .lines()
        .filter(|l| l.contains(" dst ") && l.contains("self permanent"))
        .count();
    (routes, neigh, fdb)
}

/// (routes, permanent neighbours, FDB entries) in a dump.
fn owned(st: &vxmesh::dataplane::kernel::ActualState) -> (usize, usize, usize) {
    let perm = st.neighbours.iter().filter(|n| n.permanent).count();
    let others: Vec<_> = st.neighbours.iter().filter(|n| !n.permanent).collect();
    if !others.is_empty() {
        println!("kernel-made neighbours (not vxmesh's): {others:?}");
    }
    (st.routes.len(), perm, st.fdb.len())
}

async fn converge(nl: &Netlink, plan: &NodePlan) {
    let r = reconcile(nl, plan).await.expect("reconcile");
    assert!(r.changes > 0 || r.messages == 0);
    let again = reconcile(nl, plan).await.expect("second reconcile");
    assert_eq!(
        (again.changes, again.messages),
        (0, 0),
        "second pass must be empty: {:#?}",
        again.lines()
    );
}

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
    // Nothing else moved.
    assert_eq!(before.links, after.links);
    assert_eq!(before.addresses, after.addresses);
    assert!(after.routes.iter().all(|r| r.dst != subnet));
    assert!(after.fdb.iter().all(|e| e.mac != mac));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_device_is_refused_and_left_untouched() {
    let t = TestNs::new("foreign");
    let nl = underlay(&t).await;
    // Somebody else's vxm-br0: right kind, but no vxmesh alias.
    t.ip(&["link", "add", "vxm-br0", "type", "bridge"]);
    let before = t.ip(&["-d", "addr", "show", "vxm-br0"]);
    let err = reconcile(&nl, &routed(0..3)).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(
            "device vxm-br0 (bridge) is not created by vxmesh; rename or delete it yourself"
        ),
        "{msg}"
    );
    assert!(msg.contains(t.name()), "names the namespace: {msg}");
    assert_eq!(
        t.ip(&["-d", "addr", "show", "vxm-br0"]),
        before,
        "untouched"
    );
    // Nothing at all was created.
    assert!(nl.link_index("vxm-vx100").await.unwrap().is_none());
    assert_eq!(counts(&t, "eth0").0, 0);
    // Teardown leaves it too.
    let rep = nl.teardown().await.unwrap();
    assert!(rep.links_deleted.is_empty());
    assert_eq!(
        rep.skipped,
        vec!["vxm-br0 (bridge, not created by vxmesh)".to_string()]
    );
    assert!(nl.link_index("vxm-br0").await.unwrap().is_some());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_keeps_going_and_reports_every_failure() {
    let t = TestNs::new("fail");
    let nl = underlay(&t).await;
    let mut plan = routed(0..2);
    // The VTEP's underlay device does not exist: the VTEP and everything on
    // it fail; the bridge and its address are still made.
    if let LinkKind::Vxlan(v) = &mut plan.links[1].kind {
        v.underlay_dev = Some("eth9".into());
    }
    let err = reconcile(&nl, &plan).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(t.name()), "{msg}");
    assert!(
        msg.contains("create vxlan vxm-vx100") && msg.contains("device eth9 does not exist"),
        "{msg}"
    );
    let vxmesh::dataplane::ReconcileError::Apply(apply) = &err else {
        panic!("an ApplyError: {err}");
    };
    // VTEP + its address + 2 x 3 entries.
    assert_eq!(
        apply.report.errors.len(),
        1 + 1 + 6,
        "{:#?}",
        apply.report.errors
    );
    assert!(
        apply
            .report
            .errors
            .iter()
            .map(ToString::to_string)
            .any(|e| e.starts_with("replace fdb") && e.contains("vxm-vx100 does not exist"))
    );
    let st = nl.dump().await.unwrap();
    assert!(st.link("vxm-br0").is_some());
    assert!(st.addresses.iter().any(|a| a.dev == "vxm-br0"));
    assert!(t.ip_forward());
}

/// Only the last request of a batch is acked: the kernel's errors for the
/// others must still reach exactly the requests they belong to, across
/// several batches in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_rejections_inside_batches_reach_their_own_changes() {
    const N: u32 = 700; // 2 100 entry requests: several batches in flight
    let t = TestNs::new("nack");
    let nl = underlay(&t).await;
    let mut plan = routed(0..N);
    // A multicast gateway is refused by the kernel ("invalid gateway"), after
    // the request was sent: one early in the first batch, one in a later one.
    let bad: Vec<Ipv4Net> = [3u32, 650].iter().map(|&i| peer(i).0).collect();
    plan.routes = plan
        .routes
        .into_iter()
        .map(|mut r| {
            if bad.contains(&r.dst) {
                r.via = Ipv4Addr::new(224, 0, 0, 9);
            }
            r
        })
        .collect();
    let err = reconcile(&nl, &plan).await.unwrap_err();
    let vxmesh::dataplane::ReconcileError::Apply(apply) = &err else {
        panic!("an ApplyError: {err}");
    };
    let errors = &apply.report.errors;
    assert_eq!(errors.len(), 2, "{errors:#?}");
    for (e, dst) in errors.iter().zip(&bad) {
        let text = e.to_string();
        assert!(
            text.contains("route") && text.contains(&dst.to_string()) && text.contains("224.0.0.9"),
            "{e} should name route {dst}"
        );
        // The typed error carries the change and the kernel's errno.
        assert!(
            matches!(e.change(), Some(vxmesh::dataplane::diff::Change::ReplaceRoute { route }) if route.dst == *dst),
            "{e:?}"
        );
        assert!(e.kernel().is_some_and(|k| k.errno > 0), "{e:?}");
    }
    let st = nl.dump().await.unwrap();
    assert_eq!(owned(&st), (N as usize - 2, N as usize, N as usize));
    for dst in &bad {
        assert!(
            !st.routes.iter().any(|r| r.dst == *dst),
            "{dst} was applied"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_removes_what_vxmesh_owns_and_nothing_else() {
    let t = TestNs::new("down");
    let nl = underlay(&t).await;
    let mut both = routed(0..3);
    let b = bridged();
    both.links.extend(b.links);
    both.neighbours.extend(b.neighbours);
    both.fdb.extend(b.fdb);
    converge(&nl, &both).await;
    // Things that are not the reconciler's: a foreign vxm- device, a
    // container veth made by attach, another device, a non-86 route.
    t.ip(&["link", "add", "vxm-mine", "type", "bridge"]);
    nl.create_veth("vxm-0123456789", "ceth0", None, 1450)
        .await
        .unwrap();
    nl.set_link(
        "vxm-0123456789",
        LinkOptions {
            master: Some("vxm-br0".into()),
            alias: Some("vxmesh:veth:demo:eth0:c1".into()),
            up: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    nl.add_route(
        "10.99.0.0/16".parse().unwrap(),
        Some("198.18.0.254".parse().unwrap()),
        "eth0",
        false,
        None,
    )
    .await
    .unwrap();
    // The container veth does not make the reconciler act.
    assert_eq!(reconcile(&nl, &both).await.unwrap().changes, 0);

    let rep = nl.teardown().await.unwrap();
    assert_eq!(
        rep.links_deleted,
        vec!["vxm-br0", "vxm-br200", "vxm-vx100", "vxm-vx200"]
    );
    assert_eq!(rep.routes_deleted, 3);
    assert!(rep.errors.is_empty());
    assert_eq!(rep.skipped.len(), 2, "{:?}", rep.skipped);
    assert_eq!(t.ip(&["route", "show", "proto", "86"]), "");
    let links = t.ip(&["-o", "link", "show"]);
    for gone in ["vxm-br0", "vxm-br200", "vxm-vx100", "vxm-vx200"] {
        assert!(
            !links.contains(&format!(" {gone}:")) && !links.contains(&format!(" {gone}@")),
            "{gone} left:\n{links}"
        );
    }
    for kept in ["vxm-mine", "vxm-0123456789", "ceth0", "eth0", "eth1"] {
        assert!(
            links.contains(&format!(" {kept}:")) || links.contains(&format!(" {kept}@")),
            "{kept} missing:\n{links}"
        );
    }
    assert!(
        t.ip(&["route", "show"])
            .contains("10.99.0.0/16 via 198.18.0.254 dev eth0")
    );
    // Idempotent.
    let again = nl.teardown().await.unwrap();
    assert!(again.links_deleted.is_empty() && again.routes_deleted == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_link_operations() {
    let host = TestNs::new("ops-h");
    let cont = TestNs::new("ops-c");
    let nl = host.nl().await;
    let cnl = cont.nl().await;
    assert!(nl.namespace().contains(host.name()));

    // Veth whose peer is born in the container namespace.
    nl.create_veth("vxm-h1", "eth0", Some(&cont.ns), 1400)
        .await
        .unwrap();
    assert!(
        nl.link_index("eth0").await.unwrap().is_none(),
        "peer never appears here"
    );
    let peer = cnl.expect_link("eth0").await.unwrap();
    assert_eq!((peer.mtu, peer.kind.as_deref()), (1400, Some("veth")));
    let err = nl
        .create_veth("vxm-h1", "eth1", Some(&cont.ns), 1400)
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("vxm-h1")
            && msg.contains("eth1")
            && msg.contains(cont.name())
            && msg.contains(host.name()),
        "{msg}"
    );

    // A bridge and port options.
    let mac: Mac = "0e:00:00:00:00:01".parse().unwrap();
    nl.create_bridge("vxm-brx", 1400, Some(mac), Some("vxmesh:net:x"))
        .await
        .unwrap();
    nl.set_link(
        "vxm-h1",
        LinkOptions {
            master: Some("vxm-brx".into()),
            alias: Some("vxmesh:veth:x:eth0:c".into()),
            up: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    nl.set_bridge_port_learning("vxm-h1", false).await.unwrap();
    assert!(
        host.bridge(&["-d", "link", "show", "dev", "vxm-h1"])
            .contains("learning off")
    );
    let links = nl.list_links().await.unwrap();
    let br = links.iter().find(|l| l.name == "vxm-brx").unwrap();
    let h1 = links.iter().find(|l| l.name == "vxm-h1").unwrap();
    assert_eq!(
        (br.mtu, br.mac, br.alias.as_deref(), br.kind.as_deref()),
        (1400, Some(mac), Some("vxmesh:net:x"), Some("bridge"))
    );
    assert_eq!(
        (h1.master, h1.up, h1.alias.as_deref()),
        (Some(br.index), true, Some("vxmesh:veth:x:eth0:c"))
    );
    nl.set_link(
        "vxm-h1",
        LinkOptions {
            nomaster: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(nl.get_link("vxm-h1").await.unwrap().unwrap().master, None);
    let err = nl
        .set_link(
            "vxm-h1",
            LinkOptions {
                master: Some("nope".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("device nope does not exist"),
        "{err:#}"
    );

    // Container side: mac, mtu, up, address (twice), routes, facts.
    let cmac = container_mac("172.18.10.5".parse().unwrap());
    cnl.set_link(
        "eth0",
        LinkOptions {
            mac: Some(cmac),
            mtu: Some(1300),
            up: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr: Ipv4Net = "172.18.10.5/24".parse().unwrap();
    cnl.add_address("eth0", addr).await.unwrap();
    cnl.add_address("eth0", addr).await.unwrap();
    let default: Ipv4Net = "0.0.0.0/0".parse().unwrap();
    let gw: Ipv4Addr = "172.18.10.1".parse().unwrap();
    cnl.add_route(default, Some(gw), "eth0", false, None)
        .await
        .unwrap();
    cnl.add_route(default, Some(gw), "eth0", false, None)
        .await
        .unwrap();
    let facts = cnl.interface_facts("eth0").await.unwrap().unwrap();
    assert!(
        facts.up && facts.addresses == vec![addr] && facts.mac == Some(cmac) && facts.mtu == 1300
    );
    assert!(
        facts.routes.contains(&(default, Some(gw))),
        "{:?}",
        facts.routes
    );
    assert!(cnl.interface_facts("nope").await.unwrap().is_none());
    let onlink: Ipv4Net = "10.1.0.0/16".parse().unwrap();
    cnl.add_route(
        onlink,
        Some("192.0.2.1".parse().unwrap()),
        "eth0",
        true,
        Some(86),
    )
    .await
    .unwrap();
    assert!(
        cont.ip(&["route", "show", "proto", "86"])
            .contains("10.1.0.0/16 via 192.0.2.1 dev eth0 onlink")
    );

    // Rename (down), move to another namespace, delete (missing is fine).
    cnl.set_link(
        "eth0",
        LinkOptions {
            up: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    cnl.rename_link("eth0", "eth5").await.unwrap();
    assert!(cnl.link_index("eth5").await.unwrap().is_some());
    cnl.move_link_to_ns("eth5", &host.ns).await.unwrap();
    assert!(cnl.link_index("eth5").await.unwrap().is_none());
    assert!(nl.link_index("eth5").await.unwrap().is_some());
    nl.delete_link("vxm-h1").await.unwrap();
    nl.delete_link("vxm-h1").await.unwrap();
    assert!(
        nl.link_index("eth5").await.unwrap().is_none(),
        "peer went with it"
    );
    let err = nl.rename_link("nope", "x").await.unwrap_err();
    assert!(format!("{err:#}").contains("device nope does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_reasons_reach_errors_and_half_created_devices_are_adopted() {
    let t = TestNs::new("adopt");
    let nl = underlay(&t).await;
    let plan = routed(0..2);
    // Another vxlan device already uses VNI 100 on port 4789: the kernel's
    // own explanation (extended ack) is in the error.
    t.ip(&[
        "link",
        "add",
        "other100",
        "type",
        "vxlan",
        "id",
        "100",
        "dstport",
        "4789",
        "local",
        "198.18.0.1",
        "dev",
        "eth0",
    ]);
    let err = reconcile(&nl, &plan).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("create vxlan vxm-vx100") && msg.contains("VNI"),
        "{msg}"
    );
    println!("{msg}");
    t.ip(&["link", "del", "other100"]);
    t.ip(&["link", "del", "vxm-br0"]);
    // A VTEP created but never labelled (vxmesh killed between the two
    // requests): planned kind and derived MAC, no alias. Adopted, not refused.
    let mac = vtep_mac(vni(100), LOCAL).to_string();
    t.ip(&[
        "link",
        "add",
        "vxm-vx100",
        "address",
        &mac,
        "type",
        "vxlan",
        "id",
        "100",
        "dstport",
        "4789",
        "local",
        "198.18.0.1",
        "dev",
        "eth0",
        "nolearning",
    ]);
    let r = reconcile(&nl, &plan).await.unwrap();
    assert!(
        r.lines()
            .iter()
            .any(|c| c.starts_with("set link vxm-vx100") && c.contains("alias vxmesh:net:demo")),
        "{:#?}",
        r.lines()
    );
    converge(&nl, &plan).await;
    assert_eq!(counts(&t, "vxm-vx100"), (2, 2, 2));
}
