//! Unit tests of the metrics: names, types and what each recording does.

use super::*;
use crate::dataplane::kernel::{ApplyError, ApplyFailure, ApplyReport, KernelError};
use crate::dataplane::plan::{PlanInput, plan};

/// The value of the series written exactly as `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a sample value"))
}

#[test]
fn join_failures_are_counted_by_cause() {
    let m = Metrics::new();
    m.join_failed("lease_lost");
    m.join_failed("lease_lost");
    m.join_failed("unreachable");
    let text = m.encode();
    assert_eq!(
        sample(&text, "vxmesh_join_failures_total{cause=\"lease_lost\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "vxmesh_join_failures_total{cause=\"unreachable\"}"),
        Some(1.0)
    );
}

fn cluster_plan(nodes: usize, bridged_networks: usize) -> NodePlan {
    let mut t = String::new();
    if bridged_networks == 0 {
        t.push_str(
            "[[network]]\nname = \"demo\"\nmode = \"routed\"\ncidr = \"172.18.0.0/16\"\nsubnet_len = 24\nvni = 100\n",
        );
    }
    for i in 0..bridged_networks {
        t.push_str(&format!(
            "[[network]]\nname = \"net{i}\"\nmode = \"bridged\"\ncidr = \"10.10.0.0/22\"\nsubnet_len = 28\nvni = {}\n",
            200 + i
        ));
    }
    for i in 1..=nodes {
        t.push_str(&format!(
            "[[node]]\nname = \"h{i}\"\nunderlay_ip = \"198.18.0.{i}\"\n"
        ));
    }
    let c = crate::config::parse(&t, "test").unwrap();
    plan(&PlanInput {
        cluster: &c,
        node: "h1",
        endpoints: None,
        underlay_mtu: 1500,
        vxlan_filter: true,
    })
    .unwrap()
}

/// A failed apply's entry: the kernel refused a request (the namespace
/// names it, for the test).
fn failure(namespace: &str) -> ApplyFailure {
    ApplyFailure::ResolveDevices {
        namespace: namespace.to_string(),
        kernel: KernelError {
            errno: libc::EBUSY,
            message: None,
        },
    }
}

fn report(changes: usize, messages: usize) -> ReconcileReport {
    ReconcileReport {
        changes,
        messages,
        duration: Duration::from_millis(1),
        applied: vec![],
        apply: ApplyReport::default(),
    }
}

#[test]
fn exposition_format_of_a_fresh_set() {
    let text = Metrics::new().encode();
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in [
        "# TYPE vxmesh_reconcile_passes counter",
        "vxmesh_reconcile_passes_total{result=\"ok\"} 0",
        "vxmesh_reconcile_passes_total{result=\"error\"} 0",
        "vxmesh_reconcile_changes_total 0",
        "vxmesh_netlink_messages_total 0",
        "vxmesh_netlink_errors_total 0",
        "# TYPE vxmesh_apply_duration_seconds histogram",
        "# UNIT vxmesh_apply_duration_seconds seconds",
        "vxmesh_apply_duration_seconds_count 0",
        "vxmesh_store_connected 0",
        "vxmesh_cluster_watch_failures_total 0",
        "vxmesh_cluster_watch_polling 0",
        "vxmesh_records_rejected_total{kind=\"node\"} 0",
        "vxmesh_records_rejected_total{kind=\"subnet\"} 0",
        "vxmesh_records_rejected_total{kind=\"endpoint\"} 0",
        "vxmesh_records_rejected_total{kind=\"network\"} 0",
        "# TYPE vxmesh_last_pass_timestamp_seconds gauge",
        "vxmesh_last_pass_timestamp_seconds 0.0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    // No network served yet: no peers series (not even its HELP).
    assert!(!text.contains("vxmesh_peers"), "{text}");
    // Buckets from 100 µs to 10 s, then +Inf.
    let les: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("vxmesh_apply_duration_seconds_bucket{le=\""))
        .map(|l| l.split('"').next().unwrap())
        .collect();
    assert_eq!(les.len(), 17, "{les:?}");
    assert_eq!(les[0], "0.0001");
    assert_eq!(les[15], "10.0");
    assert_eq!(les[16], "+Inf");
    let bounds: Vec<f64> = les[..16].iter().map(|l| l.parse().unwrap()).collect();
    assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{les:?}");
}

#[tokio::test]
async fn reconciles_record_peers_changes_and_errors() {
    let m = Metrics::new();
    // Routed, 4 nodes: 3 peers of h1.
    let p = cluster_plan(4, 0);
    let r = m.reconcile(&p, async { Ok(report(9, 9)) }).await.unwrap();
    assert_eq!(r.changes, 9);
    m.pass_done(true);
    let t = m.encode();
    assert!(t.lines().any(|l| l == "# TYPE vxmesh_peers gauge"), "{t}");
    assert_eq!(
        sample(&t, "vxmesh_peers{network=\"demo\"}"),
        Some(3.0),
        "{t}"
    );
    assert_eq!(sample(&t, "vxmesh_reconcile_changes_total"), Some(9.0));
    assert_eq!(sample(&t, "vxmesh_netlink_messages_total"), Some(9.0));
    assert_eq!(sample(&t, "vxmesh_apply_duration_seconds_count"), Some(1.0));
    assert_eq!(
        sample(&t, "vxmesh_reconcile_passes_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert!(sample(&t, "vxmesh_last_success_timestamp_seconds").unwrap() > 1.0e9);

    // A failed apply: what was changed and sent, and the failures, are
    // counted; the peers of the last applied plan are kept.
    let failed = ApplyError {
        namespace: "test".into(),
        report: ApplyReport {
            changes: 4,
            routes: 2,
            fdb: 2,
            errors: ["a", "b"].map(failure).to_vec(),
            ..Default::default()
        },
    };
    let bridged = cluster_plan(3, 2);
    let e = m
        .reconcile(&bridged, async { Err(ReconcileError::Apply(failed)) })
        .await
        .unwrap_err();
    assert_eq!(e.apply_report().map(|r| r.errors.len()), Some(2));
    m.pass_done(false);
    let t = m.encode();
    assert_eq!(sample(&t, "vxmesh_netlink_errors_total"), Some(2.0), "{t}");
    assert_eq!(sample(&t, "vxmesh_reconcile_changes_total"), Some(11.0));
    assert_eq!(sample(&t, "vxmesh_netlink_messages_total"), Some(13.0));
    assert_eq!(sample(&t, "vxmesh_apply_duration_seconds_count"), Some(2.0));
    assert_eq!(
        sample(&t, "vxmesh_reconcile_passes_total{result=\"error\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&t, "vxmesh_peers{network=\"demo\"}"), Some(3.0));

    // Bridged, applied: per network the remote endpoints (derived from
    // the two other nodes' slices); the routed network's series is gone.
    m.reconcile(&bridged, async { Ok(report(0, 0)) })
        .await
        .unwrap();
    let t = m.encode();
    let remote = bridged
        .neighbours
        .iter()
        .filter(|n| n.dev == bridged.networks["net0"].vtep)
        .count();
    assert!(remote >= 2, "{remote}");
    assert_eq!(
        sample(&t, "vxmesh_peers{network=\"net0\"}"),
        Some(remote as f64)
    );
    assert_eq!(
        sample(&t, "vxmesh_peers{network=\"net1\"}"),
        Some(remote as f64)
    );
    assert_eq!(sample(&t, "vxmesh_peers{network=\"demo\"}"), None, "{t}");
}

#[test]
fn store_connected_needs_ready_and_every_link_up() {
    let m = Metrics::new();
    let connected = |m: &Metrics| sample(&m.encode(), "vxmesh_store_connected");
    assert_eq!(connected(&m), Some(0.0));
    m.store_ready();
    assert_eq!(connected(&m), Some(1.0));
    m.store_link(false);
    m.store_link(false);
    assert_eq!(connected(&m), Some(0.0));
    m.store_link(true);
    assert_eq!(connected(&m), Some(0.0));
    m.store_link(true);
    assert_eq!(connected(&m), Some(1.0));
}

#[test]
fn rejected_records_count_by_kind() {
    let m = Metrics::new();
    m.record_rejected(RecordKind::Node);
    m.record_rejected(RecordKind::Node);
    m.record_rejected(RecordKind::Endpoint);
    let t = m.encode();
    assert_eq!(
        sample(&t, "vxmesh_records_rejected_total{kind=\"node\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&t, "vxmesh_records_rejected_total{kind=\"endpoint\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, "vxmesh_records_rejected_total{kind=\"subnet\"}"),
        Some(0.0)
    );
}

#[test]
fn a_cluster_file_that_cannot_be_watched_is_counted_and_flagged() {
    let m = Metrics::new();
    m.cluster_watch_failed();
    let t = m.encode();
    assert_eq!(sample(&t, "vxmesh_cluster_watch_failures_total"), Some(1.0));
    assert_eq!(sample(&t, "vxmesh_cluster_watch_polling"), Some(1.0));
    m.cluster_watch_failed();
    let t = m.encode();
    assert_eq!(sample(&t, "vxmesh_cluster_watch_failures_total"), Some(2.0));
    assert_eq!(sample(&t, "vxmesh_cluster_watch_polling"), Some(1.0));
}

#[test]
fn detached_containers_are_counted_by_network_and_reason() {
    let m = Metrics::new();
    m.container_detached("seg", "address_lost");
    let text = m.encode();
    assert_eq!(
        sample(
            &text,
            "vxmesh_containers_detached_total{network=\"seg\",reason=\"address_lost\"}"
        ),
        Some(1.0)
    );
}
