//! The lab's etcd store: a cluster of 1 to 5 `/usr/bin/etcd` members, each
//! in its own network namespace `vxm-LAB-etcdI` joined to the lab's
//! underlay bridge like a host (member I listens on 198.18.0.(255-I):2379,
//! so the first is 198.18.0.254). Agents get every member as an endpoint.
//! Nothing listens in the root namespace; the lab process itself talks to
//! etcd from a thread inside the underlay namespace ([`Netns::run_async`]),
//! whose bridge holds the lab's own address [`LAB_CONTROL_IP`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{Lab, LabSpec, UNDERLAY_PREFIX, cluster_file_for, memfs, network_names, underlay_mac};
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::store::etcd::{self, ClientOptions};

pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The first etcd member's address on the underlay.
pub const ETCD_IP: Ipv4Addr = member_ip(1);
pub const ETCD_PORT: u16 = 2379;
/// Peer port, on each member's underlay address.
const ETCD_PEER_PORT: u16 = 2380;
/// Most members a lab runs (198.18.0.250-254).
pub const MAX_ETCD_MEMBERS: usize = 5;
/// The lab process's own address on the underlay bridge (etcd labs), from
/// which it reads and writes etcd; hosts stay below it.
pub const LAB_CONTROL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 249);
/// The nice value of the lab's etcd members (see [`Lab::start_etcd`]).
const ETCD_NICE: i32 = -10;
/// Default lease TTL of lab agents: crashed hosts vanish quickly.
pub const LAB_TTL: Duration = Duration::from_secs(3);

/// The underlay address of member `i` (1-based): 198.18.0.254, .253, ...
pub const fn member_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, (255 - i) as u8)
}

/// Where the lab's nodes and endpoints live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabStore {
    /// One cluster file for every host (`LAB_DIR/cluster.toml`).
    #[default]
    Static,
    /// An etcd cluster in namespaces of its own; hosts join and leave dynamically.
    Etcd,
}

/// One etcd member of a lab (in `lab.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EtcdMember {
    /// `etcd1`, `etcd2`, ...: etcd's `--name`.
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pid: Option<u32>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl EtcdMember {
    /// `http://IP:2379`.
    pub fn client_url(&self) -> String {
        format!("http://{}:{ETCD_PORT}", self.ip)
    }
    fn peer_url(&self) -> String {
        format!("http://{}:{ETCD_PEER_PORT}", self.ip)
    }
}

/// The lab's etcd cluster and how its agents use it (in `lab.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabEtcd {
    /// What agents get as `--store` (every member).
    pub store: String,
    #[serde(default)]
    pub members: Vec<EtcdMember>,
    /// etcd's `--initial-cluster-token` (also needed to restore a snapshot).
    #[serde(default)]
    pub token: String,
    /// Lease TTL of the agents (`--ttl`).
    pub ttl_secs: u64,
    /// The networks every host joins.
    pub networks: Vec<String>,
}

impl LabEtcd {
    fn new(dir: &Path, spec: &LabSpec) -> LabEtcd {
        let members: Vec<EtcdMember> = (1..=spec.etcd_members)
            .map(|i| EtcdMember {
                name: format!("etcd{i}"),
                netns: format!("vxm-{}-etcd{i}", spec.name),
                ip: member_ip(i),
                pid: None,
                data_dir: dir.join("etcd").join(format!("etcd{i}")),
                log: dir.join("etcd").join(format!("etcd{i}.log")),
            })
            .collect();
        LabEtcd {
            store: store_url(&members),
            members,
            token: format!("vxmesh-lab-{}", spec.name),
            ttl_secs: spec.ttl.as_secs().max(etcd::MIN_TTL.as_secs()),
            networks: network_names(spec.mode, spec.networks),
        }
    }

    /// Client options for the lab process (used inside the underlay
    /// namespace): every member.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions::new(self.members.iter().map(|m| m.client_url()).collect())
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Result<&EtcdMember> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .with_context(|| {
                format!(
                    "no etcd member '{name}' (members: {})",
                    self.members
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// etcd's `--initial-cluster`: `etcd1=http://IP:2380,...`.
    pub fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `etcd://IP1:2379,IP2:2379,...`.
pub fn store_url(members: &[EtcdMember]) -> String {
    let eps: Vec<String> = members
        .iter()
        .map(|m| format!("{}:{ETCD_PORT}", m.ip))
        .collect();
    format!("etcd://{}", eps.join(","))
}

/// Is `pid` an etcd of the lab whose dir is `dir`? (Guards against pid reuse.)
pub(super) fn is_lab_etcd(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = String::from_utf8_lossy(&cmdline);
    text.starts_with(ETCD_BIN) && text.contains(&format!("{}/", dir.display()))
}

/// The directory of the lab's etcd members (their data and logs).
fn data_root(lab_dir: &Path) -> PathBuf {
    lab_dir.join("etcd")
}

/// Give the lab's etcd members a file system in memory (see
/// [`super::memfs`]): nothing to do when the whole lab is on one; a
/// tmpfs at `LAB/etcd` otherwise (a Docker lab, whose dockerd keeps its
/// data root on the disk), unmounted by [`unmount_data`] on `down`.
fn mount_data(lab_dir: &Path) -> Result<()> {
    memfs::mount(&data_root(lab_dir), "the lab's etcd")
}

/// Unmount the tmpfs of the lab's etcd (see [`mount_data`]), if mounted;
/// its members must be stopped.
pub(super) fn unmount_data(lab_dir: &Path) -> Result<()> {
    memfs::unmount(&data_root(lab_dir))
}

/// Kill every etcd serving the lab whose dir is `dir` (SIGKILL; waits a little).
pub(super) fn kill_lab_etcd(dir: &Path) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if is_lab_etcd(pid, dir) {
            kill_and_wait(pid);
        }
    }
}

pub(super) fn kill_and_wait(pid: u32) {
    // A paused (SIGSTOP) member dies of SIGKILL all the same.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    // Not our child when the lab was loaded from lab.json: init reaps it.
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Lab {
    /// The lab's etcd settings (an error for static labs).
    pub fn etcd(&self) -> Result<&LabEtcd> {
        self.info.etcd.as_ref().with_context(|| {
            format!(
                "lab '{}' uses the static store, not etcd (lab up --store etcd)",
                self.info.name
            )
        })
    }

    /// Run an etcd job of the lab process inside the underlay namespace,
    /// with client options naming every member.
    pub async fn in_underlay<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(ClientOptions) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let co = self.etcd()?.client_options();
        Netns::open(&self.info.underlay_ns)?
            .run_async(move || f(co))
            .await
    }

    /// Set up the etcd store while building: the members' namespaces and
    /// links, the lab's address on the bridge, the members, and the lab's
    /// networks.
    pub(super) async fn setup_etcd(&mut self, ul_nl: &Netlink, spec: &LabSpec) -> Result<()> {
        if !Path::new(ETCD_BIN).exists() {
            bail!(
                "{ETCD_BIN} is missing: install the Debian package etcd-server (scripts/deps.sh)"
            );
        }
        if !(1..=MAX_ETCD_MEMBERS).contains(&spec.etcd_members) {
            bail!(
                "--etcd-members must be 1..={MAX_ETCD_MEMBERS} (got {})",
                spec.etcd_members
            );
        }
        ul_nl
            .add_address("br-ul", Ipv4Net::new(LAB_CONTROL_IP, UNDERLAY_PREFIX)?)
            .await
            .context("the lab's address on the underlay bridge")?;
        let e = LabEtcd::new(&self.info.dir, spec);
        for m in &e.members {
            create_member_host(ul_nl, m).await?;
        }
        mount_data(&self.info.dir)?;
        self.info.etcd = Some(e);
        self.save()?;
        self.start_etcd().await?;
        let file = cluster_file_for(spec);
        let (mut nets, settings) = (file.networks, file.encryption);
        // `--encrypt`: the first network over the secure underlay; the
        // agents publish their keys in their records.
        if spec.encrypt
            && let Some(first) = nets.first_mut()
        {
            first.encrypt = true;
        }
        self.in_underlay(move |co| async move {
            for nf in &nets {
                let net = etcd::validate_network(nf)?;
                let settings = settings.as_ref().filter(|_| net.encrypt);
                etcd::create_network(&co, etcd::DEFAULT_PREFIX, &net, settings).await?;
            }
            Ok(())
        })
        .await
        .context("create the lab's networks in etcd")
    }

    /// Start every member of the lab's etcd (again, on the same data) and
    /// wait until the cluster answers.
    pub async fn start_etcd(&mut self) -> Result<()> {
        let names: Vec<String> = self
            .etcd()?
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect();
        for n in &names {
            self.spawn_member(n)?;
        }
        let co = self.etcd()?.client_options();
        self.wait_etcd_answers(co, "the etcd cluster", None).await
    }

    /// Start one member (again, on its data) and wait until it answers a
    /// linearizable read itself (it has rejoined the quorum).
    pub async fn start_member(&mut self, member: &str) -> Result<()> {
        self.spawn_member(member)?;
        let url = self.etcd()?.member(member)?.client_url();
        self.wait_etcd_answers(ClientOptions::new(vec![url]), member, Some(member))
            .await
    }

    fn spawn_member(&mut self, member: &str) -> Result<u32> {
        let e = self.etcd()?.clone();
        let m = e.member(member)?.clone();
        if let Some(pid) = m.pid
            && is_lab_etcd(pid, &self.info.dir)
        {
            bail!(
                "etcd member {member} of lab '{}' is already running (pid {pid})",
                self.info.name
            );
        }
        std::fs::create_dir_all(m.data_dir.parent().unwrap_or(&m.data_dir))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let ns = Netns::open(&m.netns)?;
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(format!("{},http://127.0.0.1:{ETCD_PORT}", m.client_url()))
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(e.initial_cluster())
            .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
            .arg(&e.token)
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own process group (a terminal's Ctrl-C is not for it), and
        // entered into the member's namespace before exec.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        ns.enter_on_exec(&mut cmd);
        // A higher CPU priority (this process and the threads it makes): on
        // a real cluster etcd has machines of its own, here it shares the
        // cores with every agent of the lab, and hundreds of agents started
        // at once would starve the store they all wait for.
        // SAFETY: only setpriority(2), async-signal-safe, runs in the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setpriority(libc::PRIO_PROCESS, 0, ETCD_NICE);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {ETCD_BIN} in {}", m.netns))?;
        drop(ns);
        let pid = child.id();
        self.etcd_children.insert(m.name.clone(), child);
        self.member_mut(member)?.pid = Some(pid);
        self.save()?;
        Ok(pid)
    }

    /// Wait (20 s at most) until a linearizable read through `co` answers;
    /// fail early, with its log, if a member this process started exits.
    async fn wait_etcd_answers(
        &mut self,
        co: ClientOptions,
        what: &str,
        member: Option<&str>,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = co.clone();
            let ok = Netns::open(&self.info.underlay_ns)?
                .run_async(move || async move {
                    Ok::<_, anyhow::Error>(
                        tokio::time::timeout(
                            Duration::from_secs(1),
                            etcd::get_network(&probe, etcd::DEFAULT_PREFIX, "probe"),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok()),
                    )
                })
                .await?;
            if ok {
                return Ok(());
            }
            for (name, child) in self.etcd_children.iter_mut() {
                if member.is_some_and(|m| m != name) {
                    continue;
                }
                if let Some(status) = child.try_wait()? {
                    let log = self
                        .info
                        .etcd
                        .as_ref()
                        .and_then(|e| e.member(name).ok())
                        .map(|m| m.log.clone())
                        .unwrap_or_default();
                    bail!(
                        "etcd member {name} exited with {status}; its log ({}):\n{}",
                        log.display(),
                        log_tail(&log)
                    );
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .etcd()?
                    .members
                    .iter()
                    .map(|m| format!("{} ({}):\n{}", m.name, m.log.display(), log_tail(&m.log)))
                    .collect();
                bail!(
                    "{what} did not answer within 20 s; logs:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kill (SIGKILL) one member; its data stays for [`Lab::start_member`].
    pub fn kill_member(&mut self, member: &str) -> Result<()> {
        let m = self.etcd()?.member(member)?.clone();
        if let Some(mut c) = self.etcd_children.remove(member) {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = m.pid
            && is_lab_etcd(pid, &self.info.dir)
        {
            kill_and_wait(pid);
        }
        self.member_mut(member)?.pid = None;
        self.save()
    }

    /// Kill every member of the lab's etcd (SIGKILL; the data stays for
    /// [`Lab::start_etcd`]).
    pub fn stop_etcd(&mut self) -> Result<()> {
        let Some(e) = self.info.etcd.clone() else {
            return Ok(());
        };
        for m in &e.members {
            self.kill_member(&m.name)?;
        }
        Ok(())
    }

    fn member_mut(&mut self, member: &str) -> Result<&mut EtcdMember> {
        let lab = self.info.name.clone();
        self.info
            .etcd
            .as_mut()
            .and_then(|e| e.members.iter_mut().find(|m| m.name == member))
            .with_context(|| format!("lab '{lab}' has no etcd member '{member}'"))
    }

    /// The members' addresses and underlay MACs, to pin on hosts.
    pub(super) fn member_neighbours(&self) -> BTreeMap<Ipv4Addr, vxmesh::model::Mac> {
        self.info
            .etcd
            .iter()
            .flat_map(|e| e.members.iter())
            .map(|m| (m.ip, underlay_mac(m.ip)))
            .collect()
    }
}

/// A member's namespace, its link into the underlay bridge (`p-etcdI`) and
/// its address, like a host's.
async fn create_member_host(ul_nl: &Netlink, m: &EtcdMember) -> Result<()> {
    let ns = netns::create(&m.netns)?;
    let port = format!("p-{}", m.name);
    ul_nl
        .create_veth(&port, "eth0", Some(&ns), 1500)
        .await
        .with_context(|| format!("underlay link of etcd member {}", m.name))?;
    super::hosts::ipv4_only(&ns, "eth0")
        .with_context(|| format!("underlay link of etcd member {}", m.name))?;
    ul_nl
        .set_link(
            &port,
            LinkOptions {
                master: Some("br-ul".into()),
                up: Some(true),
                ..Default::default()
            },
        )
        .await?;
    let nl = Netlink::connect_in(&ns).await?;
    nl.set_link(
        "eth0",
        LinkOptions {
            up: Some(true),
            mac: Some(underlay_mac(m.ip)),
            ..Default::default()
        },
    )
    .await?;
    nl.add_address("eth0", Ipv4Net::new(m.ip, UNDERLAY_PREFIX)?)
        .await?;
    Ok(())
}

pub(super) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_sit_at_the_top_of_the_underlay_and_all_are_endpoints() {
        let mut spec = LabSpec::new("t", 3, 1);
        spec.etcd_members = 3;
        let e = LabEtcd::new(Path::new("/run/vxmesh-lab/t"), &spec);
        assert_eq!(ETCD_IP, Ipv4Addr::new(198, 18, 0, 254));
        let ips: Vec<Ipv4Addr> = e.members.iter().map(|m| m.ip).collect();
        assert_eq!(
            ips,
            [
                Ipv4Addr::new(198, 18, 0, 254),
                Ipv4Addr::new(198, 18, 0, 253),
                Ipv4Addr::new(198, 18, 0, 252)
            ]
        );
        assert_eq!(
            e.store,
            "etcd://198.18.0.254:2379,198.18.0.253:2379,198.18.0.252:2379"
        );
        assert_eq!(
            e.initial_cluster(),
            "etcd1=http://198.18.0.254:2380,etcd2=http://198.18.0.253:2380,etcd3=http://198.18.0.252:2380"
        );
        assert_eq!(e.members[2].netns, "vxm-t-etcd3");
        assert_eq!(
            e.members[1].data_dir,
            Path::new("/run/vxmesh-lab/t/etcd/etcd2")
        );
        // Every member is below 255 and above the lab's own address.
        assert!(member_ip(MAX_ETCD_MEMBERS) > LAB_CONTROL_IP);
        assert!(e.member("etcd4").is_err());
    }
}
