//! Shared helpers of the namespace/lab integration tests (run as root).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vxmesh::config::Mode;
use vxmesh_lab::lab::{Lab, LabGuard, LabSpec};

pub mod frames;
mod naming;
mod plugin;
pub mod underlay;

#[allow(unused_imports)] // not every test file names namespaces
pub use naming::{unique, unique_ns};
#[allow(unused_imports)] // only the CNI tests run the plugin
pub use plugin::{Out, run_cni};

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vxmesh"))
}

pub fn spec(tag: &str, nodes: usize, containers: usize, mode: Mode, networks: usize) -> LabSpec {
    let mut s = LabSpec::new(&unique(tag), nodes, containers);
    s.mode = mode;
    s.networks = networks;
    s.exe = exe();
    s
}

/// The lab size of the demo tests: `VXMESH_LAB_NODES` hosts with
/// `VXMESH_LAB_CONTAINERS` containers each when set (the 250-host runs,
/// outside CI: `VXMESH_LAB_NODES=250 VXMESH_LAB_CONTAINERS=1 cargo test
/// --test lab_routed demo_cli`), else the test's own default.
pub fn lab_size(nodes: usize, containers: usize) -> (usize, usize) {
    let var = |name: &str, default: usize| match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: give a whole number")),
        Err(_) => default,
    };
    (
        var("VXMESH_LAB_NODES", nodes),
        var("VXMESH_LAB_CONTAINERS", containers),
    )
}

pub async fn up(spec: &LabSpec) -> LabGuard {
    LabGuard(Lab::up(spec).await.expect("lab up"))
}

/// Poll `f` until it returns true or `timeout` passes; returns the time taken.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Run `vxmesh ARGS` and return (exit code, stdout, stderr).
pub fn vxmesh(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(exe())
        .args(args)
        .output()
        .expect("run vxmesh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ip -n NS ARGS` output, for inspection only.
pub fn ip(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bridge -n NS ARGS` output, for inspection only.
pub fn bridge(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("bridge")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("run bridge");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// vxmesh's routes (protocol 86), and the permanent neighbours and FDB
/// entries with a remote on VTEP `vtep` of a host (inspection with `ip`/`bridge`).
pub fn entries_on(host_ns: &str, vtep: &str) -> (usize, usize, usize) {
    let routes = ip(host_ns, &["route", "show", "proto", "86"])
        .lines()
        .count();
    let neigh = ip(host_ns, &["neigh", "show", "dev", vtep, "nud", "permanent"])
        .lines()
        .count();
    let fdb = bridge(host_ns, &["fdb", "show", "dev", vtep])
        .lines()
        .filter(|l| l.contains(" dst "))
        .count();
    (routes, neigh, fdb)
}

/// [`entries_on`] the routed labs' VTEP `vxm-vx100`.
pub fn vtep_entries(host_ns: &str) -> (usize, usize, usize) {
    entries_on(host_ns, "vxm-vx100")
}

/// Assert nothing of lab `name` is left on the machine.
pub fn assert_gone(name: &str) {
    let prefix = format!("vxm-{name}-");
    let left = vxmesh::dataplane::netns::list(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(
        !std::path::Path::new(vxmesh_lab::lab::LAB_ROOT)
            .join(name)
            .exists(),
        "lab dir left behind"
    );
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("agent") && c.contains(&prefix))
        .collect::<Vec<_>>();
    assert!(procs.is_empty(), "agent processes left behind: {procs:?}");
}

/// [`assert_gone`], and no etcd server of the lab left either.
pub fn assert_all_gone(name: &str) {
    assert_gone(name);
    let dir = format!("{}/{name}/", vxmesh_lab::lab::LAB_ROOT);
    let etcds: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("/usr/bin/etcd") && c.contains(&dir))
        .collect();
    assert!(etcds.is_empty(), "etcd left behind: {etcds:?}");
    // Nor the tmpfs of the lab's etcd data.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&dir)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}
