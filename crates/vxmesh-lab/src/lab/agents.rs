//! The lab's agents: one `vxmesh agent` process per host, started inside the
//! host's namespace, waited for until it serves every network, and stopped
//! with a signal (SIGKILL after a grace period).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::de::IgnoredAny;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Lab, LabNode, StartGate, network_names};
use vxmesh::config::Mode;
use vxmesh::state;

impl Lab {
    /// Start (or restart) the agent of `node` as a process inside its namespace.
    pub fn start_agent(&mut self, node: &str) -> Result<u32> {
        let pid = self.spawn_agent(node)?;
        self.save()?;
        Ok(pid)
    }

    /// Spawn the agents of `nodes` behind `gate`: each process waits until
    /// the gate opens, then becomes the agent (same pid). Records the lab
    /// once. Spawning hundreds of processes takes seconds; behind a gate
    /// that time is spent before the agents start, and they all start at
    /// the moment the gate opens.
    pub fn spawn_agents_gated(&mut self, nodes: &[String], gate: &StartGate) -> Result<()> {
        for node in nodes {
            self.spawn_agent_with(node, Some(gate))?;
        }
        self.save()
    }

    /// [`Self::start_agent`] without recording the lab in `lab.json`.
    fn spawn_agent(&mut self, node: &str) -> Result<u32> {
        self.spawn_agent_with(node, None)
    }

    fn spawn_agent_with(&mut self, node: &str, gate: Option<&StartGate>) -> Result<u32> {
        let n = self.node(node)?.clone();
        std::fs::create_dir_all(&n.state_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.agent_log)?;
        let mut cmd = match gate {
            None => Command::new(&self.spec_exe),
            Some(g) => g.command(&self.spec_exe),
        };
        cmd.arg("--netns").arg(&n.netns).arg("-v").arg("agent");
        // A lab agent is configured by the lab alone, never by this
        // machine's /etc/vxmesh/agent.toml.
        cmd.arg("--no-config");
        match &self.info.etcd {
            None => cmd.arg("--cluster").arg(&self.info.cluster_file),
            Some(e) => cmd
                .args(["--store", &e.store, "--network", &e.networks.join(",")])
                .args([
                    "--underlay-ip",
                    &n.underlay_ip.to_string(),
                    "--underlay-dev",
                    "eth0",
                ])
                .args(["--ttl", &e.ttl_secs.to_string()]),
        };
        if let Some(addr) = self.metrics_addr(node) {
            cmd.arg("--metrics").arg(addr.to_string());
        }
        if !self.agent_args.iter().any(|a| a.starts_with("--resync")) {
            cmd.arg("--resync")
                .arg(lab_resync_secs(self.info.nodes.len()).to_string());
        }
        cmd.arg("--node")
            .arg(&n.name)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let nice = self.agent_nice;
        if nice != 0 {
            // SAFETY: only setpriority(2), async-signal-safe, in the child
            // (the gate's shell; the agent it becomes keeps the value).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start agent of {node} ({})", self.spec_exe.display()))?;
        let pid = child.id();
        self.children.insert(node.to_string(), child);
        self.node_mut(node)?.agent_pid = Some(pid);
        Ok(pid)
    }

    /// Wait until the agent of `node` has published every network.
    pub async fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.agent_ready(node)? {
            if Instant::now() > deadline {
                bail!(
                    "agent of {node} not ready after {timeout:?}; its log:\n{}",
                    self.agent_log(node)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.save()
    }

    /// Wait until every agent of `nodes` has published every network, as
    /// long as they make progress: agents started together share the
    /// machine (and the kernel's routing lock), so a big lab takes longer,
    /// but one agent ready every `stall` at least is progress (30 s in `up`). Fails when
    /// none became ready for `stall`, or when one exited.
    pub async fn wait_agents_ready(&mut self, nodes: &[String], stall: Duration) -> Result<()> {
        let mut pending: Vec<String> = nodes.to_vec();
        let mut progress = Instant::now();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for node in pending {
                if self.agent_ready(&node)? {
                    progress = Instant::now();
                } else {
                    still.push(node);
                }
            }
            pending = still;
            if let Some(first) = pending.first()
                && progress.elapsed() > stall
            {
                bail!(
                    "{} agent(s) not ready, none became ready for {stall:?} (e.g. {first}); the log of {first}:\n{}",
                    pending.len(),
                    self.agent_log(first)
                );
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.save()
    }

    /// Has the agent of `node` published every network? With etcd, the
    /// subnets it claimed are recorded (in memory: the caller saves). An
    /// agent that exited is an error, with its log.
    fn agent_ready(&mut self, node: &str) -> Result<bool> {
        let n = self.node(node)?.clone();
        let want = match &self.info.etcd {
            Some(e) => e.networks.clone(),
            None => network_names(self.info.mode, n.subnets.len()),
        };
        if want
            .iter()
            .all(|w| state::read_network(&n.state_dir, w).is_ok())
        {
            if self.info.etcd.is_some() {
                // The subnets the agent claimed in etcd.
                let mut subnets = BTreeMap::new();
                for w in &want {
                    subnets.insert(w.clone(), state::read_network(&n.state_dir, w)?.state.pool);
                }
                self.node_mut(node)?.subnets = subnets;
            }
            return Ok(true);
        }
        if let Some(c) = self.children.get_mut(node)
            && let Some(status) = c.try_wait()?
        {
            bail!(
                "agent of {node} exited with {status} before it was ready; its log:\n{}",
                self.agent_log(node)
            );
        }
        Ok(false)
    }

    /// The agent log of `node` (empty if unreadable).
    fn agent_log(&self, node: &str) -> String {
        self.node(node)
            .ok()
            .and_then(|n| std::fs::read_to_string(&n.agent_log).ok())
            .unwrap_or_default()
    }

    /// Wait until every agent's applied plan covers the whole lab: all
    /// hosts known, and a neighbour entry per remote node (routed) or per
    /// remote container (bridged), as long as they make progress (one more
    /// agent converged every `stall` at least). A ready agent has only
    /// published its own networks (a full pass does that before it programs
    /// the peers), and with etcd the agents learn each other through the
    /// watch after that, so a check right after being ready would race
    /// them. Returns whether they
    /// converged; not converging is left to `lab check` to report (it names
    /// the pairs).
    pub async fn wait_converged(&self, stall: Duration) -> bool {
        // Each pending node with the plan file last read: its inode (the
        // agent replaces the file by a rename), modification time and size,
        // and when. Read again when the agent rewrote it, and at least once
        // a second (a rewrite within the clock's tick could look the same).
        type Seen = Option<((u64, SystemTime, u64), Instant)>;
        let mut pending: Vec<(&LabNode, Seen)> =
            self.info.nodes.iter().map(|n| (n, None)).collect();
        let mut progress = Instant::now();
        loop {
            let before = pending.len();
            // A converged agent stays so: only the others are read again.
            pending.retain_mut(|(n, seen)| {
                use std::os::unix::fs::MetadataExt;
                let path = n.state_dir.join(vxmesh::status::PLAN_FILE);
                let Ok(meta) = std::fs::metadata(&path) else {
                    return true;
                };
                let Ok(modified) = meta.modified() else {
                    return true;
                };
                let key = (meta.ino(), modified, meta.len());
                if let Some((last, at)) = seen
                    && *last == key
                    && at.elapsed() < Duration::from_secs(1)
                {
                    return true;
                }
                *seen = Some((key, Instant::now()));
                !self.node_converged(&path, n)
            });
            if pending.is_empty() {
                return true;
            }
            if pending.len() < before {
                progress = Instant::now();
            } else if progress.elapsed() > stall {
                return false;
            }
            // Each look parses plan files of N peers: not too often.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Does the plan file at `path` (node `n`'s) hold every node of the
    /// lab and a neighbour per remote peer? Only those two parts of the
    /// file are kept in memory: with hundreds of agents the bench reads
    /// hundreds of large plans while they converge.
    fn node_converged(&self, path: &Path, n: &LabNode) -> bool {
        #[derive(serde::Deserialize)]
        struct Peek {
            nodes: BTreeMap<std::net::Ipv4Addr, IgnoredAny>,
            plan: PeekPlan,
        }
        #[derive(serde::Deserialize)]
        struct PeekPlan {
            neighbours: Vec<IgnoredAny>,
        }
        let Ok(data) = std::fs::read(path) else {
            return false;
        };
        let Ok(saved) = serde_json::from_slice::<Peek>(&data) else {
            return false;
        };
        let all_known = self
            .info
            .nodes
            .iter()
            .all(|o| saved.nodes.contains_key(&o.underlay_ip));
        let remote = match self.info.mode {
            Mode::Routed => self.info.nodes.len() - 1,
            Mode::Bridged => self
                .info
                .containers
                .iter()
                .filter(|c| c.node != n.name)
                .count(),
        };
        all_known && saved.plan.neighbours.len() >= remote
    }

    /// The resident memory (VmRSS, KiB) of every running agent of the lab.
    pub fn agent_rss_kib(&self) -> Vec<u64> {
        self.info
            .nodes
            .iter()
            .filter_map(|n| rss_kib(n.agent_pid?))
            .collect()
    }

    /// Stop the agents of `nodes`: `sig` to all of them first, then wait
    /// (up to 5 s, then SIGKILL) for each, so a big lab stops in about the
    /// time of its slowest agent. Blocks the thread like [`Lab::stop_agent`].
    pub fn stop_agents(&mut self, nodes: &[String], sig: Signal) -> Result<()> {
        let mut exiting = Vec::new();
        for node in nodes {
            if let Some(pid) = self.node(node)?.agent_pid
                && let Some(e) = self.signal_agent(node, pid, sig)
            {
                exiting.push(e);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while !exiting.is_empty() {
            let mut still = Vec::new();
            for mut e in exiting {
                if !e.finished(deadline)? {
                    still.push(e);
                }
            }
            exiting = still;
            if !exiting.is_empty() {
                std::thread::sleep(STOP_POLL);
            }
        }
        for node in nodes {
            self.node_mut(node)?.agent_pid = None;
        }
        self.save()
    }

    /// Send `sig` to the agent of `node` and wait (up to 5 s, then SIGKILL)
    /// for it to exit. Blocks the thread: for synchronous callers (teardown
    /// on drop, tests); async code uses [`Lab::stop_agent_async`].
    pub fn stop_agent(&mut self, node: &str, sig: Signal) -> Result<()> {
        let Some(pid) = self.node(node)?.agent_pid else {
            return Ok(());
        };
        if let Some(mut exiting) = self.signal_agent(node, pid, sig) {
            let deadline = Instant::now() + STOP_GRACE;
            while !exiting.finished(deadline)? {
                std::thread::sleep(STOP_POLL);
            }
        }
        self.forget_agent(node)
    }

    /// [`Lab::stop_agent`] without blocking the runtime's thread while the
    /// agent exits.
    pub async fn stop_agent_async(&mut self, node: &str, sig: Signal) -> Result<()> {
        let Some(pid) = self.node(node)?.agent_pid else {
            return Ok(());
        };
        if let Some(mut exiting) = self.signal_agent(node, pid, sig) {
            let deadline = Instant::now() + STOP_GRACE;
            while !exiting.finished(deadline)? {
                tokio::time::sleep(STOP_POLL).await;
            }
        }
        self.forget_agent(node)
    }

    /// Send `sig` to the agent `pid` of `node`, if it is ours: a child of
    /// this process, or (a lab loaded from its record) a process whose
    /// command line names this lab.
    fn signal_agent(&mut self, node: &str, pid: u32, sig: Signal) -> Option<ExitingAgent> {
        let exiting = if let Some(child) = self.children.remove(node) {
            ExitingAgent::Child(child)
        } else if is_our_agent(pid, &self.info.name) {
            ExitingAgent::Pid(pid)
        } else {
            return None;
        };
        let _ = kill(Pid::from_raw(pid as i32), sig);
        Some(exiting)
    }

    /// Record that `node` runs no agent.
    fn forget_agent(&mut self, node: &str) -> Result<()> {
        self.node_mut(node)?.agent_pid = None;
        self.save()
    }
}

/// How long a signalled agent may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a stopping agent is looked at.
const STOP_POLL: Duration = Duration::from_millis(10);

/// An agent that was sent a signal.
enum ExitingAgent {
    /// Started by this process: reaped here.
    Child(Child),
    /// Started by another process (`vxmesh lab up`): init reaps it.
    Pid(u32),
}

impl ExitingAgent {
    /// Has it exited? Past `deadline` it is killed (SIGKILL) and counts as
    /// finished.
    fn finished(&mut self, deadline: Instant) -> Result<bool> {
        match self {
            ExitingAgent::Child(child) => {
                if child.try_wait()?.is_some() {
                    return Ok(true);
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(true);
                }
                Ok(false)
            }
            ExitingAgent::Pid(pid) => {
                let alive = Path::new(&format!("/proc/{pid}")).exists();
                if alive && Instant::now() < deadline {
                    return Ok(false);
                }
                if alive {
                    let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
                }
                Ok(true)
            }
        }
    }
}

/// The lab agents' period of full passes, unless the lab is given one: the
/// agent's default (5 s) up to 50 hosts, then a tenth of a second per host.
/// Each full pass dumps the host's kernel state (three entries per peer),
/// and on one machine the N agents' periodic passes add up to N^2 entries
/// per period: 250 hosts every 5 s would keep the cores busy with drift
/// checks. (Real hosts each have their own CPU; every change still acts
/// at once through the store and kernel events.)
pub(crate) fn lab_resync_secs(hosts: usize) -> u64 {
    (hosts as u64 / 10).max(5)
}

/// The resident memory of process `pid` in KiB (`VmRSS` of its status).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Is `pid` a vxmesh agent of lab `lab`? (Guards against pid reuse.)
fn is_our_agent(pid: u32, lab: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let text = String::from_utf8_lossy(&cmdline);
    text.contains("agent") && text.contains(&format!("vxm-{lab}-"))
}

/// Kill (SIGKILL) every agent process of lab `lab`, tracked or not.
pub(super) fn kill_stray_agents(lab: &str) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && is_our_agent(pid, lab) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_agent_is_recognised_by_its_command_line() {
        // This test process is no agent of any lab.
        assert!(!is_our_agent(std::process::id(), "nolab"));
        // Nor is a pid that does not exist.
        assert!(!is_our_agent(u32::MAX, "nolab"));
    }

    #[test]
    fn big_labs_resync_less_often() {
        assert_eq!(lab_resync_secs(3), 5);
        assert_eq!(lab_resync_secs(50), 5);
        assert_eq!(lab_resync_secs(100), 10);
        assert_eq!(lab_resync_secs(250), 25);
    }

    #[test]
    fn resident_memory_of_a_process() {
        let own = rss_kib(std::process::id()).expect("this process has a VmRSS");
        assert!(own > 100, "{own} KiB");
        assert_eq!(rss_kib(u32::MAX), None);
    }

    #[test]
    fn a_vanished_process_is_finished_at_once() {
        let mut gone = ExitingAgent::Pid(u32::MAX);
        assert!(gone.finished(Instant::now() + STOP_GRACE).unwrap());
    }

    #[test]
    fn a_child_that_exited_is_finished_and_one_that_lingers_is_killed() {
        let child = Command::new("true").spawn().unwrap();
        let mut exiting = ExitingAgent::Child(child);
        let deadline = Instant::now() + STOP_GRACE;
        while !exiting.finished(deadline).unwrap() {
            std::thread::sleep(STOP_POLL);
        }
        let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = sleeper.id();
        let mut exiting = ExitingAgent::Child(sleeper);
        // Past its deadline: killed and reaped.
        assert!(exiting.finished(Instant::now() - STOP_POLL).unwrap());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
