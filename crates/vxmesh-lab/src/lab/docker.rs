//! The lab's Docker runtime (`lab up --runtime docker`): every host runs its
//! own dockerd inside its namespace (private data-root, exec-root, pidfile,
//! API socket, containerd namespaces and cgroup parent; no bridge, no
//! iptables) and its own `vxmesh docker-plugin`, and the lab's containers
//! are Docker containers on Docker networks of the plugin.
//!
//! Docker finds the plugin through one `.spec` file per lab in the
//! machine-wide `/etc/docker/plugins`, named after the lab (`vxm-LAB`) so
//! that labs never collide: it holds a loopback URL, and since each dockerd
//! dials from its own namespace, each reaches the plugin of its own host.
//! A container's namespace is also bind-mounted at `/run/netns/vxm-LAB-NAME`
//! so the probes, `lab exec` and `lab check` reach it as any lab container.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{Lab, LabContainer};
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::state;

/// Where every host's plugin listens (on the host's own loopback).
pub const PLUGIN_PORT: u16 = 9474;
/// The image of the lab's containers, imported from Debian's static busybox.
pub const IMAGE: &str = "vxm-busybox:latest";
/// The machine-wide directory where Docker looks for `NAME.spec` files.
pub const PLUGIN_SPEC_DIR: &str = "/etc/docker/plugins";
/// Debian's dockerd (20.10); the `docker` client is whichever is on PATH.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The longest a docker client command of the lab may take.
pub const DOCKER_CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// How the lab runs its containers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Network namespaces attached by the library or the CNI plugin.
    #[default]
    Netns,
    /// Docker containers, one dockerd per host.
    Docker,
}

/// One host's Docker: its dockerd and its plugin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabDocker {
    /// dockerd's API socket: `docker -H unix://SOCKET ...`.
    pub socket: PathBuf,
    /// data-root, exec-root, pidfile, logs.
    pub dir: PathBuf,
    pub dockerd_pid: Option<u32>,
    pub plugin_pid: Option<u32>,
}

impl LabDocker {
    fn new(dir: PathBuf) -> LabDocker {
        LabDocker {
            socket: dir.join("docker.sock"),
            dir,
            dockerd_pid: None,
            plugin_pid: None,
        }
    }
}

/// The lab's plugin (and driver, and IPAM driver) name.
pub fn plugin_name(lab: &str) -> String {
    format!("vxm-{lab}")
}

fn spec_path(lab: &str) -> PathBuf {
    Path::new(PLUGIN_SPEC_DIR).join(format!("{}.spec", plugin_name(lab)))
}

/// The cgroup parent of a host's containers.
fn cgroup_parent(netns: &str) -> String {
    netns.to_string()
}

impl Lab {
    fn docker_of(&self, node: &str) -> Result<LabDocker> {
        self.node(node)?
            .docker
            .clone()
            .with_context(|| format!("{node} runs no dockerd (lab up --runtime docker)"))
    }

    /// Run the docker client against `node`'s dockerd; its stdout, or an
    /// error with its stderr (given up after [`DOCKER_CLIENT_TIMEOUT`]: a
    /// wedged daemon fails the step instead of hanging it).
    pub fn docker(&self, node: &str, args: &[&str]) -> Result<String> {
        let d = self.docker_of(node)?;
        let child = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", d.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run docker (the client; scripts/deps.sh installs docker.io)")?;
        let what = format!("{node}: docker {}", args.join(" "));
        let out = super::child::output_within(child, DOCKER_CLIENT_TIMEOUT, &what)?;
        if !out.status.success() {
            bail!(
                "{node}: docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Start Docker on every host: the plugin spec, each host's plugin and
    /// dockerd, the image, and one Docker network per vxmesh network.
    pub(crate) async fn start_docker_everywhere(&mut self, nets: &[String]) -> Result<()> {
        if !Path::new(DOCKERD).exists() {
            bail!("{DOCKERD} is missing: install docker.io (scripts/deps.sh)");
        }
        std::fs::create_dir_all(PLUGIN_SPEC_DIR)
            .with_context(|| format!("create {PLUGIN_SPEC_DIR}"))?;
        state::write_atomic(
            &spec_path(&self.info.name),
            format!("tcp://127.0.0.1:{PLUGIN_PORT}\n").as_bytes(),
        )?;
        let image = build_image(&self.info.dir)?;
        let names: Vec<String> = self.info.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &names {
            let dir = self.info.dir.join(n).join("docker");
            std::fs::create_dir_all(&dir)?;
            self.node_mut(n)?.docker = Some(LabDocker::new(dir));
            self.start_plugin(n)?;
            self.start_dockerd(n)?;
        }
        self.save()?;
        for n in &names {
            self.wait_dockerd(n, Duration::from_secs(60)).await?;
            self.docker(n, &["import", &image.display().to_string(), IMAGE])?;
            self.create_docker_networks(n, nets)?;
        }
        Ok(())
    }

    /// `docker network create` of every vxmesh network on `node`.
    pub fn create_docker_networks(&self, node: &str, nets: &[String]) -> Result<()> {
        let plugin = plugin_name(&self.info.name);
        let state_dir = &self.node(node)?.state_dir;
        for net in nets {
            let subnet = state::read_network(state_dir, net)?
                .state
                .subnet
                .to_string();
            let opt = format!("vxmesh.network={net}");
            self.docker(
                node,
                &[
                    "network",
                    "create",
                    "-d",
                    &plugin,
                    "--ipam-driver",
                    &plugin,
                    "-o",
                    &opt,
                    "--ipam-opt",
                    &opt,
                    "--subnet",
                    &subnet,
                    net,
                ],
            )?;
        }
        Ok(())
    }

    /// Start `node`'s plugin, listening on the host's loopback.
    pub fn start_plugin(&mut self, node: &str) -> Result<u32> {
        let n = self.node(node)?.clone();
        let d = self.docker_of(node)?;
        let log = log_file(&d.dir.join("plugin.log"))?;
        let mut cmd = Command::new(&self.spec_exe);
        cmd.args(["-v", "docker-plugin", "--state-dir"])
            .arg(&n.state_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{PLUGIN_PORT}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let pid = self.spawn_in(&n.netns, cmd, &format!("{node}:plugin"))?;
        self.node_mut(node)?
            .docker
            .as_mut()
            .expect("docker")
            .plugin_pid = Some(pid);
        self.save()?;
        Ok(pid)
    }

    /// Start `node`'s dockerd (it starts its own containerd).
    pub fn start_dockerd(&mut self, node: &str) -> Result<u32> {
        let n = self.node(node)?.clone();
        let d = self.docker_of(node)?;
        let config = d.dir.join("daemon.json");
        std::fs::write(&config, "{}\n")?;
        let log = log_file(&d.dir.join("dockerd.log"))?;
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(d.dir.join("data"))
            .arg("--exec-root")
            .arg(d.dir.join("exec"))
            .arg("--pidfile")
            .arg(d.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.socket.display()))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--storage-driver=vfs",
            ])
            .arg("--containerd-namespace")
            .arg(&n.netns)
            .arg("--containerd-plugins-namespace")
            .arg(format!("{}-plugins", n.netns))
            .arg("--cgroup-parent")
            .arg(cgroup_parent(&n.netns))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let pid = self.spawn_in(&n.netns, cmd, &format!("{node}:dockerd"))?;
        self.node_mut(node)?
            .docker
            .as_mut()
            .expect("docker")
            .dockerd_pid = Some(pid);
        self.save()?;
        Ok(pid)
    }

    fn spawn_in(&mut self, netns: &str, mut cmd: Command, key: &str) -> Result<u32> {
        let ns = Netns::open(netns)?;
        ns.enter_on_exec(&mut cmd);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {key} in {netns}"))?;
        let pid = child.id();
        self.children.insert(key.to_string(), child);
        Ok(pid)
    }

    /// Wait until `node`'s dockerd answers and its plugin is reachable.
    pub async fn wait_dockerd(&self, node: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.docker(node, &["version", "--format", "{{.Server.Version}}"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let log = self.docker_of(node)?.dir.join("dockerd.log");
                    return Err(
                        e.context(format!("dockerd of {node} not up (see {})", log.display()))
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Stop `node`'s plugin (`signal`, then wait for it).
    pub fn stop_plugin(&mut self, node: &str, signal: Signal) -> Result<()> {
        let pid = self.docker_of(node)?.plugin_pid;
        self.stop_process(
            &format!("{node}:plugin"),
            pid,
            signal,
            Duration::from_secs(10),
        )?;
        self.node_mut(node)?
            .docker
            .as_mut()
            .expect("docker")
            .plugin_pid = None;
        self.save()
    }

    /// Stop `node`'s dockerd (`signal`; SIGTERM stops its containers and
    /// its containerd), then wait for it.
    pub fn stop_dockerd(&mut self, node: &str, signal: Signal) -> Result<()> {
        let pid = self.docker_of(node)?.dockerd_pid;
        self.stop_process(
            &format!("{node}:dockerd"),
            pid,
            signal,
            Duration::from_secs(40),
        )?;
        self.node_mut(node)?
            .docker
            .as_mut()
            .expect("docker")
            .dockerd_pid = None;
        self.save()
    }

    fn stop_process(
        &mut self,
        key: &str,
        pid: Option<u32>,
        signal: Signal,
        grace: Duration,
    ) -> Result<()> {
        let Some(pid) = pid else { return Ok(()) };
        let _ = kill(Pid::from_raw(pid as i32), signal);
        let deadline = Instant::now() + grace;
        let mut child = self.children.remove(key);
        loop {
            let gone = match child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => !Path::new(&format!("/proc/{pid}")).exists(),
            };
            if gone {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                if let Some(c) = child.as_mut() {
                    let _ = c.wait();
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `docker run` a container on `node`'s Docker network `network` and
    /// give its namespace the lab's name for it.
    pub(crate) async fn docker_add(
        &mut self,
        node: &str,
        network: &str,
        cname: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<LabContainer> {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            cname,
            "--hostname",
            cname,
            "--network",
            network,
            "--stop-timeout",
            "1",
            "--restart",
            "always",
        ];
        let ip_text = ip.map(|i| i.to_string());
        if let Some(i) = &ip_text {
            args.extend(["--ip", i]);
        }
        args.extend([IMAGE, "sleep", "1000000"]);
        self.docker(node, &args)?;
        let ns_name = format!("vxm-{}-{cname}", self.info.name);
        self.bind_container_netns(node, cname, &ns_name)?;
        let ip = self
            .docker(
                node,
                &[
                    "inspect",
                    "-f",
                    &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
                    cname,
                ],
            )?
            .parse()
            .with_context(|| format!("the address Docker gave {cname}"))?;
        let c = LabContainer {
            name: cname.to_string(),
            node: node.to_string(),
            network: network.to_string(),
            netns: ns_name,
            ip,
        };
        self.info.containers.push(c.clone());
        self.save()?;
        Ok(c)
    }

    /// `docker rm -f` a lab container and forget its namespace.
    pub(crate) fn docker_remove(&mut self, c: &LabContainer) -> Result<()> {
        self.docker(&c.node, &["rm", "-f", &c.name])?;
        netns::delete(&c.netns)?;
        self.info.containers.retain(|x| x.name != c.name);
        self.save()
    }

    /// Bind-mount the running container's network namespace at
    /// `/run/netns/NS_NAME` (again after a restart gave it a new one).
    pub fn bind_container_netns(&self, node: &str, cname: &str, ns_name: &str) -> Result<()> {
        let pid = self.docker(node, &["inspect", "-f", "{{.State.Pid}}", cname])?;
        if pid == "0" {
            bail!("container {cname} on {node} is not running");
        }
        netns::delete(ns_name)?;
        let target = Path::new("/run/netns").join(ns_name);
        std::fs::File::create(&target).with_context(|| format!("create {}", target.display()))?;
        mount(
            Some(format!("/proc/{pid}/ns/net").as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "bind the namespace of {cname} (pid {pid}) to {}",
                target.display()
            )
        })
    }

    /// Take every host's Docker down: containers, dockerd (and its
    /// containerd and shims), plugin, leftover mounts and cgroups, and the
    /// plugin spec file. Keeps going; returns the problems.
    pub(crate) fn docker_down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for n in self.info.nodes.clone() {
            let Some(d) = n.docker.clone() else { continue };
            if d.dockerd_pid.is_some() {
                if let Ok(ids) = self.docker(&n.name, &["ps", "-aq"])
                    && !ids.is_empty()
                {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids.lines());
                    if let Err(e) = self.docker(&n.name, &args) {
                        problems.push(format!("{e:#}"));
                    }
                }
                if let Err(e) = self.stop_dockerd(&n.name, Signal::SIGTERM) {
                    problems.push(format!("stop dockerd of {}: {e:#}", n.name));
                }
            }
            if let Err(e) = self.stop_plugin(&n.name, Signal::SIGTERM) {
                problems.push(format!("stop plugin of {}: {e:#}", n.name));
            }
            remove_cgroups(&cgroup_parent(&n.netns), &mut problems);
        }
        kill_lab_docker_processes(&self.info.dir);
        unmount_under(&self.info.dir, &mut problems);
        remove_spec(&self.info.name, &mut problems);
        problems
    }
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// Build the busybox image tarball (as scripts/podman-image.sh does).
fn build_image(lab_dir: &Path) -> Result<PathBuf> {
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        bail!("/bin/busybox is missing: install busybox-static (scripts/deps.sh)");
    }
    let root = lab_dir.join("image-root");
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(bb, root.join("bin/busybox"))?;
    for app in [
        "sh", "ping", "nc", "sleep", "ip", "cat", "ls", "echo", "hostname",
    ] {
        let link = root.join("bin").join(app);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    let out = lab_dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
        .arg(&out)
        .arg(".")
        .status()
        .context("run tar")?;
    if !status.success() {
        bail!("tar of the image root failed");
    }
    std::fs::remove_dir_all(&root)?;
    Ok(out)
}

/// Processes started under the lab's directory that outlived their
/// dockerd (containerd, shims, after a dockerd was killed): found by the
/// lab directory in their command line, killed by pid.
pub(crate) fn kill_lab_docker_processes(lab_dir: &Path) {
    // With the slash: lab `dk` must not match lab `dk2`'s processes.
    let needle = format!("{}/", lab_dir.display());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let docker_side = ["dockerd", "containerd", "docker-plugin"]
            .iter()
            .any(|w| text.contains(w));
        if docker_side && text.contains(&needle) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Unmount whatever dockerd left mounted under the lab dir (deepest first).
fn unmount_under(dir: &Path, problems: &mut Vec<String>) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        if let Err(e) = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            problems.push(format!("unmount {p}: {e}"));
        }
    }
}

/// Remove a host's cgroup parent in every hierarchy (children first).
fn remove_cgroups(parent: &str, problems: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for h in rd.flatten() {
        let p = h.path().join(parent);
        if p.is_dir() {
            collect_dirs(&p, &mut dirs);
        }
    }
    let p = Path::new("/sys/fs/cgroup").join(parent);
    if p.is_dir() && !dirs.contains(&p) {
        collect_dirs(&p, &mut dirs);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        if let Err(e) = std::fs::remove_dir(&d)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove cgroup {}: {e}", d.display()));
        }
    }
}

fn collect_dirs(p: &Path, out: &mut Vec<PathBuf>) {
    out.push(p.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn remove_spec(lab: &str, problems: &mut Vec<String>) {
    let p = spec_path(lab);
    if let Err(e) = std::fs::remove_file(&p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("remove {}: {e}", p.display()));
    }
}

/// Take down a lab's Docker side knowing only its name and directory.
pub(crate) fn docker_down_by_name(lab: &str, dir: &Path) {
    kill_lab_docker_processes(dir);
    let mut problems = Vec::new();
    unmount_under(dir, &mut problems);
    remove_spec(lab, &mut problems);
}
