//! The generic link operations of the netlink layer against a real kernel
//! (run as root): create, set, move and delete devices in throwaway
//! namespaces.
//!
//! Every test works in its own freshly made namespaces (removed on drop,
//! also on panic), creates nothing in the root namespace and sends no
//! traffic.

mod common;
mod kernel_common;

use kernel_common::*;

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
