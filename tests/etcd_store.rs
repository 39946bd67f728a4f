//! The etcd store against a real etcd (`/usr/bin/etcd` on 127.0.0.1, one
//! throwaway server per test). No root and no network namespace needed.

mod common_etcd;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common_etcd::EtcdServer;
use etcd_client::{Client, CompactionOptions, PutOptions};
use etcd_client::{ConnectOptions, GetOptions};
use ipnet::Ipv4Net;
use vxmesh::config::{Mode, Network};
use vxmesh::model::{Endpoint, container_mac};
use vxmesh::store::etcd::{self, ClientOptions, EtcdStore};
use vxmesh::store::{Snapshot, Store};

use common_etcd::store::{PREFIX, TTL, join, network, opts, section, setup, underlay};

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn routed() -> Network {
    network("demo", Mode::Routed, "172.18.0.0/16", 24)
}

fn bridged(cidr: &str, len: u8) -> Network {
    network("seg", Mode::Bridged, cidr, len)
}

/// Claim an address for a container on `store`'s node the way attach does:
/// `want`, else the first free one from the node's slice on.
async fn claim(srv: &EtcdServer, store: &EtcdStore, want: Option<Ipv4Addr>) -> Endpoint {
    try_claim(srv, store, want)
        .await
        .unwrap_or_else(|e| panic!("claim on {}: {e}", store.node()))
}

/// [`claim`], its error as text.
async fn try_claim(
    srv: &EtcdServer,
    store: &EtcdStore,
    want: Option<Ipv4Addr>,
) -> Result<Endpoint, String> {
    etcd::claim_address(&section(srv, store), want, store.subnet().network())
        .await
        .map_err(|e| format!("{e:#}"))
}

/// Withdraw an address the way detach does (only if `store`'s node holds it).
async fn release(srv: &EtcdServer, store: &EtcdStore, ip: Ipv4Addr) {
    etcd::release_address(&section(srv, store), ip)
        .await
        .unwrap_or_else(|e| panic!("release {ip} on {}: {e:#}", store.node()))
}

fn names(s: &Snapshot) -> Vec<String> {
    s.cluster.nodes.iter().map(|n| n.name.clone()).collect()
}

fn has_node(s: &Snapshot, name: &str) -> bool {
    s.cluster.node(name).is_some()
}

/// Poll the store's snapshot until `pred` holds; the time it took, or None.
async fn wait_for(
    store: &mut EtcdStore,
    timeout: Duration,
    pred: impl Fn(&Snapshot) -> bool,
) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if pred(&store.snapshot().await.unwrap()) {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Assert that the store's snapshot satisfies `pred` within `timeout`.
#[track_caller]
fn sees<'a>(
    store: &'a mut EtcdStore,
    timeout: Duration,
    pred: impl Fn(&Snapshot) -> bool + 'a,
) -> impl std::future::Future<Output = ()> + 'a {
    let caller = std::panic::Location::caller();
    async move {
        assert!(
            wait_for(store, timeout, pred).await.is_some(),
            "the store did not show the expected state within {timeout:?} (called at {caller})"
        );
    }
}

/// Encrypted networks are created with their secure underlay settings
/// (`vxmesh net create --encrypt --transport-cidr --wg-port`): the same
/// again is fine, other ones are refused, a second encrypted network takes
/// the first one's (and refuses others: a node has one secure underlay),
/// settings without `encrypt` are refused, and a joined node's snapshot
/// carries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_networks_share_their_secure_underlay_settings() {
    use vxmesh::secure::config::EncryptionFile;
    init();
    let srv = EtcdServer::start().await;
    let co = ClientOptions::new(srv.endpoints());
    let settings = |cidr: &str, port: u32| EncryptionFile {
        transport_cidr: Some(cidr.into()),
        port: Some(port),
    };
    let ours = settings("100.64.0.0/22", 51999);
    let mut secret = routed();
    secret.name = "secret".into();
    secret.encrypt = true;
    let err = |r: Result<(), vxmesh::store::StoreError>| format!("{:#}", r.unwrap_err());

    // Settings without `encrypt`, or invalid ones, name the field.
    let e = err(etcd::create_network(&co, PREFIX, &routed(), Some(&ours)).await);
    assert!(
        e.contains("not encrypted") && e.contains("--encrypt"),
        "{e}"
    );
    let e = err(
        etcd::create_network(&co, PREFIX, &secret, Some(&settings("100.64.0.0/31", 4789))).await,
    );
    assert!(
        e.contains("encryption.transport_cidr") && e.contains("/30 or shorter"),
        "{e}"
    );
    assert!(
        e.contains("encryption.port") && e.contains("VXLAN port"),
        "{e}"
    );
    assert_eq!(
        etcd::get_network(&co, PREFIX, "secret").await.unwrap(),
        None
    );

    etcd::create_network(&co, PREFIX, &secret, Some(&ours))
        .await
        .unwrap();
    etcd::create_network(&co, PREFIX, &secret, Some(&ours))
        .await
        .expect("the same settings again are fine");
    let stored = etcd::get_encryption(&co, PREFIX, "secret")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.transport.to_string(), "100.64.0.0/22");
    assert_eq!(stored.port, 51999);
    let e = err(etcd::create_network(
        &co,
        PREFIX,
        &secret,
        Some(&settings("100.64.0.0/22", 51998)),
    )
    .await);
    assert!(
        e.contains("network secret already exists with other secure underlay settings (port 51999 there, 51998 requested)"),
        "{e}"
    );
    let e = err(etcd::create_network(&co, PREFIX, &secret, None).await);
    assert!(
        e.contains("transport_cidr 100.64.0.0/22 there, 10.255.0.0/16 requested"),
        "{e}"
    );

    // A second encrypted network: other settings are refused, none takes
    // the first network's.
    let mut second = bridged("10.10.0.0/22", 28);
    second.name = "second".into();
    second.vni = vxmesh::model::Vni::new(201).unwrap();
    second.encrypt = true;
    let e = err(etcd::create_network(
        &co,
        PREFIX,
        &second,
        Some(&settings("100.65.0.0/16", 51999)),
    )
    .await);
    assert!(
        e.contains("encrypted network secret has other secure underlay settings (transport_cidr 100.64.0.0/22 there, 100.65.0.0/16 requested)"),
        "{e}"
    );
    assert_eq!(
        etcd::get_network(&co, PREFIX, "second").await.unwrap(),
        None
    );
    etcd::create_network(&co, PREFIX, &second, None)
        .await
        .unwrap();
    assert_eq!(
        etcd::get_encryption(&co, PREFIX, "second").await.unwrap(),
        Some(stored)
    );
    // A plain network has none.
    etcd::create_network(&co, PREFIX, &routed(), None)
        .await
        .unwrap();
    assert_eq!(
        etcd::get_encryption(&co, PREFIX, "demo").await.unwrap(),
        Some(Default::default())
    );

    // A node of the encrypted network sees them in its snapshot.
    let mut h1 = join(&srv, &secret, "h1", 1).await;
    sees(&mut h1, Duration::from_secs(5), move |s| {
        s.cluster.encryption == stored && !s.cluster.networks.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_network_is_idempotent_and_refuses_conflicts() {
    init();
    let srv = EtcdServer::start().await;
    let co = ClientOptions::new(srv.endpoints());
    let net = routed();
    etcd::create_network(&co, PREFIX, &net, None).await.unwrap();
    etcd::create_network(&co, PREFIX, &net, None)
        .await
        .expect("same settings again is fine");
    assert_eq!(
        etcd::get_network(&co, PREFIX, "demo").await.unwrap(),
        Some(net.clone())
    );

    let mut other = net.clone();
    other.cidr = "10.0.0.0/16".parse().unwrap();
    let e = format!(
        "{:#}",
        etcd::create_network(&co, PREFIX, &other, None)
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("network demo already exists with different settings"),
        "{e}"
    );
    assert!(
        e.contains("cidr 172.18.0.0/16 there, 10.0.0.0/16 requested")
            && e.ends_with("delete it first"),
        "{e}"
    );

    let mut bad = network("bad", Mode::Routed, "172.18.0.0/16", 24);
    bad.cidr = "172.18.0.1/16".parse().unwrap();
    let e = format!(
        "{:#}",
        etcd::create_network(&co, PREFIX, &bad, None)
            .await
            .unwrap_err()
    );
    assert!(e.contains("cidr: '172.18.0.1/16' has host bits set"), "{e}");
    assert_eq!(etcd::get_network(&co, PREFIX, "bad").await.unwrap(), None);
    let e = format!(
        "{:#}",
        etcd::create_network(&co, "vxmesh", &net, None)
            .await
            .unwrap_err()
    );
    assert!(e.contains("prefix"), "{e}");

    // Joining a missing network, or with bad options, says what to fix.
    let e = format!(
        "{:#}",
        EtcdStore::join(opts(&srv, &bad, "h1", 1))
            .await
            .err()
            .unwrap()
    );
    assert!(
        e.contains("network bad does not exist") && e.contains("create it first"),
        "{e}"
    );
    let mut o = opts(&srv, &net, "bad name", 1);
    o.underlay_ip = Ipv4Addr::LOCALHOST;
    o.ttl = Duration::from_millis(500);
    let e = format!("{:#}", EtcdStore::join(o).await.err().unwrap());
    assert!(
        e.contains("node: 'bad name' is not a valid node name"),
        "{e}"
    );
    assert!(
        e.contains("underlay_ip: 127.0.0.1 cannot carry VXLAN"),
        "{e}"
    );
    assert!(e.contains("ttl:"), "{e}");

    // Deleting refuses while nodes are registered.
    let h1 = join(&srv, &net, "h1", 1).await;
    let e = format!(
        "{:#}",
        etcd::delete_network(&co, PREFIX, "demo").await.unwrap_err()
    );
    assert!(e.contains("still has 1 node(s) (h1)"), "{e}");
    h1.leave().await.unwrap();
    etcd::delete_network(&co, PREFIX, "demo").await.unwrap();
    assert_eq!(etcd::get_network(&co, PREFIX, "demo").await.unwrap(), None);
    etcd::create_network(&co, PREFIX, &other, None)
        .await
        .expect("re-create with other settings after delete");
}

/// `n` nodes (`PREFIX00`, `PREFIX01`, ...) joining `net` at once.
async fn join_at_once(srv: &EtcdServer, net: &Network, prefix: &str, n: u32) -> Vec<EtcdStore> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let o = opts(srv, net, &format!("{prefix}{i:02}"), i);
            tokio::spawn(async move { EtcdStore::join(o).await })
        })
        .collect();
    let mut stores = Vec::new();
    for h in handles {
        stores.push(h.await.unwrap().expect("join"));
    }
    stores
}

/// Thirty nodes join at once into a cidr of 32 subnets: all list it
/// while it is empty and their hash-ordered first choices collide. A node
/// that loses a claim reads every claim back in the same transaction and
/// tries next a subnet free now, not its next candidate of the empty
/// listing (which, in a nearly full cidr, cost claim after lost claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_into_a_nearly_full_cidr_lose_few_claims() {
    init();
    let srv = EtcdServer::start().await;
    let net = network("demo", Mode::Routed, "172.18.0.0/19", 24);
    setup(&srv, &net).await;
    let before = srv.requests("Txn").await;
    let n = 30;
    let stores = join_at_once(&srv, &net, "host", n).await;
    let txns = srv.requests("Txn").await - before;
    let subnets: BTreeSet<Ipv4Net> = stores.iter().map(|s| s.subnet()).collect();
    assert_eq!(
        subnets.len(),
        n as usize,
        "subnets are not distinct: {subnets:?}"
    );
    // One transaction per claim: lost claims are the ones beyond n. Each
    // lost claim reading only its own key back lost 18 (48 transactions,
    // three runs); with the claims read back, 6-9.
    let lost = txns.saturating_sub(n as u64);
    eprintln!("{n} joins into 32 subnets: {txns} transactions, {lost} lost claims");
    assert!(
        lost <= 13,
        "{n} joins lost {lost} claims ({txns} transactions)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_joins_get_distinct_subnets() {
    init();
    let srv = EtcdServer::start().await;
    // 32 candidate /24s for 20 nodes: hash-ordered starts collide, CAS sorts it out.
    let net = network("demo", Mode::Routed, "172.18.0.0/19", 24);
    setup(&srv, &net).await;
    let t0 = Instant::now();
    let mut stores = join_at_once(&srv, &net, "node", 20).await;
    eprintln!("20 concurrent joins took {:?}", t0.elapsed());
    let subnets: BTreeSet<Ipv4Net> = stores.iter().map(|s| s.subnet()).collect();
    assert_eq!(subnets.len(), 20, "subnets are not distinct: {subnets:?}");
    assert!(
        subnets
            .iter()
            .all(|s| net.cidr.contains(s) && s.prefix_len() == 24),
        "{subnets:?}"
    );

    // Every store converges on the same 20 records.
    let mut first = stores.remove(0);
    let took = wait_for(&mut first, Duration::from_secs(3), |s| {
        s.cluster.nodes.len() == 20
    })
    .await;
    assert!(
        took.is_some(),
        "view has {:?}",
        names(&first.snapshot().await.unwrap())
    );
    let snap = first.snapshot().await.unwrap();
    let seen: BTreeSet<Ipv4Net> = snap
        .cluster
        .nodes
        .iter()
        .map(|n| n.subnets["demo"])
        .collect();
    assert_eq!(seen, subnets);
    assert_eq!(snap.cluster.networks, vec![net.clone()]);
    for s in stores.iter_mut() {
        sees(s, Duration::from_secs(3), |s| s.cluster.nodes.len() == 20).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_reuses_its_claim_and_outlives_the_old_lease() {
    init();
    let srv = EtcdServer::start().await;
    let net = routed();
    setup(&srv, &net).await;
    let mut obs = join(&srv, &net, "observer", 9).await;
    let a = join(&srv, &net, "a", 1).await;
    let (subnet, lease) = (a.subnet(), a.lease_id());
    a.crash(); // kill -9: claim and record stay until the lease expires

    let a2 = join(&srv, &net, "a", 1).await;
    assert_eq!(a2.subnet(), subnet, "a restarted node keeps its subnet");
    assert_ne!(a2.lease_id(), lease);

    // Another host may not take the name while it is alive.
    let e = format!(
        "{:#}",
        EtcdStore::join(opts(&srv, &net, "a", 5))
            .await
            .err()
            .unwrap()
    );
    assert!(
        e.contains("node a is already registered") && e.contains(&underlay(1).to_string()),
        "{e}"
    );
    let e = format!(
        "{:#}",
        EtcdStore::join(opts(&srv, &net, "z", 1))
            .await
            .err()
            .unwrap()
    );
    assert!(
        e.contains(&format!(
            "underlay IP {} is already used by node a",
            underlay(1)
        )),
        "{e}"
    );

    // The old lease expires; the records now belong to the new one and stay.
    tokio::time::sleep(TTL + Duration::from_millis(1500)).await;
    let snap = obs.snapshot().await.unwrap();
    assert_eq!(
        snap.cluster.node("a").map(|n| n.subnets["demo"]),
        Some(subnet),
        "{:?}",
        names(&snap)
    );

    // After a graceful leave the subnet is free; the deterministic order gives it back.
    a2.leave().await.unwrap();
    let a3 = join(&srv, &net, "a", 1).await;
    assert_eq!(a3.subnet(), subnet);
}

/// An etcd that answers late (frozen for half the TTL) gets no new
/// keep-alive streams from a node with no other member to go to: the
/// renewals wait for their replies on the streams they have, and the
/// lease lives on. Reopening a stream per late reply is what made every
/// lease of 250 agents started at once expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_etcd_gets_no_new_keepalive_streams() {
    init();
    let srv = EtcdServer::start().await;
    let net = routed();
    setup(&srv, &net).await;
    let a = join(&srv, &net, "a", 1).await;
    // Both leases' streams open and a renewal answered on each.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let streams = srv.started("LeaseKeepAlive").await;
    assert!(streams >= 2, "{streams} keep-alive streams");
    let lease = a.lease_id();
    srv.freeze(true);
    tokio::time::sleep(TTL / 2).await;
    srv.freeze(false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = srv.started("LeaseKeepAlive").await;
    assert_eq!(
        after, streams,
        "keep-alive streams reopened while etcd was late"
    );
    // The same lease, not one granted anew after an expiry.
    assert_eq!(a.lease_id(), lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_node_vanishes_within_ttl() {
    init();
    let srv = EtcdServer::start().await;
    let net = routed();
    setup(&srv, &net).await;
    let mut b = join(&srv, &net, "b", 2).await;
    let a = join(&srv, &net, "a", 1).await;
    sees(&mut b, Duration::from_secs(1), |s| has_node(s, "a")).await;
    // Let a keep-alive renew the lease fully, then crash.
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.crash();
    // Its record vanishes when the lease expires; peers keep it for the
    // settle window (its quarantine marker lives on the hold lease), then
    // drop it.
    let settle = etcd::settle_window(TTL);
    let took = wait_for(&mut b, TTL + settle + Duration::from_secs(2), |s| {
        !has_node(s, "a")
    })
    .await;
    eprintln!("crashed node vanished after {took:?} (TTL {TTL:?}, settle {settle:?})");
    let took = took.expect("crashed node still in the view after TTL + settle + 2 s");
    assert!(
        took >= settle + Duration::from_millis(700),
        "vanished too early ({took:?}): not the lease expiry plus the settle window"
    );
    assert_eq!(names(&b.snapshot().await.unwrap()), ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_join_and_leave_within_a_second() {
    init();
    let srv = EtcdServer::start().await;
    let net = routed();
    setup(&srv, &net).await;
    let mut a = join(&srv, &net, "a", 1).await;
    a.snapshot().await.unwrap();

    let t0 = Instant::now();
    let b = join(&srv, &net, "b", 2).await;
    tokio::time::timeout(Duration::from_secs(1), a.changed())
        .await
        .expect("changed() within 1 s")
        .unwrap();
    let took = wait_for(&mut a, Duration::from_secs(1), |s| has_node(s, "b")).await;
    eprintln!(
        "join seen after {took:?} ({:?} including the join itself)",
        t0.elapsed()
    );
    assert!(took.is_some());
    let snap = a.snapshot().await.unwrap();
    let rec = snap.cluster.node("b").unwrap();
    assert_eq!(rec.underlay_ip, underlay(2));
    assert_eq!(rec.subnets["demo"], b.subnet());
    assert_eq!(snap.endpoints, Some(vec![]));

    let b_subnet = b.subnet();
    let t0 = Instant::now();
    b.leave().await.unwrap();
    let took = wait_for(&mut a, Duration::from_secs(1), |s| !has_node(s, "b")).await;
    eprintln!(
        "leave seen after {took:?} ({:?} including the revoke)",
        t0.elapsed()
    );
    assert!(took.is_some());
    // Removed at once: no claim, no record left.
    let mut raw = srv.client().await;
    let root = format!("{PREFIX}/networks/demo/");
    let left = raw.get(format!("{root}nodes/b"), None).await.unwrap();
    assert!(left.kvs().is_empty());
    let claim = raw
        .get(format!("{root}subnets/{}-24", b_subnet.network()), None)
        .await
        .unwrap();
    assert!(claim.kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_the_last_view_and_recovers() {
    init();
    let mut srv = EtcdServer::start().await;
    let net = routed();
    setup(&srv, &net).await;
    let mut a = join(&srv, &net, "a", 1).await;
    let b = join(&srv, &net, "b", 2).await;
    sees(&mut a, Duration::from_secs(1), |s| names(s) == ["a", "b"]).await;
    let before = a.snapshot().await.unwrap();

    srv.stop();
    let t0 = Instant::now();
    // A node starts joining while etcd is down (its agent retries).
    let c_opts = opts(&srv, &net, "c", 3);
    let c = tokio::spawn(async move {
        loop {
            match EtcdStore::join(c_opts.clone()).await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let mut saw_disconnect = false;
    while t0.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            a.snapshot().await.unwrap(),
            before,
            "the view must survive the outage"
        );
        saw_disconnect |= !a.connected();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_disconnect,
        "connected() never turned false during the outage"
    );

    srv.start_again().await;
    let t1 = Instant::now();
    let took = wait_for(&mut a, Duration::from_secs(15), |s| {
        names(s) == ["a", "b", "c"]
    })
    .await;
    eprintln!("after restart: the node that joined meanwhile seen after {took:?}");
    assert!(
        took.is_some(),
        "view after restart: {:?}",
        names(&a.snapshot().await.unwrap())
    );
    let c = c.await.unwrap();
    let t = Instant::now();
    while !a.connected() && t.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.connected());
    eprintln!("a reconnected {:?} after the restart", t1.elapsed());
    // b's records survived or were re-published, with the same subnet.
    let snap = a.snapshot().await.unwrap();
    assert_eq!(snap.cluster.node("b").unwrap().subnets["demo"], b.subnet());
    assert_ne!(c.subnet(), b.subnet());
    assert_ne!(c.subnet(), a.subnet());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_behind_a_watcher_is_recovered_by_relist() {
    init();
    let srv = EtcdServer::start().await;
    let net = routed();
    setup(&srv, &net).await;
    let mut a = join(&srv, &net, "a", 1).await;
    let b = join(&srv, &net, "b", 2).await;
    sees(&mut a, Duration::from_secs(1), |s| names(s) == ["a", "b"]).await;

    a.pause_watch(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _c = join(&srv, &net, "c", 3).await;
    b.leave().await.unwrap();
    let _d = join(&srv, &net, "d", 4).await;
    let mut raw = srv.client().await;
    let rev = raw
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert_eq!(
        names(&a.snapshot().await.unwrap()),
        ["a", "b"],
        "paused watcher is behind"
    );

    a.pause_watch(false);
    let took = wait_for(&mut a, Duration::from_secs(3), |s| {
        names(s) == ["a", "c", "d"]
    })
    .await;
    eprintln!("re-list after compaction took {took:?}");
    assert!(
        took.is_some(),
        "view: {:?}",
        names(&a.snapshot().await.unwrap())
    );
    assert!(a.relist_count() >= 1, "the watcher did not re-list");

    // And the watch keeps working after the re-list.
    let _e = join(&srv, &net, "e", 5).await;
    sees(&mut a, Duration::from_secs(1), |s| has_node(s, "e")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_skipped_and_valid_ones_keep_working() {
    init();
    let srv = EtcdServer::start().await;
    let net = bridged("10.1.0.0/24", 28);
    setup(&srv, &net).await;
    let mut a = join(&srv, &net, "a", 1).await;
    let b = join(&srv, &net, "b", 2).await;
    let root = format!("{PREFIX}/networks/seg/");
    let mut raw = srv.client().await;
    let put = |k: String, v: &str| (k, v.to_string());
    // b's join returns as soon as its claim is written; a sees it by watch.
    sees(&mut a, Duration::from_secs(1), |s| has_node(s, "b")).await;
    let snap = a.snapshot().await.unwrap();
    let slice = |n: &str| snap.cluster.node(n).unwrap().subnets["seg"].to_string();
    let (slice_a, slice_b) = (slice("a"), slice("b"));
    let junk = [
        // A node claiming this node's own slice, and another live claim.
        put(
            format!("{root}nodes/mine"),
            &format!(r#"{{"name":"mine","underlay_ip":"198.18.1.2","subnet":"{slice_a}"}}"#),
        ),
        put(
            format!("{root}nodes/theirs"),
            &format!(r#"{{"name":"theirs","underlay_ip":"198.18.1.3","subnet":"{slice_b}"}}"#),
        ),
        put(
            format!("{root}nodes/zero"),
            r#"{"name":"zero","underlay_ip":"0.0.0.0","subnet":"10.1.0.192/28"}"#,
        ),
        // Zero and broadcast MACs, an address outside the network.
        put(
            format!("{root}endpoints/10.1.0.70"),
            r#"{"network":"seg","ip":"10.1.0.70","mac":"00:00:00:00:00:00","node":"b"}"#,
        ),
        put(
            format!("{root}endpoints/10.1.0.71"),
            r#"{"network":"seg","ip":"10.1.0.71","mac":"ff:ff:ff:ff:ff:ff","node":"b"}"#,
        ),
        put(
            format!("{root}endpoints/10.9.0.5"),
            r#"{"network":"seg","ip":"10.9.0.5","mac":"02:42:0a:09:00:05","node":"b"}"#,
        ),
        put(format!("{root}nodes/badjson"), "{oops"),
        put(
            format!("{root}nodes/outside"),
            r#"{"name":"outside","underlay_ip":"198.18.1.1","subnet":"10.9.0.0/28"}"#,
        ),
        put(
            format!("{root}nodes/lo"),
            r#"{"name":"lo","underlay_ip":"127.0.0.1","subnet":"10.1.0.208/28"}"#,
        ),
        put(format!("{root}subnets/10.1.0.224-28"), "not a valid name!"),
        put(
            format!("{root}endpoints/10.1.0.77"),
            r#"{"network":"seg","ip":"10.1.0.77","mac":"01:00:5e:00:00:01","node":"b"}"#,
        ),
        put(
            format!("{root}endpoints/10.1.0.79"),
            r#"{"network":"seg","ip":"10.1.0.80","mac":"02:42:0a:01:00:50","node":"b"}"#,
        ),
        // The last one is valid: once it is seen, everything before it was processed.
        put(
            format!("{root}endpoints/10.1.0.78"),
            r#"{"network":"seg","ip":"10.1.0.78","mac":"02:42:0a:01:00:4e","node":"b"}"#,
        ),
    ];
    for (k, v) in junk {
        raw.put(k, v, Some(PutOptions::new())).await.unwrap();
    }
    let valid_ep = |s: &Snapshot| {
        s.endpoints
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.ip == Ipv4Addr::new(10, 1, 0, 78))
    };
    sees(&mut a, Duration::from_secs(1), valid_ep).await;
    let snap = a.snapshot().await.unwrap();
    assert_eq!(names(&snap), ["a", "b"]);
    assert_eq!(
        snap.cluster.node("a").unwrap().subnets["seg"].to_string(),
        slice_a
    );
    assert_eq!(
        snap.cluster.node("b").unwrap().subnets["seg"].to_string(),
        slice_b
    );
    let eps = snap.endpoints.unwrap();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(
        (eps[0].node.as_str(), eps[0].mac),
        ("b", container_mac(Ipv4Addr::new(10, 1, 0, 78)))
    );

    // Valid records keep flowing.
    let _c = join(&srv, &net, "c", 3).await;
    let ep = claim(&srv, &b, None).await;
    sees(&mut a, Duration::from_secs(1), |s| {
        has_node(s, "c") && s.endpoints.as_ref().unwrap().contains(&ep)
    })
    .await;
    // Fixing a bad record makes it count.
    raw.put(
        format!("{root}nodes/lo"),
        r#"{"name":"lo","underlay_ip":"198.18.1.9","subnet":"10.1.0.208/28"}"#,
        None,
    )
    .await
    .unwrap();
    sees(&mut a, Duration::from_secs(1), |s| has_node(s, "lo")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_concurrent_bridged_allocations_are_distinct() {
    init();
    let srv = EtcdServer::start().await;
    // 30 usable addresses, 3 nodes with /29 slices: allocations overflow the
    // slices and contend network-wide.
    let net = bridged("10.2.0.0/27", 29);
    setup(&srv, &net).await;
    let mut nodes = Vec::new();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        nodes.push(join(&srv, &net, n, i as u32).await);
    }
    let t0 = Instant::now();
    let srv = &srv;
    let claims = nodes
        .iter()
        .flat_map(|s| (0..10).map(move |_| try_claim(srv, s, None)));
    let results = futures::future::join_all(claims).await;
    eprintln!("30 concurrent claims took {:?}", t0.elapsed());
    let eps: Vec<Endpoint> = results.into_iter().map(|r| r.expect("claim")).collect();
    let ips: BTreeSet<Ipv4Addr> = eps.iter().map(|e| e.ip).collect();
    assert_eq!(ips.len(), 30, "addresses are not distinct: {ips:?}");
    for e in &eps {
        assert!(
            net.cidr.contains(&e.ip) && e.ip != net.cidr.network() && e.ip != net.cidr.broadcast(),
            "{e:?}"
        );
        assert_eq!(e.mac, container_mac(e.ip));
    }
    for (i, s) in nodes.iter().enumerate() {
        let on = eps[i * 10..(i + 1) * 10]
            .iter()
            .filter(|e| e.node == s.node());
        assert_eq!(on.count(), 10, "claims of node {} name it", s.node());
    }
    // Every claim is in etcd, bound to its node's lease.
    let mut raw = srv.client().await;
    for e in &eps {
        let key = format!("{PREFIX}/networks/seg/endpoints/{}", e.ip);
        let kv = raw.get(key.clone(), None).await.unwrap();
        let lease = nodes
            .iter()
            .find(|s| s.node() == e.node)
            .unwrap()
            .lease_id();
        assert_eq!(kv.kvs()[0].lease(), lease, "{key}");
    }
    let mut obs = nodes.remove(0);
    let all = |s: &Snapshot| s.endpoints.as_ref().unwrap().len() == 30;
    sees(&mut obs, Duration::from_secs(2), all).await;
    let e = try_claim(srv, &nodes[0], None).await.unwrap_err();
    assert!(e.contains("no free address left"), "{e}");

    // A released address can be claimed again; claiming an address this node
    // already holds returns it as is.
    let mine: Vec<&Endpoint> = eps.iter().filter(|e| e.node == "b").collect();
    assert_eq!(mine.len(), 10);
    release(srv, &nodes[0], mine[0].ip).await;
    let again = claim(srv, &nodes[1], Some(mine[0].ip)).await;
    assert_eq!((again.ip, again.node.as_str()), (mine[0].ip, "c"));
    assert_eq!(claim(srv, &nodes[1], Some(mine[0].ip)).await, again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_migrates_after_release() {
    init();
    let srv = EtcdServer::start().await;
    let net = bridged("10.1.0.0/24", 28);
    setup(&srv, &net).await;
    let routed_net = routed();
    setup(&srv, &routed_net).await;
    let mut obs = join(&srv, &net, "obs", 0).await;
    let a = join(&srv, &net, "a", 1).await;
    let b = join(&srv, &net, "b", 2).await;
    let ip = Ipv4Addr::new(10, 1, 0, 50);
    let ep = claim(&srv, &a, Some(ip)).await;
    assert_eq!((ep.ip, ep.node.as_str()), (ip, "a"));

    let moved = Endpoint {
        node: "b".into(),
        ..ep.clone()
    };
    let e = try_claim(&srv, &b, Some(ip)).await.unwrap_err();
    assert!(
        e.contains("10.1.0.50 of network seg is attached on node a: detach it there first"),
        "{e}"
    );

    release(&srv, &a, ip).await;
    let t0 = Instant::now();
    assert_eq!(claim(&srv, &b, Some(ip)).await, moved);
    assert_eq!(
        claim(&srv, &b, Some(ip)).await,
        moved,
        "claiming its own endpoint again is fine"
    );
    let on_b = |s: &Snapshot| s.endpoints.as_ref().unwrap() == &vec![moved.clone()];
    let took = wait_for(&mut obs, Duration::from_secs(1), on_b).await;
    eprintln!(
        "migrated endpoint seen after {took:?} ({:?} including publish)",
        t0.elapsed()
    );
    assert!(took.is_some());
    // A late release on the old node deletes nothing.
    release(&srv, &a, ip).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(on_b(&obs.snapshot().await.unwrap()));

    // Leaving removes the node's endpoints with it.
    b.leave().await.unwrap();
    sees(&mut obs, Duration::from_secs(1), |s| {
        s.endpoints.as_ref().unwrap().is_empty()
    })
    .await;

    // Routed networks have no network-wide endpoints.
    let r = join(&srv, &routed_net, "r", 3).await;
    let e = try_claim(&srv, &r, None).await.unwrap_err();
    assert!(e.contains("network demo is routed"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_is_regranted_and_records_republished() {
    init();
    let srv = EtcdServer::start().await;
    let net = bridged("10.1.0.0/24", 28);
    setup(&srv, &net).await;
    let mut obs = join(&srv, &net, "obs", 0).await;
    let metrics = vxmesh::metrics::Metrics::new();
    let mut o = opts(&srv, &net, "a", 1);
    o.metrics = metrics.clone();
    let mut a = EtcdStore::join(o).await.unwrap();
    // Attach claims an address; the agent's pass publishes what its IPAM
    // holds under the lease (so a re-granted lease re-publishes it).
    let ep = claim(&srv, &a, None).await;
    let refused = a.sync_endpoints(&BTreeSet::from([ep.ip])).await.unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(a.own_endpoints().await, vec![ep.clone()]);
    let (old_subnet, old_lease) = (a.subnet(), a.lease_id());
    sees(&mut obs, Duration::from_secs(1), |s| has_node(s, "a")).await;

    // The lease disappears (as when it expires during an outage) and another
    // node grabs the subnet before `a` notices.
    let mut raw = srv.client().await;
    let ranges_before = srv.requests("Range").await;
    raw.lease_revoke(old_lease).await.unwrap();
    raw.put(
        format!("{PREFIX}/networks/seg/subnets/{}-28", old_subnet.network()),
        "thief",
        None,
    )
    .await
    .unwrap();

    let t0 = Instant::now();
    let back = |s: &Snapshot| {
        s.cluster
            .node("a")
            .is_some_and(|n| n.subnets["seg"] != old_subnet)
            && s.endpoints.as_ref().unwrap().contains(&ep)
    };
    let took = wait_for(&mut obs, Duration::from_secs(5), back).await;
    eprintln!("records re-published under a new lease after {took:?}");
    assert!(
        took.is_some(),
        "observer view: {:?}",
        obs.snapshot().await.unwrap()
    );
    // The observer keeps a's endpoint through the settle window (its
    // quarantine marker names a), so it may see a back as soon as the new
    // record is there, before a re-published the endpoint and took the
    // new lease: wait for that.
    while a.lease_id() == old_lease && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(a.lease_id(), old_lease);
    assert_ne!(a.subnet(), old_subnet);
    assert_eq!(a.own_endpoints().await, vec![ep.clone()]);
    let own = a.snapshot().await.unwrap();
    assert_eq!(own.cluster.node("a").unwrap().subnets["seg"], a.subnet());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(a.connected());
    // The re-grant claimed from the watched view: no listing of the
    // network (at hundreds of nodes losing their leases at once, a list
    // each is what overloaded etcd further), neither counted by the
    // store nor seen by etcd (no Range request at all: the claim is a
    // transaction, the lease check a lease request).
    let ranges = srv.requests("Range").await - ranges_before;
    let text = metrics.encode();
    eprintln!("re-grant: {ranges} Range requests at etcd");
    assert!(
        text.contains("vxmesh_etcd_lease_regrants_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("vxmesh_etcd_lists_total{reason=\"join\"} 1\n")
            && text.contains("vxmesh_etcd_lists_total{reason=\"relist\"} 0\n"),
        "{text}"
    );
    assert_eq!(ranges, 0, "the re-grant read ranges from etcd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    init();
    let (srv, files) = EtcdServer::start_tls().await;
    let tls = etcd::TlsOptions {
        ca: files.ca.clone(),
        cert: Some(files.client_cert.clone()),
        key: Some(files.client_key.clone()),
    };
    let mut co = ClientOptions::new(srv.endpoints());
    co.tls = Some(tls.clone());
    let net = routed();
    etcd::create_network(&co, PREFIX, &net, None).await.unwrap();
    let mut o = opts(&srv, &net, "a", 1);
    o.tls = Some(tls.clone());
    let mut a = EtcdStore::join(o.clone()).await.unwrap();
    assert_eq!(names(&a.snapshot().await.unwrap()), ["a"]);

    // Without the client certificate the server refuses; the error says where.
    let mut no_cert = o.clone();
    no_cert.node = "b".into();
    no_cert.tls = Some(etcd::TlsOptions {
        ca: files.ca.clone(),
        cert: None,
        key: None,
    });
    let e = format!(
        "{:#}",
        tokio::time::timeout(Duration::from_secs(15), EtcdStore::join(no_cert))
            .await
            .unwrap()
            .err()
            .unwrap()
    );
    eprintln!("expected error: {e}");
    assert!(e.contains("etcd"), "{e}");
    // Plain http with TLS options is refused before connecting.
    let mut http = o.clone();
    http.endpoints = vec![srv.endpoint().replace("https", "http")];
    let e = format!("{:#}", EtcdStore::join(http).await.err().unwrap());
    assert!(e.contains("plain http but TLS options are set"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication() {
    init();
    let srv = EtcdServer::start().await;
    let mut raw = srv.client().await;
    raw.user_add("root", "rootpw", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();

    let net = routed();
    let mut co = ClientOptions::new(srv.endpoints());
    let e = format!(
        "{:#}",
        etcd::create_network(&co, PREFIX, &net, None)
            .await
            .unwrap_err()
    );
    eprintln!("expected error: {e}");
    assert!(e.contains("etcd"), "{e}");
    co.user = Some(("root".into(), "rootpw".into()));
    assert!(
        !format!("{co:?}").contains("rootpw"),
        "password leaked into Debug output"
    );
    etcd::create_network(&co, PREFIX, &net, None).await.unwrap();
    let mut o = opts(&srv, &net, "a", 1);
    o.user = co.user.clone();
    let mut a = EtcdStore::join(o.clone()).await.unwrap();
    let mut b_opts = opts(&srv, &net, "b", 2);
    b_opts.user = co.user.clone();
    let b = EtcdStore::join(b_opts).await.unwrap();
    sees(&mut a, Duration::from_secs(1), |s| names(s) == ["a", "b"]).await;
    b.leave().await.unwrap();
    sees(&mut a, Duration::from_secs(1), |s| names(s) == ["a"]).await;

    let mut wrong = o.clone();
    wrong.node = "c".into();
    wrong.user = Some(("root".into(), "nope".into()));
    let e = format!("{:#}", EtcdStore::join(wrong).await.err().unwrap());
    eprintln!("expected error: {e}");
    assert!(e.contains("authentication failed"), "{e}");
    let authed = Client::connect(
        srv.endpoints(),
        Some(ConnectOptions::new().with_user("root", "rootpw")),
    )
    .await
    .unwrap();
    let n = authed
        .kv_client()
        .get(
            format!("{PREFIX}/networks/demo/nodes/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(n.count(), 1);
}
