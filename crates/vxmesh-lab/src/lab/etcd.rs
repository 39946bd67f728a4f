//! The lab's etcd store: one `/usr/bin/etcd` process entered into the lab's
//! underlay namespace, listening on 198.18.0.254:2379 (an address of the
//! underlay bridge, reachable from every host) and 127.0.0.1:2379 of that
//! namespace, its data under the lab dir. Nothing listens in the root
//! namespace; the lab process itself talks to etcd from a thread inside the
//! underlay namespace ([`Netns::run_async`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{Lab, LabSpec, cluster_file_for, network_names};
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::Netns;
use vxmesh::store::etcd::{self, ClientOptions};

pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// etcd's address on the underlay bridge.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const ETCD_PORT: u16 = 2379;
/// Peer port, on 127.0.0.1 of the underlay namespace only.
const ETCD_PEER_PORT: u16 = 2380;
/// Default lease TTL of lab agents: crashed hosts vanish quickly.
pub const LAB_TTL: Duration = Duration::from_secs(3);

/// Where the lab's nodes and endpoints live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabStore {
    /// One cluster file for every host (`LAB_DIR/cluster.toml`).
    #[default]
    Static,
    /// etcd inside the underlay namespace; hosts join and leave dynamically.
    Etcd,
}

/// The lab's etcd server and how its agents use it (in `lab.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabEtcd {
    /// What agents get as `--store`.
    pub store: String,
    pub pid: Option<u32>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Lease TTL of the agents (`--ttl`).
    pub ttl_secs: u64,
    /// The networks every host joins.
    pub networks: Vec<String>,
}

impl LabEtcd {
    fn new(dir: &Path, spec: &LabSpec) -> LabEtcd {
        LabEtcd {
            store: format!("etcd://{ETCD_IP}:{ETCD_PORT}"),
            pid: None,
            data_dir: dir.join("etcd").join("data"),
            log: dir.join("etcd").join("etcd.log"),
            ttl_secs: spec.ttl.as_secs().max(etcd::MIN_TTL.as_secs()),
            networks: network_names(spec.mode, spec.networks),
        }
    }

    /// Client options for the lab process (used inside the underlay namespace).
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions::new(vec![format!("http://127.0.0.1:{ETCD_PORT}")])
    }
}

/// Is `pid` the etcd of the lab whose dir is `dir`? (Guards against pid reuse.)
fn is_lab_etcd(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = String::from_utf8_lossy(&cmdline);
    text.starts_with(ETCD_BIN) && text.contains(&format!("{}/", dir.display()))
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

fn kill_and_wait(pid: u32) {
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

    /// Run an etcd job of the lab process inside the underlay namespace.
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

    /// Set up the etcd store while building: the bridge's .254 address,
    /// the server, and the lab's networks.
    pub(super) async fn setup_etcd(&mut self, ul_nl: &Netlink, spec: &LabSpec) -> Result<()> {
        if !Path::new(ETCD_BIN).exists() {
            bail!(
                "{ETCD_BIN} is missing: install the Debian package etcd-server (scripts/deps.sh)"
            );
        }
        ul_nl
            .add_address("br-ul", Ipv4Net::new(ETCD_IP, 24)?)
            .await
            .context("etcd address on the underlay bridge")?;
        self.info.etcd = Some(LabEtcd::new(&self.info.dir, spec));
        self.start_etcd().await?;
        let nets = cluster_file_for(spec).networks;
        self.in_underlay(move |co| async move {
            for nf in &nets {
                let net = etcd::validate_network(nf)?;
                etcd::create_network(&co, etcd::DEFAULT_PREFIX, &net).await?;
            }
            Ok(())
        })
        .await
        .context("create the lab's networks in etcd")
    }

    /// Start the lab's etcd (again, on the same data) and wait until it answers.
    pub async fn start_etcd(&mut self) -> Result<u32> {
        let e = self.etcd()?.clone();
        if let Some(pid) = e.pid
            && is_lab_etcd(pid, &self.info.dir)
        {
            bail!(
                "the etcd of lab '{}' is already running (pid {pid})",
                self.info.name
            );
        }
        std::fs::create_dir_all(&e.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&e.log)?;
        let ul = Netns::open(&self.info.underlay_ns)?;
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg("lab")
            .arg("--data-dir")
            .arg(&e.data_dir)
            .arg("--listen-client-urls")
            .arg(format!(
                "http://{ETCD_IP}:{ETCD_PORT},http://127.0.0.1:{ETCD_PORT}"
            ))
            .arg("--advertise-client-urls")
            .arg(format!("http://{ETCD_IP}:{ETCD_PORT}"))
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .arg("--initial-cluster")
            .arg(format!("lab={peer}"))
            .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
            .arg(format!("vxmesh-lab-{}", self.info.name))
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own process group (a terminal's Ctrl-C is not for it), and
        // entered into the underlay namespace before exec.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        ul.enter_on_exec(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {ETCD_BIN} in {}", self.info.underlay_ns))?;
        drop(ul);
        let pid = child.id();
        if let Some(e) = self.info.etcd.as_mut() {
            e.pid = Some(pid);
        }
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let co = e.client_options();
            let ok = self
                .in_underlay(move |_| async move {
                    Ok(tokio::time::timeout(
                        Duration::from_secs(1),
                        etcd::get_network(&co, etcd::DEFAULT_PREFIX, "probe"),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok()))
                })
                .await?;
            if ok {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "etcd exited with {status}; its log ({}):\n{}",
                    e.log.display(),
                    log_tail(&e.log)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "etcd did not answer within 20 s; its log ({}):\n{}",
                    e.log.display(),
                    log_tail(&e.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.etcd_child = Some(child);
        Ok(pid)
    }

    /// Kill the lab's etcd (SIGKILL; its data stays for [`Lab::start_etcd`]).
    pub fn stop_etcd(&mut self) -> Result<()> {
        let Some(e) = self.info.etcd.as_mut() else {
            return Ok(());
        };
        if let Some(mut c) = self.etcd_child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(pid) = e.pid
            && is_lab_etcd(pid, &self.info.dir)
        {
            kill_and_wait(pid);
        }
        e.pid = None;
        self.save()
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
