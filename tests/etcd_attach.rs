//! The etcd store as the agent and attach use it: address claims bound to
//! the agent's lease (over TLS), endpoint sync, lease re-grant, leave, and
//! several networks per node. Each test runs a throwaway etcd and all its
//! clients inside a fresh network namespace (root), never in the root one.

mod common_etcd;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common_etcd::EtcdServer;
use vxmesh::config::{Mode, Network};
use vxmesh::dataplane::NetworkState;
use vxmesh::dataplane::netns::NetnsGuard;
use vxmesh::ipam::{Ipam, Owner};
use vxmesh::model::{Vni, container_mac};
use vxmesh::state::{self, EtcdSection, ServedNetwork};
use vxmesh::store::etcd::{self, ClientOptions, EtcdNetworks, EtcdOptions, TlsOptions};
use vxmesh::store::{AddressAllocator, Allocator, AllocatorSpec, Snapshot, Store, StoreError};

const PREFIX: &str = "/vxmesh";

/// Run `f` inside a fresh network namespace, removed afterwards (also when
/// `f` fails or panics): the etcd server it starts and every client live there.
fn in_fresh_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let guard = NetnsGuard::create(&common_etcd::unique_ns("ea")).unwrap();
    let ns = guard.open().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(ns.run_async(f)) {
        panic!("{e:#}");
    }
}

fn bridged(name: &str, vni: u32) -> Network {
    Network {
        outbound_nat: true,
        name: name.into(),
        mode: Mode::Bridged,
        cidr: "10.30.0.0/24".parse().unwrap(),
        subnet_len: 28,
        vni: Vni::new(vni).unwrap(),
        port: 4789,
        mtu: None,
        gateway: None,
        encrypt: false,
    }
}

fn routed(name: &str, vni: u32) -> Network {
    Network {
        outbound_nat: true,
        name: name.into(),
        mode: Mode::Routed,
        cidr: "172.18.0.0/16".parse().unwrap(),
        subnet_len: 24,
        vni: Vni::new(vni).unwrap(),
        port: 4789,
        mtu: None,
        gateway: None,
        encrypt: false,
    }
}

fn opts(srv: &EtcdServer, node: &str, i: u8) -> EtcdOptions {
    let mut o = EtcdOptions::new(
        srv.endpoints(),
        "unused",
        node,
        Ipv4Addr::new(198, 18, 0, i),
    );
    o.ttl = Duration::from_secs(2);
    o
}

async fn wait_for(store: &mut EtcdNetworks, pred: impl Fn(&Snapshot) -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if pred(&store.snapshot().await.unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// What the store names for attach in `network`: etcd, with its section
/// (what the agent writes into the network's state file).
fn section(store: &EtcdNetworks, network: &str) -> EtcdSection {
    match store.allocator(network) {
        AllocatorSpec::Etcd(sec) => *sec,
        AllocatorSpec::Local => panic!("network {network} allocates locally, not in etcd"),
    }
}

fn has_endpoint(s: &Snapshot, ip: Ipv4Addr, node: &str) -> bool {
    s.endpoints
        .iter()
        .flatten()
        .any(|e| e.ip == ip && e.node == node)
}

#[test]
fn attach_claims_are_lease_bound_exclusive_and_migrate_over_tls() {
    in_fresh_netns(|| async {
        let (srv, files) = EtcdServer::start_tls().await;
        let tls = TlsOptions {
            ca: files.ca.clone(),
            cert: Some(files.client_cert.clone()),
            key: Some(files.client_key.clone()),
        };
        let mut co = ClientOptions::new(srv.endpoints());
        co.tls = Some(tls.clone());
        etcd::create_network(&co, PREFIX, &bridged("seg", 300), None).await?;
        let join = |node: &str, i: u8| {
            let mut o = opts(&srv, node, i);
            o.tls = Some(tls.clone());
            async move { EtcdNetworks::join(&o, &["seg".to_string()], None).await }
        };
        let a = join("a", 1).await?;
        let mut b = join("b", 2).await?;

        // What the agent writes for attach: paths and the lease, no secrets.
        let sa = section(&a, "seg");
        assert_eq!(sa.ca.as_ref(), Some(&files.ca));
        assert_eq!(sa.cert.as_ref(), Some(&files.client_cert));
        assert_eq!(sa.lease, a.stores()[0].lease_id());
        assert_eq!((sa.node.as_str(), sa.network.as_str()), ("a", "seg"));
        let slice = a.stores()[0].subnet();

        // A free address from a's slice, bound to a's lease, seen by b.
        let ep = etcd::claim_address(&sa, None, slice.network()).await?;
        assert!(slice.contains(&ep.ip), "{} outside {slice}", ep.ip);
        assert_eq!((ep.node.as_str(), ep.mac), ("a", container_mac(ep.ip)));
        let key = format!("{PREFIX}/networks/seg/endpoints/{}", ep.ip);
        let mut raw = srv.client().await;
        let kv = raw.get(key.clone(), None).await?;
        assert_eq!(kv.kvs()[0].lease(), sa.lease, "bound to the agent's lease");
        assert!(wait_for(&mut b, |s| has_endpoint(s, ep.ip, "a")).await);
        // Two claims never get one address.
        let sb = section(&b, "seg");
        let other = etcd::claim_address(&sb, None, slice.network()).await?;
        assert_ne!(other.ip, ep.ip);

        // Asking again for its own address is fine; another node is refused.
        assert_eq!(
            etcd::claim_address(&sa, Some(ep.ip), slice.network())
                .await?
                .ip,
            ep.ip
        );
        let e = format!(
            "{:#}",
            etcd::claim_address(&sb, Some(ep.ip), slice.network())
                .await
                .unwrap_err()
        );
        assert!(e.contains("is attached on node a"), "{e}");
        let e = format!(
            "{:#}",
            etcd::claim_address(&sb, Some("10.30.0.255".parse()?), slice.network())
                .await
                .unwrap_err()
        );
        assert!(e.contains("broadcast"), "{e}");

        // Release: only the holder's counts; idempotent.
        etcd::release_address(&sb, ep.ip).await?;
        assert_eq!(
            raw.get(key.clone(), None).await?.kvs().len(),
            1,
            "b cannot release a's address"
        );
        etcd::release_address(&sa, ep.ip).await?;
        etcd::release_address(&sa, ep.ip).await?;
        assert!(raw.get(key.clone(), None).await?.kvs().is_empty());
        // Migration: the address is free, b takes it.
        let moved = etcd::claim_address(&sb, Some(ep.ip), slice.network()).await?;
        assert_eq!(moved.node, "b");
        assert_eq!(raw.get(key, None).await?.kvs()[0].lease(), sb.lease);
        Ok(())
    });
}

#[test]
fn agent_sync_adopts_withdraws_and_republishes_under_a_new_lease() {
    in_fresh_netns(|| async {
        let srv = EtcdServer::start().await;
        let co = ClientOptions::new(srv.endpoints());
        etcd::create_network(&co, PREFIX, &bridged("seg", 300), None).await?;
        let nets = ["seg".to_string()];
        let mut a = EtcdNetworks::join(&opts(&srv, "a", 1), &nets, None).await?;
        let mut b = EtcdNetworks::join(&opts(&srv, "b", 2), &nets, None).await?;
        let sa = section(&a, "seg");
        let start = a.stores()[0].subnet().network();

        // Attach (another process) claimed two addresses; the node's IPAM
        // records one of them (the other's attach died before recording it).
        let kept = etcd::claim_address(&sa, None, start).await?;
        let orphan = etcd::claim_address(&sa, None, start).await?;
        assert!(wait_for(&mut a, |s| has_endpoint(s, orphan.ip, "a")).await);
        a.sync_endpoints("seg", &BTreeSet::from([kept.ip])).await?;
        let own: Vec<Ipv4Addr> = a.stores()[0]
            .own_endpoints()
            .await
            .iter()
            .map(|e| e.ip)
            .collect();
        assert_eq!(own, [kept.ip], "adopted what the IPAM holds");
        assert!(
            wait_for(&mut b, |s| has_endpoint(s, kept.ip, "a")
                && !has_endpoint(s, orphan.ip, "a"))
            .await,
            "orphan withdrawn"
        );

        // The lease vanishes behind the agent's back: it gets a new one and
        // re-publishes the adopted endpoint; a claim with the old lease fails
        // recognisably (attach then reads the new one from the state file).
        let mut raw = srv.client().await;
        raw.lease_revoke(sa.lease).await?;
        let t0 = Instant::now();
        while a.stores()[0].lease_id() == sa.lease && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(a.stores()[0].lease_id(), sa.lease, "lease re-granted");
        assert!(
            wait_for(&mut b, |s| has_endpoint(s, kept.ip, "a")).await,
            "re-published"
        );
        let e = etcd::claim_address(&sa, None, start).await.unwrap_err();
        assert!(
            matches!(e, StoreError::LeaseGone { lease } if lease == sa.lease),
            "{e:#}"
        );
        let sa2 = section(&a, "seg");
        assert_ne!(sa2.lease, sa.lease);
        let again = etcd::claim_address(&sa2, None, start).await?;
        // As for the orphan above: the agent's pass works from its view, so
        // the claim must have reached it (a later pass would withdraw it).
        assert!(wait_for(&mut a, |s| has_endpoint(s, again.ip, "a")).await);

        // Detached everywhere: sync withdraws all of a's endpoints.
        a.sync_endpoints("seg", &BTreeSet::new()).await?;
        assert!(
            wait_for(&mut b, |s| !s
                .endpoints
                .iter()
                .flatten()
                .any(|e| e.node == "a"))
            .await,
            "{:?} and {} left",
            kept.ip,
            again.ip
        );

        // An operator's leave removes b at once; twice is fine.
        assert!(etcd::leave_node(&co, PREFIX, "seg", "b").await?);
        assert!(wait_for(&mut a, |s| s.cluster.node("b").is_none()).await);
        drop(b);
        assert!(!etcd::leave_node(&co, PREFIX, "seg", "b").await?);
        Ok(())
    });
}

#[test]
fn attach_allocator_claims_records_releases_and_follows_a_renewed_lease() {
    in_fresh_netns(|| async {
        let srv = EtcdServer::start().await;
        let co = ClientOptions::new(srv.endpoints());
        etcd::create_network(&co, PREFIX, &bridged("seg", 300), None).await?;
        let nets = ["seg".to_string()];
        let a = EtcdNetworks::join(&opts(&srv, "a", 1), &nets, None).await?;
        let mut b = EtcdNetworks::join(&opts(&srv, "b", 2), &nets, None).await?;
        let slice = a.stores()[0].subnet();
        // What the agent publishes for attach: the network and its allocator.
        let dir = tempfile::tempdir()?;
        let served = |allocator: AllocatorSpec| ServedNetwork {
            node: "a".into(),
            state: NetworkState {
                network: "seg".into(),
                mode: Mode::Bridged,
                vni: Vni::new(300).unwrap(),
                bridge: "vxm-br300".into(),
                vtep: "vxm-vx300".into(),
                mtu: 1450,
                subnet: "10.30.0.0/24".parse().unwrap(),
                pool: slice,
                gateway: None,
            },
            confirmed_at: 0,
            allocator,
        };
        state::write_network(dir.path(), &served(a.allocator("seg")))?;
        let owner = |c: &str| Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
        };
        let read = || state::read_network(dir.path(), "seg").unwrap();
        let first = read();
        let alloc = Allocator::for_network(dir.path(), &first, None);
        assert!(matches!(alloc, Allocator::Etcd(_)), "bridged on etcd");

        // A claim from the node's slice, published in etcd under a's lease
        // and recorded in the file IPAM; the same owner gets it again.
        let ip = alloc.claim(&owner("c1"), None).await?;
        assert!(slice.contains(&ip), "{ip} outside {slice}");
        assert!(wait_for(&mut b, |s| has_endpoint(s, ip, "a")).await);
        let ipam = Ipam::new(dir.path(), "seg");
        assert_eq!(ipam.find(&owner("c1"))?, Some(ip));
        assert_eq!(alloc.claim(&owner("c1"), None).await?, ip);
        // Another container cannot have it.
        let e = alloc.claim(&owner("c2"), Some(ip)).await.unwrap_err();
        assert!(
            matches!(e, StoreError::AllocatedHere { ip: i, .. } if i == ip),
            "{e:#}"
        );
        // Release: gone from the IPAM and from etcd; twice is fine.
        assert_eq!(alloc.release(&owner("c1")).await?, Some(ip));
        assert!(wait_for(&mut b, |s| !has_endpoint(s, ip, "a")).await);
        assert_eq!(alloc.release(&owner("c1")).await?, None);
        assert_eq!(ipam.find(&owner("c1"))?, None);

        // The lease vanishes: the claim waits for the agent to write the
        // renewed lease into the state file, and uses it.
        let old = section(&a, "seg").lease;
        srv.client().await.lease_revoke(old).await?;
        let agent = async {
            let t0 = Instant::now();
            while a.stores()[0].lease_id() == old && t0.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            state::write_network(dir.path(), &served(a.allocator("seg"))).unwrap();
        };
        let c3 = owner("c3");
        let (claimed, ()) = tokio::join!(alloc.claim(&c3, None), agent);
        let ip3 = claimed?;
        let renewed = section(&a, "seg").lease;
        assert_ne!(renewed, old, "lease re-granted");
        let key = format!("{PREFIX}/networks/seg/endpoints/{ip3}");
        let kv = srv.client().await.get(key, None).await?;
        assert_eq!(kv.kvs()[0].lease(), renewed, "bound to the renewed lease");

        // Routed networks and the static store allocate locally.
        let local = served(AllocatorSpec::Local);
        assert!(matches!(
            Allocator::for_network(dir.path(), &local, None),
            Allocator::Local(_)
        ));
        Ok(())
    });
}

#[test]
fn one_node_in_several_networks() {
    in_fresh_netns(|| async {
        let srv = EtcdServer::start().await;
        let co = ClientOptions::new(srv.endpoints());
        for n in [
            routed("r", 100),
            bridged("s", 200),
            routed("r2", 101),
            bridged("dup", 200),
        ] {
            etcd::create_network(&co, PREFIX, &n, None).await?;
        }
        let o = opts(&srv, "a", 1);
        let mut a = EtcdNetworks::join(&o, &["r".into(), "s".into()], None).await?;
        let snap = a.snapshot().await?;
        assert_eq!(
            snap.cluster
                .networks
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["r", "s"]
        );
        let me = snap.cluster.node("a").unwrap();
        assert_eq!(me.subnets.keys().collect::<Vec<_>>(), ["r", "s"]);
        assert!(
            a.allocator("r").is_local(),
            "routed networks allocate locally"
        );
        assert_eq!(section(&a, "s").network, "s");
        let mut b = EtcdNetworks::join(&opts(&srv, "b", 2), &["s".into()], None).await?;
        assert!(
            wait_for(&mut b, |s| s
                .cluster
                .node("a")
                .is_some_and(|n| n.subnets.len() == 1))
            .await
        );

        for (nets, want) in [
            (vec!["r", "r2"], "a node serves one routed network"),
            (vec!["s", "dup"], "both use VNI 200"),
            (vec!["s", "s"], "given twice"),
            (vec!["nope"], "network nope does not exist"),
        ] {
            let nets: Vec<String> = nets.into_iter().map(String::from).collect();
            let e = format!(
                "{:#}",
                EtcdNetworks::join(&opts(&srv, "c", 3), &nets, None)
                    .await
                    .err()
                    .unwrap()
            );
            assert!(e.contains(want), "{nets:?}: {e}");
        }
        // Leaving leaves every network at once.
        a.leave().await?;
        assert!(wait_for(&mut b, |s| s.cluster.node("a").is_none()).await);
        let left = srv
            .client()
            .await
            .get(format!("{PREFIX}/networks/r/nodes/a"), None)
            .await?;
        assert!(left.kvs().is_empty());
        Ok(())
    });
}
