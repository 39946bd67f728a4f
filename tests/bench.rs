//! Smoke tests of the benchmarks (`vxmesh bench NAME --json`) at tiny sizes:
//! each runs, prints sane non-zero figures and leaves nothing behind. The
//! measurements themselves belong to release builds (docs/benchmarks.md).

mod common;

use std::process::Command;

use common::exe;
use serde_json::Value;

/// Run `vxmesh bench ARGS --json`; check it succeeded and left nothing of its own.
fn bench(args: &[&str]) -> Value {
    let child = Command::new(exe())
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run vxmesh bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for vxmesh bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vxmesh bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert_nothing_left(pid);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bench {args:?} printed no JSON ({e}): {stdout}\n{stderr}"))
}

/// Namespaces, lab dirs and temp dirs of the bench process `pid`: its
/// labs are `bX{pid % 100000}` (X: one letter per bench), its other names
/// carry `-{pid}-` or end in `-{pid}`.
fn assert_nothing_left(pid: u32) {
    let is_lab =
        |name: &str| name.starts_with('b') && name.get(2..) == Some(&*(pid % 100_000).to_string());
    let own = format!("-{pid}-");
    let ns: Vec<String> = vxmesh::dataplane::netns::list("vxm-")
        .into_iter()
        .filter(|n| n.contains(&own) || n[4..].split_once('-').is_some_and(|(lab, _)| is_lab(lab)))
        .collect();
    assert!(ns.is_empty(), "namespaces left behind: {ns:?}");
    let labs: Vec<String> = std::fs::read_dir(vxmesh_lab::lab::LAB_ROOT)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_lab(n))
                .collect()
        })
        .unwrap_or_default();
    assert!(labs.is_empty(), "lab dirs left behind: {labs:?}");
    let tmp: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vxmesh-bench-") && n.ends_with(&format!("-{pid}")))
        .collect();
    assert!(tmp.is_empty(), "temp dirs left behind: {tmp:?}");
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn scale_repeats_and_reports_medians_of_both_tools() {
    let v = bench(&[
        "scale",
        "--peers",
        "40",
        "--mode",
        "routed,bridged",
        "--repeat",
        "3",
    ]);
    let rows = v.as_array().expect("one row per mode and size");
    assert_eq!(rows.len(), 2, "{v}");
    for (row, (mode, per_peer, inc)) in rows.iter().zip([("routed", 3, 3), ("bridged", 2, 2)]) {
        assert_eq!(row["mode"], mode, "{row}");
        assert_eq!(row["runs"], 3, "{row}");
        assert_eq!(row["objects"], 40 * per_peer, "{row}");
        // One message per object, exactly the needed ones on top, none idle.
        assert_eq!(row["vxmesh_messages"], 40 * per_peer, "{row}");
        assert_eq!(row["incremental_messages"], inc, "{row}");
        assert_eq!(row["idle_pass_messages"], 0, "{row}");
        let ratios: Vec<f64> = row["speedups"]
            .as_array()
            .expect("per-run ratios")
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect();
        assert_eq!(ratios.len(), 3, "{row}");
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        assert!((f(row, &["speedup"]) - sorted[1]).abs() < 1e-9, "{row}");
        assert!(
            f(row, &["vxmesh_ms"]) > 0.0 && f(row, &["ip_batch_ms"]) > 0.0,
            "{row}"
        );
    }
}

#[test]
fn throughput_reports_four_paths_ratios_and_cpu_cost() {
    let v = bench(&[
        "throughput",
        "--mode",
        "routed,bridged",
        "--seconds",
        "1",
        "--repeat",
        "1",
    ]);
    let rows = v["rows"].as_array().expect("rows");
    let cases: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["mode"].as_str().unwrap(), r["case"].as_str().unwrap()))
        .collect();
    assert_eq!(
        cases,
        [
            ("routed", "tcp-1"),
            ("routed", "tcp-4"),
            ("routed", "udp"),
            ("routed", "tcp-1-nft"),
            ("bridged", "tcp-1"),
            ("bridged", "tcp-4"),
            ("bridged", "udp"),
            ("bridged", "tcp-1-nft")
        ]
    );
    // iperf3's ends were pinned to two different CPUs.
    let (c, s) = (f(&v, &["client_cpu"]), f(&v, &["server_cpu"]));
    assert_ne!(c, s, "{v}");
    let names = |r: &Value, k: &str, field: &str| -> Vec<String> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x[field].as_str().unwrap().to_string())
            .collect()
    };
    for r in rows {
        let nft = r["case"] == "tcp-1-nft";
        let paths = names(r, "paths", "path");
        let ratios = names(r, "ratios", "name");
        if nft {
            assert_eq!(
                paths,
                ["plain-no-nft", "plain", "plain-no-nat", "hand-wired"],
                "{r}"
            );
            assert_eq!(
                ratios,
                [
                    "plain/plain-no-nft",
                    "plain-no-nat/plain-no-nft",
                    "plain-no-nft/hand-wired",
                    "plain-no-nat/hand-wired"
                ],
                "{r}"
            );
        } else {
            assert_eq!(
                paths,
                ["underlay", "hand-wired", "plain", "encrypted"],
                "{r}"
            );
            assert_eq!(
                ratios,
                [
                    "hand-wired/underlay",
                    "plain/underlay",
                    "plain/hand-wired",
                    "encrypted/plain"
                ],
                "{r}"
            );
        }
        let gbps = |name: &str| {
            let p = r["paths"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["path"] == name)
                .unwrap();
            f(p, &["gbps"])
        };
        for p in r["paths"].as_array().unwrap() {
            let g = f(p, &["gbps"]);
            // Something arrived (>= 1 Mbit/s) and nothing beyond a veth's reach.
            assert!(g > 0.001 && g < 1000.0, "{g} Gbit/s in {r}");
            assert!(
                f(p, &["machine_cpu_s_per_gbit"]) > 0.0,
                "machine CPU in {p}"
            );
            let agents = p.get("agent_cpu_s_per_gbit").is_some();
            let with_agents = p["path"] == "plain" || p["path"] == "encrypted";
            assert_eq!(
                agents,
                with_agents || p["path"] == "plain-no-nft" || p["path"] == "plain-no-nat",
                "{p}"
            );
            if p["path"] == "encrypted" {
                // The userspace data path runs in the agents: they used CPU.
                assert!(f(p, &["agent_cpu_s_per_gbit"]) > 0.0, "{p}");
            }
            if r["case"] == "udp" {
                let loss = f(p, &["loss_pct"]);
                assert!((0.0..100.0).contains(&loss), "loss {loss} in {p}");
            } else {
                assert!(p.get("loss_pct").is_none(), "TCP has no loss: {p}");
            }
        }
        for x in r["ratios"].as_array().unwrap() {
            let name = x["name"].as_str().unwrap();
            let (a, b) = name.split_once('/').unwrap();
            // One round: the pair ratio is the ratio of the runs.
            assert!(
                (f(x, &["value"]) - gbps(a) / gbps(b)).abs() < 1e-9,
                "{x} in {r}"
            );
            let target = x.get("target_min").map(|t| t.as_f64().unwrap());
            let want = match name {
                "plain/hand-wired" => Some(0.97),
                "encrypted/plain" => Some(0.25),
                _ => None,
            };
            assert_eq!(target, want, "{x}");
            if let Some(t) = target {
                assert_eq!(x["met"].as_bool(), Some(f(x, &["value"]) >= t), "{x}");
            }
        }
    }
    // The encrypted path's data path threads are reported with their CPUs.
    let threads = v["agent_threads"].as_array().expect("agent_threads");
    assert!(
        threads
            .iter()
            .any(|t| t["name"].as_str().unwrap().starts_with("vxm-wg")),
        "{threads:?}"
    );
}

#[test]
fn converge_times_joins_and_crashes() {
    let v = bench(&["converge", "--nodes", "3", "--joins", "2"]);
    let r = &v.as_array().expect("rows")[0];
    assert_eq!(r["nodes"], 3);
    let ttl = f(r, &["ttl_ms"]);
    assert_eq!(ttl, 3000.0);
    for k in [
        "join_ms",
        "join_ready_ms",
        "join_attach_ms",
        "crash_cleanup_ms",
        "expiry_to_cleanup_ms",
    ] {
        assert_eq!(r[k]["n"], 2, "{k} in {r}");
        let (p50, max) = (f(r, &[k, "p50"]), f(r, &[k, "max"]));
        assert!(p50 > 0.0 && p50 <= max, "{k} in {r}");
    }
    // A join includes getting ready and attaching; it ends well within the limit.
    assert!(f(r, &["join_ms", "min"]) >= f(r, &["join_ready_ms", "min"]));
    assert!(f(r, &["join_ms", "max"]) < 60_000.0, "{r}");
    // A crashed host cannot be cleaned before its lease expired: at least
    // most of a TTL (the lease may have been renewed up to TTL/3 before the kill).
    let crash = f(r, &["crash_cleanup_ms", "min"]);
    assert!(crash > ttl / 2.0 && crash < ttl + 30_000.0, "{r}");
    assert!(
        (f(r, &["crash_beyond_ttl_ms", "p50"]) - (f(r, &["crash_cleanup_ms", "p50"]) - ttl)).abs()
            < 1e-6
    );
}

#[test]
fn cold_start_starts_every_agent_at_once_and_counts_its_cpu() {
    let v = bench(&["converge", "--cold-start", "--nodes", "3,4"]);
    let rows = v.as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{v}");
    for (r, n) in rows.iter().zip([3.0, 4.0]) {
        assert_eq!(f(r, &["nodes"]), n);
        assert_eq!(f(r, &["join_ms", "n"]), n, "{r}");
        // Spawned before the start; then every agent runs before the
        // last one joins, and the times follow each other.
        assert!(f(r, &["spawn_ms"]) > 0.0, "{r}");
        let started = f(r, &["all_started_ms"]);
        let joined = f(r, &["all_joined_ms"]);
        assert!(started > 0.0 && started <= joined, "{r}");
        assert!(f(r, &["join_ms", "max"]) <= joined + 100.0, "{r}");
        assert!(joined <= f(r, &["all_known_ms"]), "{r}");
        assert!(f(r, &["all_known_ms"]) <= f(r, &["reachable_ms"]), "{r}");
        // Agents worked, and the machine at least as much as they did.
        let agent = f(r, &["agent_cpu_ms_mean"]);
        assert!(agent > 0.0, "{r}");
        assert!(f(r, &["machine_cpu_s"]) * 1000.0 >= agent * n, "{r}");
        assert!(f(r, &["cpus"]) >= 1.0, "{r}");
        assert!(f(r, &["etcd_txns_per_join"]) >= 1.0, "{r}");
    }
}

#[test]
fn cni_compares_both_plugins() {
    let v = bench(&["cni", "--iterations", "5"]);
    assert_eq!(v["iterations"], 5);
    for p in ["vxmesh", "reference", "floor"] {
        for k in ["add_ms", "del_ms", "add_del_ms"] {
            assert_eq!(v[p][k]["n"], 5, "{p} {k} in {v}");
            let p50 = f(&v, &[p, k, "p50"]);
            assert!(p50 > 0.0 && p50 < 30_000.0, "{p} {k} in {v}");
        }
    }
    let ratio = f(&v, &["ratio_p50"]);
    let want = f(&v, &["vxmesh", "add_del_ms", "p50"]) / f(&v, &["reference", "add_del_ms", "p50"]);
    assert!((ratio - want).abs() < 1e-9, "{v}");
    let floor = f(&v, &["floor_ratio_p50"]);
    let want = f(&v, &["floor", "add_del_ms", "p50"]) / f(&v, &["reference", "add_del_ms", "p50"]);
    assert!((floor - want).abs() < 1e-9, "{v}");
}

#[test]
fn docker_compares_vxmesh_with_the_bridge_driver() {
    let v = bench(&["docker", "--iterations", "2"]);
    assert_eq!(v["iterations"], 2);
    for k in ["vxmesh_ms", "bridge_ms"] {
        assert_eq!(v[k]["n"], 2, "{k} in {v}");
        let p50 = f(&v, &[k, "p50"]);
        assert!(p50 > 0.0 && p50 < 60_000.0, "{k} in {v}");
    }
    let want = f(&v, &["vxmesh_ms", "p50"]) / f(&v, &["bridge_ms", "p50"]);
    assert!((f(&v, &["ratio_p50"]) - want).abs() < 1e-9, "{v}");
}

#[test]
fn footprint_samples_an_idle_agent() {
    let v = bench(&["footprint", "--peers", "50", "--idle", "3"]);
    assert!(f(&v, &["idle_secs"]) >= 3.0, "{v}");
    assert_eq!(v["loaded"]["peers"], 50);
    assert_eq!(v["baseline"]["peers"], 0);
    for a in ["loaded", "baseline"] {
        let rss = f(&v, &[a, "rss_mib"]);
        assert!(rss > 1.0 && rss < 1024.0, "{a} RSS {rss} MiB in {v}");
        assert!(f(&v, &[a, "rss_peak_mib"]) >= rss, "{v}");
        let cpu = f(&v, &[a, "cpu_pct"]);
        assert!((0.0..200.0).contains(&cpu), "{a} CPU {cpu} % in {v}");
        assert!(f(&v, &[a, "converge_ms"]) > 0.0, "{v}");
    }
    assert!(v["rss_target_met"].is_boolean() && v["cpu_target_met"].is_boolean());
}
