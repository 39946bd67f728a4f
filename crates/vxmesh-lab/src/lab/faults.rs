//! Faults an etcd lab can suffer, injected and healed on demand, all inside
//! the lab's namespaces: a host partitioned from etcd (and from some peers)
//! by an nftables table of its own in the host's namespace; an etcd member
//! (or the current leader) killed or paused (SIGSTOP) and brought back; the
//! whole etcd cluster restored from a snapshot taken earlier (its revision
//! moves back); many agents joining at once. The invariant checker
//! ([`super::invariants`]) watches what vxmesh does meanwhile.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, ConnectOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Lab;
use super::etcd::{is_lab_etcd, log_tail};
use vxmesh::dataplane::netns::Netns;

/// The nftables table (family inet) that holds a partition; the lab's own,
/// never one of vxmesh's.
pub const PARTITION_TABLE: &str = "vxmlab_partition";
/// etcd's command-line client (Debian package etcd-client): snapshots.
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
/// How long one status or snapshot request may take.
const ETCD_REQUEST: Duration = Duration::from_secs(2);

/// The nftables script that drops every packet between this namespace and
/// `addrs` in both directions (IPv4 only: the underlay is IPv4).
pub fn partition_script(addrs: &[Ipv4Addr]) -> String {
    let set: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let set = set.join(", ");
    format!(
        "table inet {PARTITION_TABLE} {{\n\
         \tchain input {{ type filter hook input priority -10; policy accept; ip saddr {{ {set} }} drop; }}\n\
         \tchain output {{ type filter hook output priority -10; policy accept; ip daddr {{ {set} }} drop; }}\n\
         }}\n"
    )
}

/// Run `nft -f -` with `script` inside namespace `netns`.
fn nft_in(netns: &str, script: &str) -> Result<()> {
    let ns = Netns::open(netns)?;
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    ns.enter_on_exec(&mut cmd);
    let mut child = cmd
        .spawn()
        .context("run nft (install the Debian package nftables: scripts/deps.sh)")?;
    drop(ns);
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {netns}: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What one member says about the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub member: String,
    pub member_id: u64,
    pub leader_id: u64,
    pub revision: i64,
    pub raft_term: u64,
}

impl Lab {
    /// Cut host `node` off: from every etcd member when `from_etcd`, and
    /// from the underlay addresses of `peers` (no VXLAN either way). Every
    /// packet to or from them is dropped silently inside the host's
    /// namespace (an nftables table of the lab's own): connections hang
    /// rather than fail, as behind a real partition.
    pub fn partition(&self, node: &str, from_etcd: bool, peers: &[&str]) -> Result<()> {
        let n = self.node(node)?.clone();
        let mut addrs: Vec<Ipv4Addr> = Vec::new();
        if from_etcd {
            addrs.extend(self.etcd()?.members.iter().map(|m| m.ip));
        }
        for p in peers {
            addrs.push(self.node(p)?.underlay_ip);
        }
        if addrs.is_empty() {
            bail!("partition of {node}: from nothing (give from_etcd or peers)");
        }
        nft_in(&n.netns, &partition_script(&addrs)).with_context(|| format!("partition {node}"))
    }

    /// Heal a partition made by [`Lab::partition`] (no partition: nothing to do).
    pub fn heal_partition(&self, node: &str) -> Result<()> {
        let n = self.node(node)?.clone();
        // Declaring it first makes the delete succeed when it is absent.
        let script = format!("table inet {PARTITION_TABLE}\ndelete table inet {PARTITION_TABLE}\n");
        nft_in(&n.netns, &script).with_context(|| format!("heal the partition of {node}"))
    }

    /// Cut etcd member `member` off from the other members (its clients
    /// still reach it): it loses the quorum while it keeps serving.
    pub fn isolate_member(&self, member: &str) -> Result<()> {
        let e = self.etcd()?;
        let m = e.member(member)?;
        let others: Vec<Ipv4Addr> = e
            .members
            .iter()
            .filter(|o| o.name != member)
            .map(|o| o.ip)
            .collect();
        if others.is_empty() {
            bail!("etcd member {member} has no other member to be cut off from");
        }
        nft_in(&m.netns, &partition_script(&others))
            .with_context(|| format!("isolate etcd member {member}"))
    }

    /// Heal [`Lab::isolate_member`].
    pub fn heal_member(&self, member: &str) -> Result<()> {
        let m = self.etcd()?.member(member)?;
        let script = format!("table inet {PARTITION_TABLE}\ndelete table inet {PARTITION_TABLE}\n");
        nft_in(&m.netns, &script).with_context(|| format!("heal etcd member {member}"))
    }

    /// Pause (SIGSTOP) etcd member `member`: its sockets stay open and
    /// nothing answers, as a hung machine.
    pub fn pause_member(&self, member: &str) -> Result<()> {
        self.signal_member(member, Signal::SIGSTOP)
    }

    /// Resume (SIGCONT) a paused member.
    pub fn resume_member(&self, member: &str) -> Result<()> {
        self.signal_member(member, Signal::SIGCONT)
    }

    fn signal_member(&self, member: &str, sig: Signal) -> Result<()> {
        let m = self.etcd()?.member(member)?;
        let pid = m
            .pid
            .filter(|p| is_lab_etcd(*p, &self.info.dir))
            .with_context(|| format!("etcd member {member} is not running"))?;
        kill(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("{sig} to etcd member {member}"))
    }

    /// Ask every member for its status (members that do not answer within
    /// 2 s are left out).
    pub async fn etcd_status(&self) -> Result<Vec<MemberStatus>> {
        let members: Vec<(String, String)> = self
            .etcd()?
            .members
            .iter()
            .map(|m| (m.name.clone(), m.client_url()))
            .collect();
        Netns::open(&self.info.underlay_ns)?
            .run_async(move || async move {
                let mut out = Vec::new();
                for (name, url) in members {
                    if let Ok(Ok(s)) = tokio::time::timeout(ETCD_REQUEST, status_of(&url)).await {
                        out.push(MemberStatus { member: name, ..s });
                    }
                }
                Ok::<_, anyhow::Error>(out)
            })
            .await
    }

    /// The member that leads the etcd cluster now (waits up to 10 s for a
    /// leader that the answering members agree on).
    pub async fn etcd_leader(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.etcd_status().await?;
            if let Some(first) = st.first()
                && first.leader_id != 0
                && st.iter().all(|s| s.leader_id == first.leader_id)
                && let Some(leader) = st.iter().find(|s| s.member_id == first.leader_id)
            {
                return Ok(leader.member.clone());
            }
            if Instant::now() > deadline {
                bail!("no agreed etcd leader within 10 s (statuses: {st:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Save a snapshot of the etcd cluster to `path` (`etcdctl snapshot
    /// save`, from the underlay namespace); returns its revision.
    pub async fn save_etcd_snapshot(&self, path: &Path) -> Result<i64> {
        let leader = self.etcd_leader().await?;
        let url = self.etcd()?.member(&leader)?.client_url();
        let ns = Netns::open(&self.info.underlay_ns)?;
        let mut cmd = Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &url, "snapshot", "save"])
            .arg(path);
        ns.enter_on_exec(&mut cmd);
        etcdctl(cmd, "snapshot save")?;
        drop(ns);
        let mut cmd = Command::new(ETCDCTL_BIN);
        cmd.env("ETCDCTL_API", "3")
            .args(["snapshot", "status", "-w", "json"])
            .arg(path);
        let out = etcdctl(cmd, "snapshot status")?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("etcdctl snapshot status said: {out}"))?;
        v["revision"]
            .as_i64()
            .with_context(|| format!("no revision in etcdctl snapshot status: {out}"))
    }

    /// Roll the whole etcd cluster back to the snapshot at `path`: every
    /// member killed, its data replaced by the snapshot (`etcdctl snapshot
    /// restore`, same names, peer URLs and token), every member started.
    /// Keys written since the snapshot are gone, keys deleted since are
    /// back, and the revision moves back to the snapshot's.
    pub async fn restore_etcd_snapshot(&mut self, path: &Path) -> Result<()> {
        self.stop_etcd()?;
        let e = self.etcd()?.clone();
        for m in &e.members {
            if m.data_dir.exists() {
                std::fs::remove_dir_all(&m.data_dir)
                    .with_context(|| format!("remove {}", m.data_dir.display()))?;
            }
            let mut cmd = Command::new(ETCDCTL_BIN);
            cmd.env("ETCDCTL_API", "3")
                .args(["snapshot", "restore"])
                .arg(path)
                .args(["--name", &m.name, "--data-dir"])
                .arg(&m.data_dir)
                .args(["--initial-cluster", &e.initial_cluster()])
                .args(["--initial-cluster-token", &e.token])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{}:2380", m.ip),
                ]);
            etcdctl(cmd, &format!("snapshot restore for {}", m.name))?;
        }
        self.start_etcd().await
    }

    /// The cluster's current revision (from the leader).
    pub async fn etcd_revision(&self) -> Result<i64> {
        let leader = self.etcd_leader().await?;
        let st = self.etcd_status().await?;
        st.into_iter()
            .find(|s| s.member == leader)
            .map(|s| s.revision)
            .with_context(|| format!("leader {leader} did not answer"))
    }

    /// Overload: `n` new hosts whose agents all start at the same moment;
    /// waits until every one has joined (or `timeout` passes) and returns
    /// each host with its time from start to joined.
    pub async fn join_at_once(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(String, Duration)>> {
        let mut hosts = Vec::new();
        for _ in 0..n {
            hosts.push(self.add_host().await?);
        }
        let t0 = Instant::now();
        for h in &hosts {
            self.start_agent(h)?;
        }
        let mut joined = Vec::new();
        for h in &hosts {
            let left = timeout.saturating_sub(t0.elapsed());
            self.wait_agent_ready(h, left).await?;
            joined.push((h.clone(), t0.elapsed()));
        }
        for h in &hosts {
            self.attach_node_containers(h).await?;
        }
        Ok(joined)
    }

    /// The last lines of member `member`'s log.
    pub fn member_log_tail(&self, member: &str) -> Result<String> {
        Ok(log_tail(&self.etcd()?.member(member)?.log))
    }
}

/// Run an etcdctl command; its stdout, or an error with its stderr.
fn etcdctl(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {ETCDCTL_BIN} (install the Debian package etcd-client)"))?;
    if !out.status.success() {
        bail!(
            "etcdctl {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One member's status, asked at its own endpoint.
async fn status_of(url: &str) -> Result<MemberStatus> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(ETCD_REQUEST)
        .with_timeout(ETCD_REQUEST);
    let mut c = Client::connect([url], Some(opts)).await?;
    let s = c.status().await?;
    let h = s.header().context("status without header")?;
    Ok(MemberStatus {
        member: String::new(),
        member_id: h.member_id(),
        leader_id: s.leader(),
        revision: h.revision(),
        raft_term: s.raft_term(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_drops_both_directions_in_a_table_of_its_own() {
        let s = partition_script(&[Ipv4Addr::new(198, 18, 0, 254), Ipv4Addr::new(198, 18, 0, 2)]);
        assert!(s.starts_with("table inet vxmlab_partition {"), "{s}");
        assert!(
            s.contains("hook input priority -10; policy accept; ip saddr { 198.18.0.254, 198.18.0.2 } drop;"),
            "{s}"
        );
        assert!(
            s.contains("hook output priority -10; policy accept; ip daddr { 198.18.0.254, 198.18.0.2 } drop;"),
            "{s}"
        );
    }
}
