//! Measured benchmarks (`vxmesh bench NAME`). Each runs the compared things
//! side by side in one run, in network namespaces it creates and removes, and
//! reports figures and ratios: absolute times on a shared machine are noise.
//!
//! - [`scale`]: programming P peers into one node vs `ip -batch`;
//! - [`throughput`]: iperf3 container-to-container across hosts vs host-to-host;
//! - [`converge`]: etcd lab, join and crash convergence times;
//! - [`coldstart`]: etcd lab, every agent started at once (`converge --cold-start`);
//! - [`faults`]: etcd lab under rounds of faults, the invariant checker throughout;
//! - [`cni`]: ADD+DEL latency of the vxmesh plugin vs `bridge` + `host-local`;
//! - [`footprint`]: RSS and CPU of an idle agent holding many peers.

pub mod cni;
pub mod coldstart;
pub mod converge;
pub mod cpu;
pub mod docker;
pub mod faults;
pub mod footprint;
pub mod scale;
pub mod throughput;

pub use scale::{ScaleRow, scale_one, scale_table};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vxmesh::config::Mode;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Order statistics of a sample (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

impl Summary {
    /// Summarise `xs` (NaNs are an error of the caller and sort last).
    pub fn of(xs: &[f64]) -> Summary {
        if xs.is_empty() {
            return Summary::default();
        }
        let mut v = xs.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        Summary {
            n: v.len(),
            min: v[0],
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            max: v[v.len() - 1],
        }
    }
}

/// Nearest-rank percentile of an ascending, non-empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `a / b`, or 0 when `b` is 0 (a ratio of nothing measured is no claim).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

/// A plain-text table with right-aligned columns (the first left-aligned).
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A line printed under the table.
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.len());
            }
        }
        let mut s = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i == 0 {
                    let _ = write!(line, "{c:<w$}", w = width[i]);
                } else {
                    let _ = write!(line, "  {c:>w$}", w = width[i]);
                }
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        for n in &self.notes {
            s.push_str(n);
            s.push('\n');
        }
        s
    }
}

/// Print a report: pretty JSON, or the table.
pub fn print<T: Serialize>(json: bool, value: &T, table: &Table) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", table.render());
    }
    Ok(())
}

/// Make sure `path` exists; if not, install the Debian package `package`
/// with apt-get (benchmarks need their baselines; the bench runs as root).
pub fn ensure_tool(path: &str, package: &str) -> Result<()> {
    if Path::new(path).exists() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("{path} is missing and there is no apt-get: install the package {package}");
    }
    tracing::info!("{path} is missing: installing the Debian package {package}");
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get update")?;
    if !update.success() {
        tracing::warn!("apt-get update failed ({update}); trying the install anyway");
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("run apt-get install {package}"))?;
    if !st.success() || !Path::new(path).exists() {
        bail!("installing {package} for {path} failed ({st})");
    }
    Ok(())
}

/// A lab name for benchmark `tag`, unique per process (at most 16 characters).
pub fn lab_name(tag: &str) -> String {
    format!("b{tag}{}", std::process::id() % 100_000)
}

/// A private directory under the system's temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let d = std::env::temp_dir().join(format!("vxmesh-bench-{tag}-{}", std::process::id()));
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("remove stale {}", d.display()))?;
        }
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(TempDir(d))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("remove {}: {e}", self.0.display());
        }
    }
}

/// A child process killed and reaped when dropped (also on error paths).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Gbit/s from bits per second.
pub fn gbps(bits_per_second: f64) -> f64 {
    bits_per_second / 1e9
}

/// `vxmesh bench scale`: for every mode and peer count, `repeat` interleaved
/// runs of vxmesh and `ip -batch`, combined into one row (medians). Each run
/// is handed to `each_run` as it completes (the CLI prints progress).
pub async fn scale_series(
    modes: &[Mode],
    peers: &[usize],
    repeat: usize,
    mut each_run: impl FnMut(&ScaleRow),
) -> Result<Vec<ScaleRow>> {
    check_repeat(repeat)?;
    let mut rows = Vec::new();
    for &mode in modes {
        for &p in peers {
            check_peers(p)?;
            let mut runs = Vec::new();
            for _ in 0..repeat {
                let run = scale_one(mode, p).await?;
                each_run(&run);
                runs.push(run);
            }
            rows.push(scale::combine(&runs));
        }
    }
    Ok(rows)
}

fn check_repeat(repeat: usize) -> Result<()> {
    if !(1..=50).contains(&repeat) {
        bail!("--repeat must be 1..=50 (got {repeat})");
    }
    Ok(())
}

fn check_peers(peers: usize) -> Result<()> {
    if peers == 0 || peers > 60_000 {
        bail!("--peers values must be 1..=60000 (got {peers})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_limits() {
        assert!(check_repeat(1).is_ok() && check_repeat(50).is_ok());
        assert_eq!(
            check_repeat(0).unwrap_err().to_string(),
            "--repeat must be 1..=50 (got 0)"
        );
        assert!(check_repeat(51).is_err());
        assert!(check_peers(1).is_ok() && check_peers(60_000).is_ok());
        assert_eq!(
            check_peers(60_001).unwrap_err().to_string(),
            "--peers values must be 1..=60000 (got 60001)"
        );
        assert!(check_peers(0).is_err());
    }

    #[tokio::test]
    async fn scale_series_refuses_bad_limits_before_running_anything() {
        let mut runs = 0;
        let e = scale_series(&[Mode::Routed], &[100], 0, |_| runs += 1)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "--repeat must be 1..=50 (got 0)");
        let e = scale_series(&[Mode::Routed, Mode::Bridged], &[0, 100], 3, |_| runs += 1)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "--peers values must be 1..=60000 (got 0)");
        assert_eq!(runs, 0);
        // Nothing asked for, nothing run.
        let rows = scale_series(&[], &[100], 3, |_| runs += 1).await.unwrap();
        assert!(rows.is_empty() && runs == 0);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of(&[5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!((s.n, s.min, s.max), (10, 1.0, 10.0));
        assert_eq!(s.p50, 5.0);
        assert_eq!(s.p90, 9.0);
        let one = Summary::of(&[7.0]);
        assert_eq!((one.p50, one.p90), (7.0, 7.0));
        assert_eq!(Summary::of(&[]).n, 0);
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["mode", "ms"]);
        t.row(vec!["routed".into(), "1.5".into()]);
        t.row(vec!["x".into(), "100.25".into()]);
        assert_eq!(
            t.render(),
            "mode        ms\nrouted     1.5\nx       100.25\n"
        );
    }

    #[test]
    fn ratio_of_nothing_is_zero() {
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(ratio(1.0, 2.0), 0.5);
    }
}
