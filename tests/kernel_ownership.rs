//! Ownership against a real kernel (run as root): a foreign `vxm-` device is
//! refused and untouched, and teardown removes what vxmesh owns and nothing
//! else.
//!
//! Every test works in its own freshly made namespaces (removed on drop,
//! also on panic), creates nothing in the root namespace and sends no
//! traffic.

mod common;
mod kernel_common;

use kernel_common::*;

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
