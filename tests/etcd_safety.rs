//! The etcd store's two promises, through the production paths
//! ([`EtcdStore::join`], [`etcd::claim_address`]), concurrently and with
//! stale snapshots: no two nodes ever hold one subnet or address, and a
//! live node's records are never removed. One test per finding of issue
//! 19 that an integration test can reach (the others are unit tests next to
//! the code: lease renewal deadlines, re-list on a rewound history).
//! A throwaway one-member etcd on 127.0.0.1 per test (no root needed),
//! except the detach-on-loss test: a lab (agents, kernel, containers in
//! namespaces; root) with the invariant checker.

// Both load tests/common/naming.rs (the lab helpers and the etcd ones).
#[allow(clippy::duplicate_mod)]
mod common;
#[allow(clippy::duplicate_mod)]
mod common_etcd;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common_etcd::EtcdServer;
use etcd_client::Permission;
use vxmesh::config::Mode;
use vxmesh::store::etcd::{self, ClientOptions, EtcdStore};

use common_etcd::store::{PREFIX, TTL, join, network, opts, section, setup};
use vxmesh_lab::lab::LabStore;
use vxmesh_lab::lab::invariants::{CheckerOptions, InvariantChecker};

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Finding 1 (and issue 17 item 2): leases that vanish during joins (as
/// under overload, when they expire before the claim) must not fail the
/// join: it re-grants and claims again at once. 12 nodes join at once
/// while a "reaper" revokes the first 8 leases it sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_converge_when_leases_vanish_during_the_claim() {
    init();
    let srv = EtcdServer::start().await;
    let net = network("demo", Mode::Routed, "172.18.0.0/16", 24);
    setup(&srv, &net).await;
    let mut raw = srv.client().await;
    let revoked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reaper = {
        let (revoked, stop) = (revoked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            while !stop.load(Ordering::SeqCst) && revoked.load(Ordering::SeqCst) < 8 {
                if let Ok(l) = raw.leases().await {
                    for id in l.leases().iter().map(|l| l.id()) {
                        if seen.insert(id) && revoked.load(Ordering::SeqCst) < 8 {
                            let _ = raw.lease_revoke(id).await;
                            revoked.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let t0 = Instant::now();
    let metrics = vxmesh::metrics::Metrics::new();
    let joins = (0..12u32).map(|i| {
        let mut o = opts(&srv, &net, &format!("n{i}"), i);
        o.metrics = metrics.clone();
        async move { EtcdStore::join(o).await }
    });
    let results = futures::future::join_all(joins).await;
    stop.store(true, Ordering::SeqCst);
    reaper.await.unwrap();
    let n = revoked.load(Ordering::SeqCst);
    eprintln!(
        "12 joins with {n} leases revoked under them: {:?}",
        t0.elapsed()
    );
    assert!(n > 0, "the reaper revoked nothing: the test proves nothing");
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    assert!(failed.is_empty(), "joins failed: {failed:#?}");
    let stores: Vec<EtcdStore> = results.into_iter().map(Result::unwrap).collect();
    let subnets: BTreeSet<_> = stores.iter().map(|s| s.subnet()).collect();
    assert_eq!(subnets.len(), 12, "subnets are not distinct");
    // Every store's records are bound to a live lease (re-granted if the
    // reaper took it after the join).
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let mut raw = srv.client().await;
    for s in &stores {
        let key = format!("{PREFIX}/networks/demo/nodes/{}", s.node());
        let kv = raw.get(key.clone(), None).await.unwrap();
        assert_eq!(kv.kvs().len(), 1, "{key} vanished");
        assert_eq!(kv.kvs()[0].lease(), s.lease_id(), "{key}");
    }
    // Every revoked lease was noticed and re-granted (during the join, or
    // by the keeper after it), and counted: once per re-grant, which may
    // renew a node's two leases at once.
    let text = metrics.encode();
    let regrants: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("vxmesh_etcd_lease_regrants_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no re-grant counter: {text}"));
    eprintln!("{regrants} re-grants for {n} revoked leases");
    assert!(
        regrants >= 1 && regrants as usize <= n,
        "{regrants} re-grants for {n} revoked leases"
    );
}

/// Finding 2: a join that fails after finding this node's records (here:
/// its etcd user may not read the endpoints) leaves them as they were,
/// bound to the lease of the run that wrote them. (Before: the join
/// re-bound them to its new lease, failed, and revoked that lease: the
/// live node's claim and record vanished.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_join_leaves_the_live_nodes_records() {
    init();
    let srv = EtcdServer::start().await;
    let mut raw = srv.client().await;
    raw.user_add("root", "rootpw", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    // "limited" may use every key of the network but its endpoints.
    let root = format!("{PREFIX}/networks/seg/");
    raw.role_add("limited").await.unwrap();
    for (from, to) in [
        (format!("{root}config"), format!("{root}endpoints/")),
        (
            format!("{root}endpoints0"),
            format!("{PREFIX}/networks/seg0"),
        ),
    ] {
        raw.role_grant_permission("limited", Permission::read_write(from).with_range_end(to))
            .await
            .unwrap();
    }
    raw.user_add("limited", "limitedpw", None).await.unwrap();
    raw.user_grant_role("limited", "limited").await.unwrap();
    raw.auth_enable().await.unwrap();
    let root_user = Some(("root".to_string(), "rootpw".to_string()));
    let mut co = ClientOptions::new(srv.endpoints());
    co.user = root_user.clone();
    let net = network("seg", Mode::Bridged, "10.1.0.0/24", 28);
    etcd::create_network(&co, PREFIX, &net, None).await.unwrap();
    let mut o = opts(&srv, &net, "a", 1);
    o.user = root_user.clone();
    let a = EtcdStore::join(o.clone()).await.unwrap();

    // The same node joins again (a restart while the old run's lease is
    // alive) with a user that cannot read the endpoints: the join fails.
    o.user = Some(("limited".into(), "limitedpw".into()));
    let e = EtcdStore::join(o)
        .await
        .err()
        .expect("join with the limited user");
    eprintln!("expected error: {e:#}");
    let authed = etcd_client::Client::connect(
        srv.endpoints(),
        Some(etcd_client::ConnectOptions::new().with_user("root", "rootpw")),
    )
    .await
    .unwrap();
    for key in [
        format!("{root}nodes/a"),
        format!("{root}subnets/{}-28", a.subnet().network()),
    ] {
        let r = authed.kv_client().get(key.clone(), None).await.unwrap();
        assert_eq!(r.kvs().len(), 1, "{key} was deleted by the failed join");
        assert_eq!(r.kvs()[0].lease(), a.lease_id(), "{key} changed lease");
    }
}

/// Finding 3: a subnet freed by an expired lease is quarantined for a
/// grace period: another node cannot take it, its old holder gets it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_freed_by_lease_expiry_is_quarantined_for_its_holder() {
    init();
    let srv = EtcdServer::start().await;
    // Two subnets only.
    let net = network("tiny", Mode::Routed, "10.9.0.0/23", 24);
    setup(&srv, &net).await;
    let a = join(&srv, &net, "a", 1).await;
    let _b = join(&srv, &net, "b", 2).await;
    let held = a.subnet();
    a.crash();
    // a's node lease expires: its record and claim vanish.
    let mut raw = srv.client().await;
    let record = format!("{PREFIX}/networks/tiny/nodes/a");
    let t0 = Instant::now();
    while !raw
        .get(record.clone(), None)
        .await
        .unwrap()
        .kvs()
        .is_empty()
    {
        assert!(t0.elapsed() < TTL * 2, "a's record outlived its lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A newcomer cannot take the freed subnet during the grace period.
    let e = EtcdStore::join(opts(&srv, &net, "c", 3))
        .await
        .err()
        .expect("c joined while the only free subnet was quarantined");
    assert!(format!("{e:#}").contains("has no free /24"), "{e:#}");
    // a restarts (same name, same host) and gets its own subnet back.
    let a2 = join(&srv, &net, "a", 1).await;
    assert_eq!(a2.subnet(), held);
    eprintln!(
        "a re-took {held} {:?} after its record vanished",
        t0.elapsed()
    );
}

/// Finding 3, addresses: an address freed by an expired lease cannot be
/// claimed (by `claim_address`, as attach does) by another node during
/// the grace period, neither asked for nor picked as a free one; once the
/// grace has passed it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_freed_by_lease_expiry_is_quarantined() {
    init();
    let srv = EtcdServer::start().await;
    let net = network("seg", Mode::Bridged, "10.1.0.0/24", 28);
    setup(&srv, &net).await;
    let a = join(&srv, &net, "a", 1).await;
    let b = join(&srv, &net, "b", 2).await;
    let ep = etcd::claim_address(&section(&srv, &a), None, a.subnet().network())
        .await
        .unwrap();
    a.crash();
    let mut raw = srv.client().await;
    let key = format!("{PREFIX}/networks/seg/endpoints/{}", ep.ip);
    let t0 = Instant::now();
    while !raw.get(key.clone(), None).await.unwrap().kvs().is_empty() {
        assert!(t0.elapsed() < TTL * 2, "the endpoint outlived a's lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sec = section(&srv, &b);
    let e = etcd::claim_address(&sec, Some(ep.ip), ep.ip)
        .await
        .expect_err("b took an address quarantined for a");
    assert!(format!("{e:#}").contains("attached on node a"), "{e:#}");
    let other = etcd::claim_address(&sec, None, ep.ip).await.unwrap();
    assert_ne!(
        other.ip, ep.ip,
        "a free address search returned a quarantined one"
    );
    // After the grace period (the hold lease is 3 x TTL), it is free.
    let mut took = None;
    while t0.elapsed() < TTL * 4 {
        if let Ok(got) = etcd::claim_address(&sec, Some(ep.ip), ep.ip).await {
            took = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = took.expect("the address stayed quarantined past the grace period");
    assert_eq!(got.node, "b");
    eprintln!(
        "quarantine of {} ended {:?} after the endpoint vanished",
        ep.ip,
        t0.elapsed()
    );
}

/// Finding 6: two hosts with one node name (different underlay IPs) that
/// join at once never both pass: the identity check is part of the claim
/// transaction. Several rounds of 6 racing hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_with_one_name_never_both_join() {
    init();
    let srv = EtcdServer::start().await;
    let net = network("demo", Mode::Routed, "172.18.0.0/16", 24);
    setup(&srv, &net).await;
    for round in 0..5u32 {
        let name = format!("twin{round}");
        let joins = (0..6u32).map(|i| EtcdStore::join(opts(&srv, &net, &name, 10 * round + i)));
        let results = futures::future::join_all(joins).await;
        let ok: Vec<&EtcdStore> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            ok.len(),
            1,
            "round {round}: {} hosts joined as {name} (subnets {:?})",
            ok.len(),
            ok.iter().map(|s| s.subnet()).collect::<Vec<_>>()
        );
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                format!("{e:#}").contains("already registered"),
                "round {round}: {e:#}"
            );
        }
    }
}

/// Finding 7: attach skips the addresses its own node's allocator holds
/// (`claim_address_except`), instead of claiming one in etcd that it could
/// never record and failing on it at every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_addresses_held_by_the_local_allocator() {
    init();
    let srv = EtcdServer::start().await;
    let net = network("seg", Mode::Bridged, "10.1.0.0/24", 28);
    setup(&srv, &net).await;
    let a = join(&srv, &net, "a", 1).await;
    let start = a.subnet().network();
    let first = etcd::claim_address(&section(&srv, &a), None, start)
        .await
        .unwrap()
        .ip;
    etcd::release_address(&section(&srv, &a), first)
        .await
        .unwrap();
    // `first` is still in the node's IPAM (its etcd record was withdrawn).
    let local = BTreeSet::from([first]);
    let got = etcd::claim_address_except(&section(&srv, &a), None, start, &local)
        .await
        .unwrap();
    assert_ne!(got.ip, first);
}

/// Detach on loss (issue 19): host1 is cut off from etcd past its lease
/// TTL and the grace period, host2 then takes the address of host1's
/// container (a container attached there asking for it, as soon as the
/// quarantine lets it). When host1 comes back, its agent must stop serving
/// the address another node owns: the container is detached through the
/// production path (veth deleted, allocation released), said at error
/// level; host2's container works, and no address is used by two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_its_address_was_taken_detaches_that_container() {
    let mut s = common::spec("xa", 3, 1, Mode::Bridged, 1);
    s.store = LabStore::Etcd;
    s.ttl = TTL;
    let name = s.name.clone();
    {
        let mut lab = common::up(&s).await;
        let c1 = lab.container_on("host1").unwrap().clone();
        let host1 = lab.node("host1").unwrap().clone();
        let veth = vxmesh::attach::host_veth_name(&c1.network, &c1.name, "eth0");
        let has_veth = |ns: &str| !common::ip(ns, &["-o", "link", "show", "dev", &veth]).is_empty();
        assert!(has_veth(&host1.netns), "{veth} missing before the fault");
        lab.partition("host1", true, &[]).unwrap();
        let t0 = Instant::now();
        // The address is quarantined for host1 while its hold lease lives
        // (3 x TTL): host2 gets it only after that.
        let thief = loop {
            match lab
                .add_container("host2", &c1.network, "thief", Some(c1.ip))
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        t0.elapsed() < TTL * 6,
                        "host2 never got {} in {:?}: {e:#}",
                        c1.ip,
                        t0.elapsed()
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let taken_after = t0.elapsed();
        assert!(
            taken_after > TTL * 2,
            "host2 took {} {taken_after:?} into the partition: no quarantine",
            c1.ip
        );
        lab.heal_partition("host1").unwrap();
        let t1 = Instant::now();
        // Detach deletes the veth, then releases the allocation: wait for
        // the whole of it.
        let ipam = vxmesh::ipam::Ipam::new(&host1.state_dir, &c1.network);
        let detached = common::wait_until(TTL * 5, || {
            !has_veth(&host1.netns) && ipam.holder(c1.ip).ok() == Some(None)
        })
        .await;
        // The agent logs the detach once it is done: give the line a
        // moment after what it reports became visible.
        let logged = |l: &str| l.contains("THIS NODE LOST AN ADDRESS") && l.contains(&c1.name);
        let read_log = || std::fs::read_to_string(&host1.agent_log).unwrap();
        common::wait_until(Duration::from_secs(2), || read_log().lines().any(logged)).await;
        let log = read_log();
        assert!(
            detached.is_some(),
            "host1 still serves {} ({veth} there: {}, allocation: {:?}) {:?} after the heal, host2 owning it:\n{log}",
            c1.ip,
            has_veth(&host1.netns),
            ipam.holder(c1.ip),
            t1.elapsed()
        );
        assert_eq!(ipam.holder(c1.ip).unwrap(), None, "allocation kept");
        let line = log
            .lines()
            .find(|l| logged(l))
            .unwrap_or_else(|| panic!("no error line for {}:\n{log}", c1.name));
        assert!(line.contains("ERROR"), "{line}");
        assert!(
            line.contains("host2") && line.contains(&c1.ip.to_string()),
            "{line}"
        );
        println!(
            "detach on loss: host2 took {} {} ms into the partition; host1 detached {} {} ms after the heal",
            c1.ip,
            taken_after.as_millis(),
            c1.name,
            detached.unwrap().as_millis()
        );
        // The detached container's namespace goes (detach again: a no-op);
        // then the lab is checked as it stands.
        lab.remove_container(&c1.name).await.unwrap();
        let checker = InvariantChecker::start(&lab, CheckerOptions::new(TTL, &["host2", "host3"]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let report = checker.stop().await.unwrap();
        println!("{}", report.line("detach_on_loss"));
        assert!(report.samples >= 5, "too few samples:\n{report}");
        assert!(
            report.violations.is_empty(),
            "{} violations:\n{report}",
            report.violations.len()
        );
        let check = lab.check(Duration::from_secs(5)).unwrap();
        assert!(
            check.failures().is_empty(),
            "{} (host2's {}) unreachable:\n{}",
            thief.name,
            thief.ip,
            check.matrix()
        );
    }
    common::assert_all_gone(&name);
}
