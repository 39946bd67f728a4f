//! `lab --attach cni`: the lab attaches its containers by running the vxmesh
//! binary as a CNI plugin, exactly as a container runtime does, and the
//! result is a working cluster in both data-plane modes.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::*;
use serde_json::Value;
use vxmesh::config::Mode;
use vxmesh_lab::lab::AttachMode;

/// A wrapper around the vxmesh binary that records every CNI invocation
/// (environment and stdin) and then runs the real binary, so the test can
/// prove the lab went through the plugin protocol.
struct Recorder {
    dir: tempfile::TempDir,
}

impl Recorder {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vxm-labcni-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        let script = format!(
            "#!/bin/sh\n\
             if [ -n \"$CNI_COMMAND\" ]; then\n\
               f={d}/call.$$\n\
               cat > \"$f.stdin\"\n\
               printf '%s\\n' \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_NETNS\" \"$CNI_IFNAME\" \"$CNI_PATH\" \"$(readlink /proc/self/ns/net)\" > \"$f.env\"\n\
               exec {exe} \"$@\" < \"$f.stdin\"\n\
             fi\n\
             exec {exe} \"$@\"\n",
            exe = exe().display()
        );
        let path = dir.path().join("vxmesh");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Recorder { dir }
    }

    fn exe(&self) -> std::path::PathBuf {
        self.dir.path().join("vxmesh")
    }

    /// (env lines, parsed stdin) of every recorded call.
    fn calls(&self) -> Vec<(Vec<String>, Value)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "env") {
                let env: Vec<String> = std::fs::read_to_string(&p)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect();
                let stdin = std::fs::read(p.with_extension("stdin")).unwrap();
                out.push((env, serde_json::from_slice(&stdin).unwrap()));
            }
        }
        out
    }
}

async fn cni_lab(tag: &str, mode: Mode) {
    let rec = Recorder::new();
    let mut s = spec(tag, 2, 2, mode, 1);
    s.attach = AttachMode::Cni;
    s.exe = rec.exe();
    let name = s.name.clone();
    {
        let lab = up(&s).await;
        assert_eq!(lab.info.containers.len(), 4);
        // Every container came through one CNI ADD with the runtime's environment.
        let calls = rec.calls();
        assert_eq!(calls.len(), 4, "one ADD per container: {calls:?}");
        for c in &lab.info.containers {
            let node = lab.node(&c.node).unwrap();
            let (env, conf) = calls
                .iter()
                .find(|(env, _)| env[1] == c.name)
                .unwrap_or_else(|| panic!("no CNI call for {}", c.name));
            assert_eq!(env[0], "ADD");
            assert_eq!(env[2], format!("/run/netns/{}", c.netns));
            assert_eq!(env[3], "eth0");
            assert_eq!(
                env[4],
                rec.dir.path().display().to_string(),
                "CNI_PATH is the plugin's directory"
            );
            // The plugin ran in the node's namespace, not the caller's.
            let host_ns = std::fs::metadata(format!("/run/netns/{}", node.netns))
                .unwrap()
                .ino();
            assert_eq!(
                env[5],
                format!("net:[{host_ns}]"),
                "the plugin must run in {}",
                node.netns
            );
            assert_eq!(conf["cniVersion"], "1.1.0");
            assert_eq!(conf["type"], "vxmesh");
            assert_eq!(conf["network"], c.network.as_str());
            assert_eq!(conf["stateDir"], node.state_dir.display().to_string());
            // The address the lab recorded is the one the IPAM holds.
            let held = node
                .state_dir
                .join("ipam")
                .join(&c.network)
                .join(c.ip.to_string());
            assert!(
                held.exists(),
                "{} is not allocated in {}",
                c.ip,
                held.display()
            );
        }
        let report = lab.check(Duration::from_secs(2)).unwrap();
        assert_eq!(report.results.len(), 4 * 3, "all ordered pairs probed");
        assert!(
            report.results.iter().all(|r| r.expect_reach),
            "one network: every pair must reach"
        );
        let fails = report.failures();
        assert!(
            fails.is_empty(),
            "{mode} lab attached by CNI:\n{}\n{fails:?}",
            report.matrix()
        );
    }
    assert_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_lab_attached_by_cni() {
    cni_lab("lcr", Mode::Routed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_lab_attached_by_cni() {
    cni_lab("lcb", Mode::Bridged).await;
}
