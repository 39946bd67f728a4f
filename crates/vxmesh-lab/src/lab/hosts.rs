//! The lab's hosts on the underlay: a host's namespace, its link into the
//! underlay bridge and its address, and the underlay neighbours pinned
//! between hosts and etcd's members.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

use super::{Lab, LabNode, MAX_HOST, UNDERLAY_PREFIX, host_ip, underlay_mac};
use vxmesh::dataplane::NeighSpec;
use vxmesh::dataplane::diff::Change;
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::model::Mac;

/// The lab's underlay carries IPv4 only. Its links get no IPv6 stack:
/// left on, every link brought up sends its IPv6 neighbour and multicast
/// listener messages to all-nodes multicast, and the underlay bridge
/// floods each to every host. On real hosts each kernel handles its
/// share; here all N hosts share two CPUs, so a lab of N hosts spends
/// N^2 packet deliveries on them in the seconds after it is built, while
/// a cold start is measured. Call before `dev` is up (no message sent).
pub(crate) fn ipv4_only(ns: &Netns, dev: &str) -> Result<()> {
    let key = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
    ns.run(move || vxmesh::dataplane::sysctl::write(&key, "1").map_err(anyhow::Error::from))
        .with_context(|| format!("disable IPv6 on {dev} in {}", ns.name()))
}

/// Make the underlay namespace a plain switch (call right after creating
/// it, before any device): no IPv6 on its links (see [`ipv4_only`]) and
/// no IP or ARP netfilter hooks for the frames its bridge forwards (this
/// namespace has no firewall; the hosts keep theirs).
pub(crate) fn plain_switch(ul: &Netns) -> Result<()> {
    const KEYS: [&str; 5] = [
        "/proc/sys/net/ipv6/conf/default/disable_ipv6",
        "/proc/sys/net/ipv6/conf/all/disable_ipv6",
        "/proc/sys/net/bridge/bridge-nf-call-iptables",
        "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
        "/proc/sys/net/bridge/bridge-nf-call-arptables",
    ];
    ul.run(|| {
        for (i, key) in KEYS.iter().enumerate() {
            let value = if i < 2 { "1" } else { "0" };
            match vxmesh::dataplane::sysctl::write(key, value) {
                Ok(()) => {}
                // A kernel without bridge netfilter has no hooks to turn off.
                Err(vxmesh::dataplane::sysctl::SysctlError::Write { io, .. })
                    if i >= 2 && io.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::Error::from(e)),
            }
        }
        Ok(())
    })
    .with_context(|| format!("underlay switch settings in {}", ul.name()))
}

impl Lab {
    /// Create host `hostI`: its namespace, its underlay link into the
    /// underlay bridge and its address [`host_ip`] (no agent yet).
    pub(super) async fn create_host(
        &mut self,
        ul_nl: &Netlink,
        i: usize,
        subnets: BTreeMap<String, Ipv4Net>,
    ) -> Result<String> {
        if !(1..=MAX_HOST).contains(&i) {
            bail!("host{i}: the underlay has room for host1..host{MAX_HOST}");
        }
        let node = format!("host{i}");
        let ns_name = format!("vxm-{}-{node}", self.info.name);
        let ns = netns::create(&ns_name)?;
        let ul_port = format!("p-{node}");
        ul_nl
            .create_veth(&ul_port, "eth0", Some(&ns), 1500)
            .await
            .with_context(|| format!("underlay link of {node}"))?;
        ul_nl
            .set_link(
                &ul_port,
                LinkOptions {
                    master: Some("br-ul".into()),
                    up: Some(true),
                    ..Default::default()
                },
            )
            .await?;
        ipv4_only(&ns, "eth0").with_context(|| format!("underlay link of {node}"))?;
        let ip = host_ip(i);
        let h = Netlink::connect_in(&ns).await?;
        h.set_link(
            "eth0",
            LinkOptions {
                up: Some(true),
                mac: Some(underlay_mac(ip)),
                ..Default::default()
            },
        )
        .await?;
        h.add_address("eth0", Ipv4Net::new(ip, UNDERLAY_PREFIX)?)
            .await?;
        let node_dir = self.info.dir.join(&node);
        self.info.nodes.push(LabNode {
            name: node.clone(),
            netns: ns_name,
            underlay_ip: ip,
            subnets,
            state_dir: node_dir.join("state"),
            agent_pid: None,
            agent_log: node_dir.join("agent.log"),
            docker: None,
        });
        if self.info.external {
            let n = self.node(&node)?.clone();
            super::external::route_to_outside(&n).await?;
        }
        Ok(node)
    }

    /// Pin the underlay's ARP entries as permanent neighbours: between the
    /// `new` hosts and every host, and between the `new` hosts and etcd's
    /// members.
    ///
    /// The lab's hosts share one kernel, whose limit on learned neighbours
    /// (`gc_thresh3`, 1 024 by default, settable only in the root namespace)
    /// counts every namespace's entries: 50 hosts learning each other's
    /// underlay addresses need 2 450, and beyond the limit the kernel drops
    /// packets ("neighbor table overflow"). Permanent entries do not count.
    /// Real hosts each have a kernel of their own and learn these by ARP.
    pub(crate) async fn pin_underlay(&self, new: &[String]) -> Result<()> {
        let is_new = |n: &LabNode| new.contains(&n.name);
        let entry = |ip: Ipv4Addr, mac: Mac| Change::ReplaceNeighbour {
            neigh: NeighSpec {
                dev: "eth0".into(),
                ip,
                mac,
            },
        };
        for h in &self.info.nodes {
            let mut changes: Vec<Change> = self
                .info
                .nodes
                .iter()
                .filter(|o| o.name != h.name && (is_new(h) || is_new(o)))
                .map(|o| entry(o.underlay_ip, underlay_mac(o.underlay_ip)))
                .collect();
            if is_new(h) {
                changes.extend(
                    self.member_neighbours()
                        .into_iter()
                        .map(|(ip, mac)| entry(ip, mac)),
                );
            }
            if changes.is_empty() {
                continue;
            }
            let nl = Netlink::connect_in(&Netns::open(&h.netns)?).await?;
            nl.apply(&changes)
                .await
                .with_context(|| format!("pin the underlay neighbours of {}", h.name))?;
        }
        // Each member learns the new hosts the same way.
        for m in self.info.etcd.iter().flat_map(|e| e.members.iter()) {
            let changes: Vec<Change> = self
                .info
                .nodes
                .iter()
                .filter(|o| is_new(o))
                .map(|o| entry(o.underlay_ip, underlay_mac(o.underlay_ip)))
                .collect();
            if changes.is_empty() {
                continue;
            }
            let nl = Netlink::connect_in(&Netns::open(&m.netns)?).await?;
            nl.apply(&changes)
                .await
                .with_context(|| format!("pin the underlay neighbours of {}", m.name))?;
        }
        Ok(())
    }
}
