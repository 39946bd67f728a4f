//! Apply errors against a real kernel (run as root): every failure reported
//! and matched to its own change across batches, the kernel's reasons in the
//! errors, half-created devices adopted.
//!
//! Every test works in its own freshly made namespaces (removed on drop,
//! also on panic), creates nothing in the root namespace and sends no
//! traffic.

mod common;
mod kernel_common;

use kernel_common::*;

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
