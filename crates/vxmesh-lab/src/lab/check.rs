//! The outcome of `lab check`: every probed pair and a readable matrix.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::{Lab, LabContainer};
use crate::probe;

/// The outcome of `lab check`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub containers: Vec<String>,
    pub results: Vec<probe::PairResult>,
}

impl CheckReport {
    pub fn failures(&self) -> Vec<&probe::PairResult> {
        self.results.iter().filter(|r| !r.ok()).collect()
    }

    /// A matrix: rows are sources, columns destinations. `ok` reached as
    /// expected, `iso` correctly isolated, `FAIL`/`LEAK` otherwise.
    pub fn matrix(&self) -> String {
        let w = self
            .containers
            .iter()
            .map(|c| c.len())
            .max()
            .unwrap_or(4)
            .max(4);
        // Indexed once: a lab of N containers has N x N cells.
        let by_pair: std::collections::HashMap<(&str, &str), &probe::PairResult> = self
            .results
            .iter()
            .map(|r| ((r.src_label.as_str(), r.dst_label.as_str()), r))
            .collect();
        let mut out = format!("{:w$} ", "from\\to");
        for c in &self.containers {
            out += &format!("{c:>w$} ");
        }
        out.push('\n');
        for a in &self.containers {
            out += &format!("{a:w$} ");
            for b in &self.containers {
                let cell = if a == b {
                    "-"
                } else {
                    match by_pair.get(&(a.as_str(), b.as_str())) {
                        None => ".",
                        Some(r) => match (r.expect_reach, r.ok()) {
                            (true, true) => "ok",
                            (false, true) => "iso",
                            (true, false) => "FAIL",
                            (false, false) => "LEAK",
                        },
                    }
                };
                out += &format!("{cell:>w$} ");
            }
            out.push('\n');
        }
        out
    }
}

impl Lab {
    /// Probe every container pair (both directions). In bridged mode, pairs in
    /// different networks must NOT reach each other.
    pub fn check(&self, timeout: Duration) -> Result<CheckReport> {
        let cs = &self.info.containers;
        let results = probe::probe_pairs(&pair_jobs(cs), timeout);
        Ok(CheckReport {
            containers: cs.iter().map(|c| c.name.clone()).collect(),
            results,
        })
    }
}

/// The probes of a check: every ordered pair of containers, expected to
/// reach each other within a network and not across networks.
fn pair_jobs(cs: &[LabContainer]) -> Vec<probe::PairJob> {
    let mut jobs = Vec::new();
    for a in cs {
        for b in cs {
            if a.name == b.name {
                continue;
            }
            let same = a.network == b.network;
            if !same && cs.iter().any(|x| x.network == a.network && x.ip == b.ip) {
                // Overlapping subnets: b's address exists in a's own network, so
                // a probe would (rightly) reach that container instead.
                continue;
            }
            jobs.push(probe::PairJob {
                src_ns: a.netns.clone(),
                src_label: a.name.clone(),
                dst: b.ip,
                dst_label: b.name.clone(),
                expect_reach: same,
            });
        }
    }
    jobs
}

#[cfg(test)]
mod pair_tests {
    use super::*;

    fn c(name: &str, network: &str, ip: [u8; 4]) -> LabContainer {
        LabContainer {
            name: name.into(),
            node: "host1".into(),
            network: network.into(),
            netns: format!("ns-{name}"),
            ip: ip.into(),
        }
    }

    #[test]
    fn pairs_within_reach_across_isolated_and_overlaps_skipped() {
        let cs = [
            c("a", "n1", [10, 0, 0, 2]),
            c("b", "n1", [10, 0, 0, 3]),
            c("x", "n2", [10, 0, 0, 2]),
            c("y", "n2", [10, 0, 0, 9]),
        ];
        let jobs = pair_jobs(&cs);
        let find = |s: &str, d: &str| {
            jobs.iter()
                .find(|j| j.src_label == s && j.dst_label == d)
                .map(|j| j.expect_reach)
        };
        assert_eq!(find("a", "b"), Some(true));
        assert_eq!(find("b", "a"), Some(true));
        assert_eq!(find("a", "y"), Some(false));
        // x's address exists in a's own network (a itself): not probed.
        assert_eq!(find("b", "x"), None);
        assert_eq!(find("a", "a"), None);
        assert!(
            jobs.iter()
                .all(|j| j.src_ns == format!("ns-{}", j.src_label))
        );
    }
}
