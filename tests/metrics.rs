//! `vxmesh agent --metrics`: lab agents serve Prometheus metrics on their
//! underlay address; every scrape comes from inside the host's namespace.
//! Root; namespaces only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh_lab::lab::{Lab, LabStore};

const PORT: u16 = 9472;

/// `GET path` on `addr` from inside namespace `ns`: (status line, body).
fn http_get(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    Netns::open(ns)?.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(req.as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no end of headers in {resp:?}"))?;
        let status = head.lines().next().unwrap_or_default().to_string();
        Ok((status, body.to_string()))
    })
}

/// The metrics of `node`'s agent, scraped inside its namespace.
fn scrape(lab: &Lab, node: &str) -> String {
    let addr = lab
        .metrics_addr(node)
        .expect("lab runs agents with metrics");
    let ns = lab.node(node).unwrap().netns.clone();
    let (status, body) = http_get(&ns, addr, "/metrics")
        .unwrap_or_else(|e| panic!("scrape {node} at {addr}: {e:#}"));
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(body.ends_with("# EOF\n"), "truncated exposition: {body}");
    body
}

/// The value of the series written exactly as `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a sample value"))
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn rejected(text: &str, kind: &str) -> f64 {
    must(
        text,
        &format!("vxmesh_records_rejected_total{{kind=\"{kind}\"}}"),
    )
}

fn permanent_neighbours(ns: &str, vtep: &str) -> usize {
    ip(ns, &["neigh", "show", "dev", vtep, "nud", "permanent"])
        .lines()
        .count()
}

const OK_PASSES: &str = "vxmesh_reconcile_passes_total{result=\"ok\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_lab_agents_serve_metrics_that_follow_the_data_plane() {
    let mut s = spec("mst", 3, 0, Mode::Routed, 1);
    s.metrics_port = Some(PORT);
    let name = s.name.clone();
    {
        let lab = up(&s).await;
        let h1 = lab.node("host1").unwrap().netns.clone();
        for n in ["host1", "host2", "host3"] {
            let ns = lab.node(n).unwrap().netns.clone();
            let m = scrape(&lab, n);
            // The gauge is the real peer count: one neighbour per remote node.
            assert_eq!(permanent_neighbours(&ns, "vxm-vx100"), 2, "{n}");
            assert_eq!(must(&m, "vxmesh_peers{network=\"demo\"}"), 2.0, "{n}");
            assert_eq!(must(&m, "vxmesh_store_connected"), 1.0, "{n}");
            assert!(must(&m, OK_PASSES) >= 1.0, "{n}: {m}");
            assert!(must(&m, "vxmesh_apply_duration_seconds_count") >= 1.0);
            // Building the node took changes and messages, and none failed.
            assert!(must(&m, "vxmesh_reconcile_changes_total") >= 8.0, "{m}");
            assert!(must(&m, "vxmesh_netlink_messages_total") >= 8.0, "{m}");
            assert_eq!(must(&m, "vxmesh_netlink_errors_total"), 0.0);
            assert!(must(&m, "vxmesh_last_success_timestamp_seconds") > 1.0e9);
        }

        // Drift: a route deleted by hand is put back by a pass, counted as
        // exactly one change sent as one netlink message.
        let before = scrape(&lab, "host1");
        let st = std::process::Command::new("ip")
            .args(["-n", &h1, "route", "del", "172.18.20.0/24"])
            .status()
            .unwrap();
        assert!(st.success());
        let repaired = wait_until(Duration::from_secs(3), || {
            ip(&h1, &["route", "show", "172.18.20.0/24", "proto", "86"])
                .lines()
                .count()
                == 1
        })
        .await;
        assert!(repaired.is_some(), "route not repaired");
        // The pass ends (counters updated) just after the route is back: the
        // reconcile's counters first, the pass itself once its firewall step
        // and the state files are done too.
        let mut after = String::new();
        let settled = wait_until(Duration::from_secs(3), || {
            after = scrape(&lab, "host1");
            must(&after, "vxmesh_reconcile_changes_total")
                > must(&before, "vxmesh_reconcile_changes_total")
                && must(&after, OK_PASSES) > must(&before, OK_PASSES)
        })
        .await;
        assert!(
            settled.is_some(),
            "no change or no finished pass counted:\n{after}"
        );
        for c in [
            "vxmesh_reconcile_changes_total",
            "vxmesh_netlink_messages_total",
        ] {
            assert_eq!(must(&after, c) - must(&before, c), 1.0, "{c}:\n{after}");
        }
        assert!(
            must(&after, "vxmesh_apply_duration_seconds_count")
                > must(&before, "vxmesh_apply_duration_seconds_count")
        );
        assert_eq!(must(&after, "vxmesh_netlink_errors_total"), 0.0);
        assert_eq!(must(&after, "vxmesh_peers{network=\"demo\"}"), 2.0);

        // Only /metrics is served.
        let addr = lab.metrics_addr("host1").unwrap();
        let (status, _) = http_get(&h1, addr, "/").unwrap();
        assert_eq!(status, "HTTP/1.1 404 Not Found");

        // A bad --metrics fails before anything is applied: exit 1, an error
        // naming the option, and nothing written to the state dir.
        let cluster = lab.info.cluster_file.to_str().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_str().unwrap().to_string();
        for (bad, says) in [
            ("9472", "not an IP:PORT address"),
            // Not an address of this host: cannot bind.
            ("198.18.0.99:9472", "cannot listen there"),
            // host1's agent holds it already.
            (&*addr.to_string(), "cannot listen there"),
        ] {
            let (code, _, err) = vxmesh(&[
                "--netns",
                &h1,
                "agent",
                "--cluster",
                &cluster,
                "--node",
                "host1",
                "--state-dir",
                &state,
                "--once",
                "--metrics",
                bad,
            ]);
            assert_eq!(code, 1, "--metrics {bad}: {err}");
            assert!(
                err.contains(&format!("--metrics {bad}")) && err.contains(says),
                "--metrics {bad}: {err}"
            );
            let written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(written.is_empty(), "--metrics {bad}: wrote {written:?}");
        }
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lab_counts_rejected_records_once_and_connection_state() {
    let mut s = spec("met", 3, 1, Mode::Routed, 1);
    s.store = LabStore::Etcd;
    s.ttl = Duration::from_secs(3);
    s.metrics_port = Some(PORT);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let nodes = ["host1", "host2", "host3"];
        let mut before = Vec::new();
        for n in nodes {
            // Hosts joined one after the other: the first ones may still be
            // applying the last join.
            let mut m = String::new();
            let all = wait_until(Duration::from_secs(5), || {
                m = scrape(&lab, n);
                value(&m, "vxmesh_peers{network=\"demo\"}") == Some(2.0)
            })
            .await;
            assert!(all.is_some(), "{n} does not see 2 peers:\n{m}");
            assert_eq!(must(&m, "vxmesh_store_connected"), 1.0, "{n}: {m}");
            before.push(m);
        }

        // One invalid record of each kind an agent validates.
        let root = format!("{}/networks/demo/", vxmesh::store::etcd::DEFAULT_PREFIX);
        let junk = [
            (format!("{root}nodes/broken"), "{not json".to_string()),
            (format!("{root}subnets/not-a-subnet"), "host1".to_string()),
            (
                format!("{root}endpoints/10.99.0.1"),
                "{not json".to_string(),
            ),
            (format!("{root}config"), "garbage".to_string()),
        ];
        let config_key = format!("{root}config");
        let valid_config = lab
            .in_underlay(move |co| async move {
                let mut c = etcd_client::Client::connect(co.endpoints.clone(), None).await?;
                let cur = c.get(config_key, None).await?;
                let valid = cur.kvs().first().map(|kv| kv.value().to_vec());
                for (k, v) in junk {
                    c.put(k, v, None).await?;
                }
                valid.ok_or_else(|| anyhow::anyhow!("no network config in etcd"))
            })
            .await
            .expect("inject invalid records");

        let want = [
            ("node", 1.0),
            ("subnet", 1.0),
            ("endpoint", 1.0),
            ("network", 1.0),
        ];
        for (i, n) in nodes.iter().enumerate() {
            let mut m = String::new();
            let seen = wait_until(Duration::from_secs(5), || {
                m = scrape(&lab, n);
                want.iter()
                    .all(|(k, d)| rejected(&m, k) >= rejected(&before[i], k) + d)
            })
            .await;
            assert!(seen.is_some(), "{n} did not count the records:\n{m}");
        }
        // Later passes and watch events do not count them again: restoring
        // the valid config is a change every agent's view rebuilds on.
        let config_key = format!("{root}config");
        lab.in_underlay(move |co| async move {
            let mut c = etcd_client::Client::connect(co.endpoints.clone(), None).await?;
            c.put(config_key, valid_config, None).await?;
            Ok(())
        })
        .await
        .expect("restore the network config");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for (i, n) in nodes.iter().enumerate() {
            let m = scrape(&lab, n);
            for (k, d) in want {
                assert_eq!(
                    rejected(&m, k) - rejected(&before[i], k),
                    d,
                    "{n}, kind {k}:\n{m}"
                );
            }
            // The cluster keeps working on the valid records.
            assert_eq!(must(&m, "vxmesh_peers{network=\"demo\"}"), 2.0, "{n}");
            assert_eq!(must(&m, "vxmesh_store_connected"), 1.0, "{n}");
        }
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert!(report.failures().is_empty(), "{}", report.matrix());

        // etcd down: the agents notice (0), and the data plane stays; back: 1.
        lab.stop_etcd().unwrap();
        let mut m = String::new();
        let down = wait_until(Duration::from_secs(8), || {
            m = scrape(&lab, "host1");
            must(&m, "vxmesh_store_connected") == 0.0
        })
        .await;
        assert!(
            down.is_some(),
            "store_connected stayed 1 without etcd:\n{m}"
        );
        assert_eq!(must(&m, "vxmesh_peers{network=\"demo\"}"), 2.0);
        lab.start_etcd().await.unwrap();
        let up_again = wait_until(Duration::from_secs(10), || {
            m = scrape(&lab, "host1");
            must(&m, "vxmesh_store_connected") == 1.0
        })
        .await;
        assert!(
            up_again.is_some(),
            "store_connected stayed 0 with etcd back:\n{m}"
        );
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_the_kernel_refuses_are_counted_as_netlink_errors() {
    let mut s = spec("mne", 2, 0, Mode::Routed, 1);
    s.metrics_port = Some(PORT);
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let h1 = lab.node("host1").unwrap().netns.clone();
        // With the agent stopped, a foreign vxlan device takes VNI 100 on
        // the VTEP's port: the kernel refuses to create vxm-vx100 again.
        lab.stop_agent("host1", nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let run_ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .arg("-n")
                .arg(&h1)
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        run_ip(&["link", "del", "vxm-vx100"]);
        run_ip(&[
            "link",
            "add",
            "squat100",
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
        lab.start_agent("host1").unwrap();
        let mut m = String::new();
        let failed = wait_until(Duration::from_secs(5), || {
            m = http_get(&h1, lab.metrics_addr("host1").unwrap(), "/metrics")
                .map(|(_, body)| body)
                .unwrap_or_default();
            value(&m, "vxmesh_netlink_errors_total").is_some_and(|v| v >= 1.0)
        })
        .await;
        assert!(failed.is_some(), "no netlink error counted:\n{m}");
        assert!(must(&m, "vxmesh_reconcile_passes_total{result=\"error\"}") >= 1.0);
        assert_eq!(
            must(&m, "vxmesh_last_success_timestamp_seconds"),
            0.0,
            "{m}"
        );
        // The applied plan never succeeded: no peers series yet.
        assert_eq!(value(&m, "vxmesh_peers{network=\"demo\"}"), None, "{m}");

        // The squatter gone, the next pass succeeds and errors stop rising.
        run_ip(&["link", "del", "squat100"]);
        let healed = wait_until(Duration::from_secs(5), || {
            m = scrape(&lab, "host1");
            value(&m, "vxmesh_peers{network=\"demo\"}") == Some(1.0)
        })
        .await;
        assert!(healed.is_some(), "did not recover:\n{m}");
        let errors = must(&m, "vxmesh_netlink_errors_total");
        let ok = must(&m, OK_PASSES);
        // (Kernel events or, at the latest, the 5 s resync.)
        let more = wait_until(Duration::from_secs(7), || {
            m = scrape(&lab, "host1");
            must(&m, OK_PASSES) > ok
        })
        .await;
        assert!(more.is_some(), "no further pass:\n{m}");
        assert_eq!(must(&m, "vxmesh_netlink_errors_total"), errors, "{m}");
    }
    assert_gone(&name);
}
