//! `vxmesh lab demo`: build a lab, probe every container pair, take the lab
//! down, and tell a newcomer what happened at each step, with the time of
//! each step and the agents' memory.

use std::time::{Duration, Instant};

use anyhow::Result;
use vxmesh::config::Mode;

use super::{CheckReport, Lab, LabGuard, LabSpec, LabStore};

/// Labs with more containers than this get a tally of the probes instead of
/// the whole matrix (a line per container, a column per container).
const MATRIX_MAX: usize = 32;

/// Run the demo of `spec`, printing as it goes (failed pairs on stderr).
/// `Ok(true)` when every pair behaved as expected; the lab is removed either
/// way.
pub async fn demo(spec: &LabSpec) -> Result<bool> {
    println!("{}", banner(spec));
    let mut spec = spec.clone();
    if spec.external && spec.publish.is_none() {
        spec.publish = Some(DEMO_PUBLISH);
    }
    let spec = &spec;
    let t0 = Instant::now();
    let lab = LabGuard(Lab::up(spec).await?);
    println!("-- built in {:.1?}:", t0.elapsed());
    print!("{}", lab.info.summary());
    println!("{}", memory_line(&lab.agent_rss_kib()));
    let t1 = Instant::now();
    // Probing waits on sockets, and teardown on agents: off the runtime's threads.
    let external = spec.external;
    let (lab, report, outside) = tokio::task::spawn_blocking(move || {
        let report = lab.check(Duration::from_secs(2));
        let outside = external.then(|| lab.check_external(Duration::from_secs(2)));
        (lab, report, outside)
    })
    .await?;
    let report = report?;
    println!(
        "\n-- connectivity ({} probes in {:.1?}; ok = reached, iso = isolated as it must be):",
        report.results.len(),
        t1.elapsed()
    );
    if report.containers.len() <= MATRIX_MAX {
        print!("{}", report.matrix());
    } else {
        println!("{}", tally(&report));
    }
    let mut fails: Vec<String> = report.failures().iter().map(|f| f.to_string()).collect();
    if let Some(outside) = outside {
        let outside = outside?;
        println!(
            "\n-- the outside world ({} probes: containers to {}, {} to published ports):",
            outside.probes.len(),
            super::OUTSIDE_IP,
            super::OUTSIDE_IP
        );
        print!("{}", outside.render());
        fails.extend(
            outside
                .failures()
                .iter()
                .map(|p| format!("MISS {}", p.what)),
        );
    }
    if spec.encrypt {
        let (lines, missing) = secure_sessions(&lab).await;
        // The lab encrypts its first network, on either store.
        let encrypted = super::spec::network_names(spec.mode, spec.networks)
            .into_iter()
            .next()
            .unwrap_or_else(|| "-".into());
        println!(
            "\n-- secure underlay (network {encrypted}: VXLAN inside WireGuard, any other network plain; per host, each peer's last handshake and bytes):"
        );
        for l in lines {
            println!("{l}");
        }
        fails.extend(missing);
    }
    for f in &fails {
        eprintln!("FAILED: {f}");
    }
    let t2 = Instant::now();
    tokio::task::spawn_blocking(move || drop(lab)).await?;
    println!(
        "\n-- lab removed in {:.1?} (namespaces, agents, state)",
        t2.elapsed()
    );
    println!("{}", verdict(fails.len()));
    Ok(fails.is_empty())
}

/// How long the agents' reports may take to show the sessions the probes
/// made (they are rewritten every 2 s).
const SESSION_WAIT: Duration = Duration::from_secs(6);

/// Every host's tunnels as its agent reports them (`STATE/secure.json`):
/// the lines to print, and a failure for each host pair without a session.
async fn secure_sessions(lab: &Lab) -> (Vec<String>, Vec<String>) {
    let t0 = Instant::now();
    loop {
        let (mut lines, mut missing) = (Vec::new(), Vec::new());
        for n in &lab.info.nodes {
            let Some(r) = vxmesh::secure::underlay::report::read_report(&n.state_dir) else {
                lines.push(format!("  {}: no report from its agent", n.name));
                missing.push(format!("{}: no secure underlay report", n.name));
                continue;
            };
            let mut parts = Vec::new();
            for o in lab.info.nodes.iter().filter(|o| o.name != n.name) {
                match r.peers.iter().find(|p| p.node == o.name) {
                    Some(p) if p.since_handshake_ms.is_some() && p.tx_bytes > 0 => {
                        parts.push(format!(
                            "{} {:.1} s ago, {} B out / {} B in",
                            o.name,
                            p.since_handshake_ms.unwrap_or(0) as f64 / 1000.0,
                            p.tx_bytes,
                            p.rx_bytes
                        ));
                    }
                    _ => {
                        parts.push(format!("{} NO SESSION", o.name));
                        missing.push(format!("{}: no WireGuard session with {}", n.name, o.name));
                    }
                }
            }
            lines.push(format!(
                "  {} ({} on {}): {}",
                n.name,
                r.addr.addr(),
                r.dev,
                parts.join("; ")
            ));
        }
        if missing.is_empty() || t0.elapsed() > SESSION_WAIT {
            return (lines, missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What `lab demo --external` publishes when `--publish` is not given.
const DEMO_PUBLISH: (u16, u16) = (8080, 80);

/// The demo's first line: what is about to be built.
pub fn banner(spec: &LabSpec) -> String {
    format!(
        "== vxmesh lab demo: {} hosts, {} container(s) per host{}, {} mode, {} store",
        spec.nodes,
        spec.containers,
        if spec.mode == Mode::Bridged {
            format!(" per network, {} networks", spec.networks)
        } else {
            String::new()
        },
        spec.mode,
        if spec.store == LabStore::Etcd {
            "etcd"
        } else {
            "static"
        },
    ) + if spec.external {
        ", with an outside world"
    } else {
        ""
    } + if spec.encrypt {
        ", first network encrypted"
    } else {
        ""
    }
}

/// The agents' resident memory: total, mean and largest.
fn memory_line(rss_kib: &[u64]) -> String {
    if rss_kib.is_empty() {
        return "-- agents: none running".to_string();
    }
    let total: u64 = rss_kib.iter().sum();
    let max = rss_kib.iter().copied().max().unwrap_or(0);
    format!(
        "-- agents: {} processes, resident memory {:.1} MiB in all, {:.1} MiB each on average, {:.1} MiB at most",
        rss_kib.len(),
        total as f64 / 1024.0,
        total as f64 / 1024.0 / rss_kib.len() as f64,
        max as f64 / 1024.0
    )
}

/// Probes by outcome, for labs too big for a matrix.
fn tally(report: &CheckReport) -> String {
    let count = |reach: bool, ok: bool| {
        report
            .results
            .iter()
            .filter(|r| r.expect_reach == reach && r.ok() == ok)
            .count()
    };
    format!(
        "{} containers, {} ordered pairs: ok {}, iso {}, FAIL {}, LEAK {} (matrix with `vxmesh lab check`)",
        report.containers.len(),
        report.results.len(),
        count(true, true),
        count(false, true),
        count(true, false),
        count(false, false)
    )
}

/// The demo's last line.
fn verdict(failed_pairs: usize) -> String {
    if failed_pairs == 0 {
        "PASS: every pair behaved as expected".to_string()
    } else {
        format!("FAIL: {failed_pairs} probe(s) misbehaved")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_names_size_mode_and_store() {
        let spec = LabSpec::new("demo", 3, 2);
        assert_eq!(
            banner(&spec),
            "== vxmesh lab demo: 3 hosts, 2 container(s) per host, routed mode, static store"
        );
        let mut spec = LabSpec::new("demo", 4, 1);
        spec.mode = Mode::Bridged;
        spec.networks = 2;
        spec.store = LabStore::Etcd;
        assert_eq!(
            banner(&spec),
            "== vxmesh lab demo: 4 hosts, 1 container(s) per host per network, 2 networks, bridged mode, etcd store"
        );
        spec.store = LabStore::Static;
        spec.encrypt = true;
        assert!(banner(&spec).ends_with("static store, first network encrypted"));
    }

    #[test]
    fn memory_is_summed_and_averaged() {
        assert_eq!(memory_line(&[]), "-- agents: none running");
        assert_eq!(
            memory_line(&[1024, 3072]),
            "-- agents: 2 processes, resident memory 4.0 MiB in all, 2.0 MiB each on average, 3.0 MiB at most"
        );
    }

    #[test]
    fn verdict_counts_failed_pairs() {
        assert_eq!(verdict(0), "PASS: every pair behaved as expected");
        assert_eq!(verdict(3), "FAIL: 3 probe(s) misbehaved");
    }
}
