//! The outcome of `lab check`: every probed pair and a readable matrix.

use serde::Serialize;

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
        let mut out = format!("{:w$} ", "from\\to");
        for c in &self.containers {
            out += &format!("{c:>w$} ");
        }
        out.push('\n');
        for a in &self.containers {
            out += &format!("{a:w$} ");
            for b in &self.containers {
                let cell = if a == b {
                    "-".to_string()
                } else {
                    match self
                        .results
                        .iter()
                        .find(|r| &r.src_label == a && &r.dst_label == b)
                    {
                        None => ".".to_string(),
                        Some(r) => match (r.expect_reach, r.ok()) {
                            (true, true) => "ok".to_string(),
                            (false, true) => "iso".to_string(),
                            (true, false) => "FAIL".to_string(),
                            (false, false) => "LEAK".to_string(),
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
