//! `vxmesh bench docker`: the wall-clock time of `docker run --rm` of the
//! busybox image on a vxmesh network against the same on a network of
//! Docker's own bridge driver, interleaved in one run on one dockerd (a lab
//! host's, `lab up --runtime docker`). One untimed warm-up run each first;
//! the order alternates every iteration.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use vxmesh::config::Mode;

use super::{Summary, Table, ms, ratio};
use crate::lab::{IMAGE, Lab, LabGuard, LabSpec, Runtime};

pub struct DockerOptions {
    pub iterations: usize,
    pub mode: Mode,
    /// The vxmesh binary (agent and plugin of the lab).
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct DockerReport {
    pub iterations: usize,
    pub mode: String,
    /// `docker run --rm` on the vxmesh network, ms.
    pub vxmesh_ms: Summary,
    /// The same on a Docker bridge network, ms.
    pub bridge_ms: Summary,
    /// vxmesh / bridge, medians (target: <= 1.10).
    pub ratio_p50: f64,
}

/// The Docker network of Docker's own bridge driver the bench compares with.
const BRIDGE_NET: &str = "vxm-bench-br";

pub async fn run(o: &DockerOptions) -> Result<DockerReport> {
    let mut spec = LabSpec::new(&format!("bd{}", std::process::id() % 100_000), 1, 0);
    spec.mode = o.mode;
    spec.networks = 1;
    spec.exe = o.exe.clone();
    spec.runtime = Runtime::Docker;
    let lab = LabGuard(Lab::up(&spec).await?);
    let net = crate::lab::network_names(o.mode, 1)[0].clone();
    lab.docker(
        "host1",
        &[
            "network",
            "create",
            "-d",
            "bridge",
            "--subnet",
            "10.99.0.0/24",
            BRIDGE_NET,
        ],
    )?;
    let run_once = |network: &str| -> Result<Duration> {
        let t0 = Instant::now();
        lab.docker(
            "host1",
            &["run", "--rm", "--network", network, IMAGE, "echo"],
        )?;
        Ok(t0.elapsed())
    };
    run_once(&net)?;
    run_once(BRIDGE_NET)?;
    let (mut vx, mut br) = (Vec::new(), Vec::new());
    for i in 0..o.iterations {
        if i % 2 == 0 {
            vx.push(ms(run_once(&net)?));
            br.push(ms(run_once(BRIDGE_NET)?));
        } else {
            br.push(ms(run_once(BRIDGE_NET)?));
            vx.push(ms(run_once(&net)?));
        }
    }
    let _ = lab.docker("host1", &["network", "rm", BRIDGE_NET]);
    let (vxmesh_ms, bridge_ms) = (Summary::of(&vx), Summary::of(&br));
    Ok(DockerReport {
        iterations: o.iterations,
        mode: o.mode.to_string(),
        ratio_p50: ratio(vxmesh_ms.p50, bridge_ms.p50),
        vxmesh_ms,
        bridge_ms,
    })
}

pub fn table(r: &DockerReport) -> Table {
    let mut t = Table::new(&["network", "n", "min ms", "p50 ms", "p90 ms", "max ms"]);
    for (name, s) in [
        (format!("vxmesh ({})", r.mode), &r.vxmesh_ms),
        ("docker bridge".to_string(), &r.bridge_ms),
    ] {
        t.row(vec![
            name,
            s.n.to_string(),
            format!("{:.0}", s.min),
            format!("{:.0}", s.p50),
            format!("{:.0}", s.p90),
            format!("{:.0}", s.max),
        ]);
    }
    t.note(format!(
        "ratio vxmesh/bridge, docker run --rm median: {:.3} (target <= 1.10: {})",
        r.ratio_p50,
        if r.ratio_p50 <= 1.10 { "met" } else { "MISSED" }
    ));
    t
}
