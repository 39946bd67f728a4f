//! A real container runtime: podman (CNI network backend, runc) attaches its
//! containers through vxmesh as a CNI plugin, on two lab hosts, and the
//! containers reach each other across hosts over the overlay.
//!
//! Every lab host gets its own podman "installation" in a temp dir, as a real
//! machine would: private containers.conf (CONTAINERS_CONF), storage
//! (--root/--runroot, vfs), registries.conf, tmp dir, CNI plugin dir (a
//! symlink `vxmesh` to the built binary) and CNI config dir (one conflist
//! whose stateDir is that host's vxmesh state dir). podman runs inside the
//! host's namespace through `nsenter --net=` (never `ip netns exec`, which
//! remounts /sys and leaves runc without cgroups), so podman creates each
//! container's namespace itself and the plugin's host side is the lab host.
//! No registry is reachable: the image is a static busybox imported from a
//! tarball built by scripts/podman-image.sh.
//!
//! Needs podman, runc, busybox-static, nsenter and unshare (scripts/deps.sh).
//! Missing tools make the test fail, never skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use vxmesh::config::Mode;
use vxmesh_lab::lab::LabNode;

const NETWORK: &str = "vxmesh-net";
const CNI_CACHE: &str = "/var/lib/cni";

fn which(tool: &str) -> PathBuf {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .expect("run sh");
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

fn have(tool: &str) -> bool {
    !which(tool).as_os_str().is_empty()
}

fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// One lab host's podman: private configuration, store and CNI directories.
/// Dropping it removes its containers (CNI DEL runs), then whatever they may
/// have left: processes, mounts, network namespaces, cgroups, the directory.
struct Podman {
    dir: tempfile::TempDir,
    host_ns: String,
    cgroup_parent: String,
    sandboxes: Vec<PathBuf>,
}

/// A running podman container as the runtime reports it.
struct Ctr {
    id: String,
    ip: String,
    gateway: String,
    sandbox: PathBuf,
}

impl Podman {
    fn new(node: &LabNode, tag: &str) -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("vxm-podman-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        for sub in ["cni-bin", "cni-conf", "root", "runroot", "runc", "tmp"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        // The plugin directory holds the vxmesh binary under its plugin name.
        std::os::unix::fs::symlink(exe(), d.join("cni-bin/vxmesh")).unwrap();
        // runc keeps container state in /run/runc unless told otherwise, and
        // podman passes no --root to it (nor to its exit-command cleanup): a
        // wrapper named in containers.conf gives every call a private state dir.
        let runc = which("runc");
        let wrapper = format!(
            "#!/bin/sh\nexec {} --root {} \"$@\"\n",
            runc.display(),
            d.join("runc").display()
        );
        std::fs::write(d.join("runc-wrapper"), wrapper).unwrap();
        std::fs::set_permissions(
            d.join("runc-wrapper"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [ { "type": "vxmesh", "network": "demo", "stateDir": node.state_dir } ],
        });
        std::fs::write(
            d.join("cni-conf/vxmesh.conflist"),
            serde_json::to_string_pretty(&conflist).unwrap(),
        )
        .unwrap();
        let p = |s: &str| d.join(s).display().to_string();
        let conf = format!(
            r#"[containers]
# Lower than any inherited limit: setting podman's rootful defaults (nofile
# 1048576) fails where root lacks CAP_SYS_RESOURCE ("error setting rlimit type 7").
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{tmp}"
image_copy_tmp_dir = "{tmp}"

[engine.runtimes]
runc = ["{wrapper}"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{cnf}"
"#,
            events = p("tmp/events.log"),
            tmp = p("tmp"),
            bin = p("cni-bin"),
            cnf = p("cni-conf"),
            wrapper = p("runc-wrapper"),
        );
        std::fs::write(d.join("containers.conf"), conf).unwrap();
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            p("root"),
            p("runroot")
        );
        std::fs::write(d.join("storage.conf"), storage).unwrap();
        std::fs::write(d.join("registries.conf"), "").unwrap();
        Podman {
            dir,
            host_ns: node.netns.clone(),
            cgroup_parent: format!("/vxm-podman-{tag}-{}", node.name),
            sandboxes: Vec::new(),
        }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// `podman` with this host's private everything, inside the host's
    /// network namespace, under a timeout. `pre` goes between nsenter and podman.
    fn command(&self, pre: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args([
            "-k",
            "5",
            "40",
            "nsenter",
            &format!("--net=/run/netns/{}", self.host_ns),
        ])
        .args(pre)
        .arg("podman")
        .arg("--root")
        .arg(self.path("root"))
        .arg("--runroot")
        .arg(self.path("runroot"))
        .args(["--storage-driver", "vfs", "--runtime", "runc"])
        .args(args)
        .env("CONTAINERS_CONF", self.path("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
        .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
        .env("TMPDIR", self.path("tmp"));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(&[], args).output().expect("run podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "podman {} on {} failed:\n{}",
            args.join(" "),
            self.host_ns,
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `podman import` in a throwaway mount namespace with a tmpfs on
    /// /var/lib: podman 4.3 writes its blob-info cache to
    /// /var/lib/containers/cache whatever --root says.
    fn import(&self, tarball: &Path, image: &str) {
        let pre = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o mode=0755,size=64m vxm-scratch /var/lib && exec \"$@\"",
            "sh",
        ];
        let o = self
            .command(&pre, &["import", &tarball.display().to_string(), image])
            .output()
            .expect("run podman import");
        assert!(
            o.status.success(),
            "podman import on {} failed:\n{}",
            self.host_ns,
            text(&o)
        );
    }

    fn start(&mut self, name: &str, image: &str) -> Ctr {
        let cg = self.cgroup_parent.clone();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--pull",
            "never",
            "--cap-add",
            "NET_RAW",
        ];
        args.extend(["--cgroup-parent", &cg, image, "sleep", "300"]);
        let id = self.ok(&args);
        let info: Value =
            serde_json::from_str(&self.ok(&["inspect", name])).expect("podman inspect JSON");
        let net = &info[0]["NetworkSettings"];
        let sandbox = PathBuf::from(net["SandboxKey"].as_str().unwrap_or_default());
        self.sandboxes.push(sandbox.clone());
        let on = &net["Networks"][NETWORK];
        Ctr {
            id: id.lines().last().unwrap_or_default().to_string(),
            ip: on["IPAddress"].as_str().unwrap_or_default().to_string(),
            gateway: on["Gateway"].as_str().unwrap_or_default().to_string(),
            sandbox,
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let d = self.dir.path().display().to_string();
        // Remove every container of this private store: podman runs CNI DEL.
        match self
            .command(&[], &["rm", "--all", "--force", "--time", "0"])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("podman rm on {} failed:\n{}", self.host_ns, text(&o)),
            Err(e) => eprintln!("podman rm on {} did not run: {e}", self.host_ns),
        }
        // Whatever survived a failed removal: our processes (conmon, the
        // container, cleanup) all name our directory on their command line.
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(
                &std::fs::read(e.path().join("cmdline")).unwrap_or_default(),
            )
            .to_string();
            if pid != std::process::id() as i32 && cmdline.contains(&d) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Mounts under our directory (container shm) and the containers' namespaces.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut targets: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&d))
            .collect();
        targets.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in targets {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        for s in &self.sandboxes {
            if s.starts_with("/run/netns") && s.exists() {
                let _ = nix::mount::umount2(s, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(s);
            }
        }
        remove_cgroup_trees(self.cgroup_parent.trim_start_matches('/'));
        // The TempDir goes last and takes the store, configs and plugin link.
    }
}

/// Remove the cgroup directories named `name` at the top of every hierarchy
/// (v1 controllers and v2), deepest first; retries while processes leave.
fn remove_cgroup_trees(name: &str) {
    fn rmdir_tree(p: &Path) -> bool {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
        std::fs::remove_dir(p).is_ok() || !p.exists()
    }
    let roots = std::iter::once(PathBuf::from("/sys/fs/cgroup"))
        .chain(
            std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        )
        .map(|r| r.join(name))
        .filter(|p| p.is_dir())
        .collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(5);
    for r in roots {
        while !rmdir_tree(&r) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if r.exists() {
            eprintln!("cgroup {} could not be removed", r.display());
        }
    }
}

/// libcni (inside podman) keeps its result cache in /var/lib/cni whatever
/// podman is told; put things back as they were if the test created it.
struct CniCacheGuard {
    existed: bool,
}

impl CniCacheGuard {
    fn new() -> Self {
        CniCacheGuard {
            existed: Path::new(CNI_CACHE).exists(),
        }
    }
}

impl Drop for CniCacheGuard {
    fn drop(&mut self) {
        if !self.existed {
            // Only empty directories go: another runtime's entries stay.
            let _ = std::fs::remove_dir(Path::new(CNI_CACHE).join("results"));
            let _ = std::fs::remove_dir(CNI_CACHE);
        }
    }
}

fn host_veths(ns: &str) -> Vec<String> {
    ip(ns, &["-o", "link", "show", "type", "veth"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("vxm-"))
        .collect()
}

fn allocations(node: &LabNode) -> Vec<String> {
    std::fs::read_dir(node.state_dir.join("ipam/demo"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cni_cache_entries(id: &str) -> Vec<String> {
    std::fs::read_dir(Path::new(CNI_CACHE).join("results"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(id))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_containers_reach_each_other_across_hosts() {
    let t0 = Instant::now();
    let missing: Vec<&str> = [
        "podman", "runc", "conmon", "nsenter", "unshare", "timeout", "tar",
    ]
    .into_iter()
    .filter(|t| !have(t))
    .collect();
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}: run scripts/deps.sh (packages podman, runc, busybox-static)"
    );

    let s = spec("pm", 2, 0, Mode::Routed, 1);
    let lab = up(&s).await;
    let tag = lab.info.name.clone();
    let (h1, h2) = (
        lab.node("host1").unwrap().clone(),
        lab.node("host2").unwrap().clone(),
    );
    // Dropped after the podman fixtures (declared later), before the lab.
    let _cni_cache = CniCacheGuard::new();

    // The image: a static busybox rootfs tarball.
    let work = tempfile::Builder::new()
        .prefix("vxm-podman-img-")
        .tempdir()
        .unwrap();
    let tarball = work.path().join("busybox.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join("scripts/podman-image.sh");
    let o = Command::new(&script)
        .arg(&tarball)
        .output()
        .expect("run scripts/podman-image.sh");
    assert!(
        o.status.success(),
        "building the image failed:\n{}",
        text(&o)
    );
    let image = format!("localhost/vxm-busybox:{}", tag.to_lowercase());

    let mut p1 = Podman::new(&h1, &tag);
    let mut p2 = Podman::new(&h2, &tag);
    p1.import(&tarball, &image);
    p2.import(&tarball, &image);
    let networks = p1.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(
        networks.lines().any(|l| l == format!("{NETWORK} vxmesh")),
        "podman does not see the vxmesh network:\n{networks}"
    );
    let t_setup = t0.elapsed();

    let c1 = p1.start(&format!("{tag}-c1"), &image);
    let c2 = p2.start(&format!("{tag}-c2"), &image);
    let t_run = t0.elapsed();

    // Addresses from each node's subnet, held by that node's vxmesh IPAM; the
    // host end of each container's veth is vxmesh's, in the lab host.
    for (c, node, net, gw) in [
        (&c1, &h1, "172.18.10.", "172.18.10.1"),
        (&c2, &h2, "172.18.20.", "172.18.20.1"),
    ] {
        assert!(
            c.ip.starts_with(net),
            "container {} on {} got '{}', want an address in {net}0/24",
            c.id,
            node.name,
            c.ip
        );
        assert_eq!(c.gateway, gw);
        assert_eq!(
            allocations(node),
            vec![c.ip.clone()],
            "IPAM of {}",
            node.name
        );
        let veth = vxmesh::attach::host_veth_name("demo", &c.id, "eth0");
        assert_eq!(
            host_veths(&node.netns),
            vec![veth.clone()],
            "host veth on {}",
            node.name
        );
        assert!(
            c.sandbox.starts_with("/run/netns/") && c.sandbox.exists(),
            "podman made the namespace: {}",
            c.sandbox.display()
        );
    }

    // Across hosts, both directions, with the container's own ping.
    for (from, p, to) in [(&c1, &p1, &c2), (&c2, &p2, &c1)] {
        let o = p.run(&[
            "exec", &from.id, "ping", "-c", "3", "-A", "-W", "2", "-w", "6", &to.ip,
        ]);
        assert!(
            o.status.success(),
            "ping {} -> {} failed:\n{}",
            from.ip,
            to.ip,
            text(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("3 packets received"),
            "ping {} -> {}:\n{}",
            from.ip,
            to.ip,
            text(&o)
        );
    }
    let t_ping = t0.elapsed();

    // Removing the containers runs the plugin's DEL: no veth left, addresses
    // released, podman's namespaces and libcni's cached results gone.
    p1.ok(&["rm", "--force", "--time", "0", &c1.id]);
    p2.ok(&["rm", "--force", "--time", "0", &c2.id]);
    for (c, node) in [(&c1, &h1), (&c2, &h2)] {
        assert!(
            host_veths(&node.netns).is_empty(),
            "host veths left on {}: {:?}",
            node.name,
            host_veths(&node.netns)
        );
        assert!(
            allocations(node).is_empty(),
            "addresses still allocated on {}: {:?}",
            node.name,
            allocations(node)
        );
        assert!(
            !c.sandbox.exists(),
            "namespace {} left behind",
            c.sandbox.display()
        );
        assert!(
            cni_cache_entries(&c.id).is_empty(),
            "libcni still caches {}: {:?}",
            c.id,
            cni_cache_entries(&c.id)
        );
    }
    assert!(p1.ok(&["ps", "-a", "-q"]).is_empty() && p2.ok(&["ps", "-a", "-q"]).is_empty());
    let total = t0.elapsed();
    eprintln!(
        "podman test: lab + images {t_setup:.1?}, 2 containers up {:.1?}, pings {:.1?}, removal {:.1?}, total {total:.1?}",
        t_run - t_setup,
        t_ping - t_run,
        total - t_ping
    );
    assert!(total < Duration::from_secs(60), "took {total:?}");
}
