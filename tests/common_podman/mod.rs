//! The podman fixture of the CNI runtime tests (tests/podman.rs,
//! tests/podman_ports.rs): one private podman "installation" per lab host.
//!
//! Every lab host gets its own podman in a temp dir, as a real machine
//! would: private containers.conf (CONTAINERS_CONF), storage
//! (--root/--runroot, vfs), registries.conf, tmp dir, CNI plugin dir (a
//! symlink `vxmesh` to the built binary, and the chained reference plugins)
//! and CNI config dir (one conflist whose stateDir is that host's vxmesh
//! state dir). podman runs inside the host's namespace through `nsenter
//! --net=` (never `ip netns exec`, which remounts /sys and leaves runc
//! without cgroups), so podman creates each container's namespace itself and
//! the plugin's host side is the lab host. No registry is reachable: the
//! image is a static busybox imported from a tarball built by
//! scripts/podman-image.sh.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::{exe, ip};
use serde_json::{Value, json};
use vxmesh_lab::lab::LabNode;

/// Where Debian's containernetworking-plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Build the busybox image tarball into `dir` (scripts/podman-image.sh).
pub fn build_image(dir: &Path) -> PathBuf {
    let tarball = dir.join("busybox.tar");
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
    tarball
}

pub const NETWORK: &str = "vxmesh-net";
pub const CNI_CACHE: &str = "/var/lib/cni";

pub fn which(tool: &str) -> PathBuf {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .expect("run sh");
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

pub fn have(tool: &str) -> bool {
    !which(tool).as_os_str().is_empty()
}

pub fn text(o: &Output) -> String {
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
pub struct Podman {
    dir: tempfile::TempDir,
    host_ns: String,
    cgroup_parent: String,
    sandboxes: Vec<PathBuf>,
}

/// A running podman container as the runtime reports it.
pub struct Ctr {
    pub id: String,
    pub ip: String,
    pub gateway: String,
    pub sandbox: PathBuf,
}

impl Podman {
    pub fn new(node: &LabNode, tag: &str) -> Podman {
        Podman::with_chain(node, tag, &[])
    }

    /// A podman whose network chains `chained` (the reference plugins'
    /// configurations, from `/usr/lib/cni`) after vxmesh.
    pub fn with_chain(node: &LabNode, tag: &str, chained: &[Value]) -> Podman {
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
        for p in chained {
            let kind = p["type"].as_str().expect("a plugin type");
            std::os::unix::fs::symlink(
                Path::new(REFERENCE_PLUGINS).join(kind),
                d.join("cni-bin").join(kind),
            )
            .unwrap();
        }
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
        let mut plugins =
            vec![json!({ "type": "vxmesh", "network": "demo", "stateDir": node.state_dir })];
        plugins.extend(chained.iter().cloned());
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": plugins,
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

    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// `podman` with this host's private everything, inside the host's
    /// network namespace, under a timeout. `pre` goes between nsenter and podman.
    pub fn command(&self, pre: &[&str], args: &[&str]) -> Command {
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

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(&[], args).output().expect("run podman")
    }

    pub fn ok(&self, args: &[&str]) -> String {
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
    pub fn import(&self, tarball: &Path, image: &str) {
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

    pub fn start(&mut self, name: &str, image: &str) -> Ctr {
        self.start_with(name, image, &[], &["sleep", "300"])
    }

    /// `podman run -d` with `extra` options and the container's command.
    pub fn start_with(&mut self, name: &str, image: &str, extra: &[&str], cmd: &[&str]) -> Ctr {
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
        args.extend(extra);
        args.extend(["--cgroup-parent", &cg, image]);
        args.extend(cmd);
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
pub fn remove_cgroup_trees(name: &str) {
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
pub struct CniCacheGuard {
    existed: bool,
}

impl CniCacheGuard {
    pub fn new() -> Self {
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

pub fn host_veths(ns: &str) -> Vec<String> {
    ip(ns, &["-o", "link", "show", "type", "veth"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("vxm-"))
        .collect()
}

pub fn allocations(node: &LabNode) -> Vec<String> {
    std::fs::read_dir(node.state_dir.join("ipam/demo"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn cni_cache_entries(id: &str) -> Vec<String> {
    std::fs::read_dir(Path::new(CNI_CACHE).join("results"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(id))
                .collect()
        })
        .unwrap_or_default()
}
