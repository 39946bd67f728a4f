//! The handlers over a state dir written as the agent writes it (no root,
//! no kernel: everything but Join and Leave).

use std::path::Path;

use serde_json::{Value, json};

use super::*;
use crate::config::Mode;
use crate::dataplane::NetworkState;
use crate::ipam::Ipam;
use crate::model::Vni;
use crate::state::ServedNetwork;

fn serve(dir: &Path, name: &str, mode: Mode, subnet: &str, pool: &str) {
    let subnet: Ipv4Net = subnet.parse().unwrap();
    let gateway = (mode == Mode::Routed).then(|| crate::dataplane::plan::gateway(subnet));
    let served = ServedNetwork {
        node: "a".into(),
        state: NetworkState {
            network: name.into(),
            mode,
            vni: Vni::new(100).unwrap(),
            bridge: "vxm-br0".into(),
            vtep: "vxm-vx100".into(),
            mtu: 1450,
            subnet,
            pool: pool.parse().unwrap(),
            gateway,
        },
        confirmed_at: 0,
        allocator: Default::default(),
    };
    state::write_network(dir, &served).unwrap();
}

async fn call(p: &Plugin, path: &str, body: Value) -> Reply {
    p.handle(path, body.to_string().as_bytes()).await
}

fn err_of(r: &Reply, key: &str) -> String {
    r.body
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {key} in {}", r.body))
        .to_string()
}

#[tokio::test]
async fn activation_and_capabilities() {
    let d = tempfile::tempdir().unwrap();
    let p = Plugin::new(d.path());
    let r = p.handle("/Plugin.Activate", b"").await;
    assert_eq!(
        r.body,
        json!({"Implements": ["NetworkDriver", "IpamDriver"]})
    );
    let r = p.handle("/NetworkDriver.GetCapabilities", b"").await;
    assert_eq!(r.body["Scope"], "local");
    let r = p.handle("/IpamDriver.GetDefaultAddressSpaces", b"").await;
    assert_eq!(r.body["LocalDefaultAddressSpace"], "vxmesh");
    for path in [
        "/NetworkDriver.DiscoverNew",
        "/NetworkDriver.DiscoverDelete",
    ] {
        assert_eq!(
            p.handle(path, b"{}").await,
            Reply {
                status: 200,
                body: json!({})
            }
        );
    }
    assert_eq!(
        p.handle("/NetworkDriver.Frobnicate", b"{}").await.status,
        404
    );
    let r = p.handle("/NetworkDriver.CreateNetwork", b"{not json").await;
    assert!(err_of(&r, "Err").contains("cannot decode"), "{r:?}");
}

#[tokio::test]
async fn pools_follow_the_served_networks() {
    let d = tempfile::tempdir().unwrap();
    let p = Plugin::new(d.path());
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"AddressSpace": "vxmesh"}),
    )
    .await;
    assert!(
        err_of(&r, "Error").contains("no vxmesh network is served"),
        "{r:?}"
    );
    serve(
        d.path(),
        "demo",
        Mode::Routed,
        "172.18.10.0/24",
        "172.18.10.0/24",
    );
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"AddressSpace": "vxmesh"}),
    )
    .await;
    let e = err_of(&r, "Error");
    assert!(
        e.contains("--subnet 172.18.10.0/24"),
        "routed needs --subnet: {e}"
    );
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Pool": "172.18.10.0/24"}),
    )
    .await;
    assert_eq!(
        r.body,
        json!({"PoolID": "vxmesh/demo", "Pool": "172.18.10.0/24", "Data": {}})
    );
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Pool": "10.9.0.0/16"}),
    )
    .await;
    let e = err_of(&r, "Error");
    assert!(e.contains("10.9.0.0/16") && e.contains("demo"), "{e}");
    serve(
        d.path(),
        "seg",
        Mode::Bridged,
        "10.40.0.0/24",
        "10.40.0.0/25",
    );
    let r = call(&p, "/IpamDriver.RequestPool", json!({})).await;
    let e = err_of(&r, "Error");
    assert!(
        e.contains("demo, seg") && e.contains("vxmesh.network"),
        "{e}"
    );
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Pool": "10.40.0.0/24"}),
    )
    .await;
    assert_eq!(r.body["PoolID"], "vxmesh/seg");
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Options": {"vxmesh.network": "seg"}}),
    )
    .await;
    assert_eq!(r.body["Pool"], "10.40.0.0/24");
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Options": {"vxmesh.network": "seg"}, "Pool": "172.18.10.0/24"}),
    )
    .await;
    let e = err_of(&r, "Error");
    assert!(
        e.contains("172.18.10.0/24") && e.contains("'seg'") && e.contains("10.40.0.0/24"),
        "{e}"
    );
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Options": {"vxmesh.network": "nope"}}),
    )
    .await;
    assert!(
        err_of(&r, "Error").contains("'nope' is not served"),
        "{r:?}"
    );
    let r = call(&p, "/IpamDriver.RequestPool", json!({"V6": true})).await;
    assert!(err_of(&r, "Error").contains("IPv4 only"));
    let r = call(
        &p,
        "/IpamDriver.RequestPool",
        json!({"Options": {"color": "red"}}),
    )
    .await;
    assert!(err_of(&r, "Error").contains("unknown option color"));
}

#[tokio::test]
async fn addresses_come_from_the_shared_allocator() {
    let d = tempfile::tempdir().unwrap();
    let p = Plugin::new(d.path());
    serve(
        d.path(),
        "demo",
        Mode::Routed,
        "172.18.10.0/24",
        "172.18.10.0/24",
    );
    // A CNI container holds .2 already.
    let ipam = Ipam::new(d.path(), "demo");
    let cni = Owner {
        container_id: "podman1".into(),
        ifname: "eth0".into(),
    };
    let served = state::read_network(d.path(), "demo").unwrap();
    ipam.allocate(&served.state, &cni, None).unwrap();
    let gw = call(
        &p,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "vxmesh/demo", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
    )
    .await;
    assert_eq!(gw.body["Address"], "172.18.10.1/24");
    let bad_gw = call(
        &p,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "vxmesh/demo", "Address": "172.18.10.9", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
    )
    .await;
    assert!(err_of(&bad_gw, "Error").contains("172.18.10.1"));
    let a = call(
        &p,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "vxmesh/demo"}),
    )
    .await;
    assert_eq!(
        a.body["Address"], "172.18.10.3/24",
        "skips the CNI container's .2"
    );
    let taken = call(
        &p,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "vxmesh/demo", "Address": "172.18.10.2"}),
    )
    .await;
    assert!(err_of(&taken, "Error").contains("172.18.10.2"), "{taken:?}");
    // The network and the endpoint: the address passes to the endpoint.
    let create = json!({
        "NetworkID": "n1",
        "Options": {"com.docker.network.generic": {"vxmesh.network": "demo"}},
        "IPv4Data": [{"AddressSpace": "vxmesh", "Pool": "172.18.10.0/24", "Gateway": "172.18.10.1/24"}],
    });
    assert_eq!(
        call(&p, "/NetworkDriver.CreateNetwork", create).await.body,
        json!({})
    );
    let ep = call(
        &p,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e1", "Interface": {"Address": "172.18.10.3/24"}}),
    )
    .await;
    assert_eq!(
        ep.body,
        json!({"Interface": {"MacAddress": "02:42:ac:12:0a:03"}})
    );
    assert_eq!(
        ipam.holder("172.18.10.3".parse().unwrap()).unwrap(),
        Some(endpoint_owner("e1"))
    );
    // Releasing: the endpoint's address goes; a CNI container's never does.
    for a in ["172.18.10.3", "172.18.10.2", "172.18.10.1"] {
        let r = call(
            &p,
            "/IpamDriver.ReleaseAddress",
            json!({"PoolID": "vxmesh/demo", "Address": a}),
        )
        .await;
        assert_eq!(r.body, json!({}), "{a}");
    }
    let left: Vec<_> = ipam.list().unwrap().into_iter().map(|a| a.owner).collect();
    assert_eq!(left, [cni]);
}

#[tokio::test]
async fn bad_networks_and_endpoints_are_refused_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = Plugin::new(d.path());
    serve(
        d.path(),
        "demo",
        Mode::Routed,
        "172.18.10.0/24",
        "172.18.10.0/24",
    );
    serve(
        d.path(),
        "seg",
        Mode::Bridged,
        "10.40.0.0/24",
        "10.40.0.0/25",
    );
    let net = |opts: Value, space: &str, pool: &str| {
        json!({
            "NetworkID": "n1",
            "Options": {"com.docker.network.generic": opts},
            "IPv4Data": [{"AddressSpace": space, "Pool": pool}],
        })
    };
    let cases = [
        (
            net(json!({}), "LocalDefault", "172.19.0.0/16"),
            "--ipam-driver",
        ),
        (
            net(json!({"vxmesh.network": "demo"}), "vxmesh", "10.40.0.0/24"),
            "vxmesh network 'seg'",
        ),
        (
            net(json!({"vxmesh.network": "demo"}), "vxmesh", "10.99.0.0/24"),
            "contradicts",
        ),
        (
            net(json!({"vxmesh.netwrok": "demo"}), "vxmesh", "10.40.0.0/24"),
            "unknown option",
        ),
        (
            net(json!({"vxmesh.network": "gone"}), "vxmesh", "10.40.0.0/24"),
            "'gone' is not served",
        ),
    ];
    for (req, want) in cases {
        let r = call(&p, "/NetworkDriver.CreateNetwork", req.clone()).await;
        let e = err_of(&r, "Err");
        assert!(e.contains(want), "{req}: {e}");
    }
    assert!(!d.path().join("docker/networks/n1.json").exists());
    let ok = net(json!({"vxmesh.network": "seg"}), "vxmesh", "10.40.0.0/24");
    assert_eq!(
        call(&p, "/NetworkDriver.CreateNetwork", ok).await.body,
        json!({})
    );
    let a = call(
        &p,
        "/IpamDriver.RequestAddress",
        json!({"PoolID": "vxmesh/seg"}),
    )
    .await;
    let addr = a.body["Address"].as_str().unwrap().to_string();
    let ep = call(
        &p,
        "/NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e1",
               "Interface": {"Address": addr, "MacAddress": "02:00:00:00:00:99"}}),
    )
    .await;
    assert!(err_of(&ep, "Err").contains("--mac-address"), "{ep:?}");
    let unknown = call(
        &p,
        "/NetworkDriver.Join",
        json!({"NetworkID": "zz", "EndpointID": "e1", "SandboxKey": "/x"}),
    )
    .await;
    assert!(err_of(&unknown, "Err").contains("unknown to this vxmesh plugin"));
    let no_addr = call(
        &p,
        "/NetworkDriver.Join",
        json!({"NetworkID": "n1", "EndpointID": "e9", "SandboxKey": "/x"}),
    )
    .await;
    assert!(err_of(&no_addr, "Err").contains("holds no address"));
    let del = call(
        &p,
        "/NetworkDriver.DeleteNetwork",
        json!({"NetworkID": "n1"}),
    )
    .await;
    assert_eq!(del.body, json!({}));
    assert!(!d.path().join("docker/networks/n1.json").exists());
}

#[test]
fn container_end_names_fit_and_avoid_the_reconcilers_prefix() {
    let n = network::container_end_name("demo", &"ab".repeat(32));
    assert!(n.len() <= 15 && n.starts_with("vxd"), "{n}");
}

/// ProgramExternalConnectivity publishes the sandbox's `-p` for the
/// endpoint's address; a second endpoint asking for the same host port
/// gets the error naming the port and its owner; Revoke removes them.
#[tokio::test]
async fn external_connectivity_publishes_and_revokes_ports() {
    let d = tempfile::tempdir().unwrap();
    let p = Plugin::new(d.path());
    serve(
        d.path(),
        "demo",
        Mode::Routed,
        "172.18.10.0/24",
        "172.18.10.0/24",
    );
    let create = json!({
        "NetworkID": "n1",
        "Options": {"com.docker.network.generic": {"vxmesh.network": "demo"}},
        "IPv4Data": [{"AddressSpace": "vxmesh", "Pool": "172.18.10.0/24"}],
    });
    assert_eq!(
        call(&p, "/NetworkDriver.CreateNetwork", create).await.body,
        json!({})
    );
    for (ep, addr) in [("e1", "172.18.10.5"), ("e2", "172.18.10.6")] {
        let a = call(
            &p,
            "/IpamDriver.RequestAddress",
            json!({"PoolID": "vxmesh/demo", "Address": addr}),
        )
        .await;
        assert_eq!(a.status, 200, "{a:?}");
        let r = call(
            &p,
            "/NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n1", "EndpointID": ep, "Interface": {"Address": format!("{addr}/24")}}),
        )
        .await;
        assert!(r.body.get("Err").is_none(), "{r:?}");
    }
    let program = |ep: &str| {
        json!({"NetworkID": "n1", "EndpointID": ep, "Options": {
            "com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": 80}],
            "com.docker.network.portmap": [
                {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}
            ],
        }})
    };
    let r = call(
        &p,
        "/NetworkDriver.ProgramExternalConnectivity",
        program("e1"),
    )
    .await;
    assert_eq!(r.body, json!({}));
    let records = crate::ports::list(d.path()).unwrap();
    assert_eq!(records.len(), 1);
    let spec = records[0].specs().next().unwrap();
    assert_eq!(
        (
            spec.host_port,
            spec.container_ip,
            spec.container_port,
            spec.owner.as_str()
        ),
        (8080, "172.18.10.5".parse().unwrap(), 80, "docker:e1")
    );
    // Again (Docker retries): the same record, no conflict with itself.
    let r = call(
        &p,
        "/NetworkDriver.ProgramExternalConnectivity",
        program("e1"),
    )
    .await;
    assert_eq!(r.body, json!({}));
    let r = call(
        &p,
        "/NetworkDriver.ProgramExternalConnectivity",
        program("e2"),
    )
    .await;
    let e = err_of(&r, "Err");
    assert!(
        e.contains("host port 8080/tcp") && e.contains("docker:e1"),
        "{e}"
    );
    assert_eq!(crate::ports::list(d.path()).unwrap().len(), 1);
    let r = call(
        &p,
        "/NetworkDriver.RevokeExternalConnectivity",
        json!({"NetworkID": "n1", "EndpointID": "e1"}),
    )
    .await;
    assert_eq!(r.body, json!({}));
    assert!(crate::ports::list(d.path()).unwrap().is_empty());
    // Now e2 gets it; DeleteEndpoint of e2 would remove it (Leave does).
    let r = call(
        &p,
        "/NetworkDriver.ProgramExternalConnectivity",
        program("e2"),
    )
    .await;
    assert_eq!(r.body, json!({}));
    assert_eq!(crate::ports::list(d.path()).unwrap().len(), 1);
}
