//! The firewall part of `status`: vxmesh's nftables table against the
//! plan (the VTEP filter and its dropped count, outbound NAT per network,
//! the published ports) and what the reconciler would change.

use serde::{Deserialize, Serialize};

use crate::dataplane::NodePlan;
use crate::firewall::{self, Inspection};

/// One network's outbound NAT setting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    pub network: String,
    pub outbound_nat: bool,
}

/// The table `inet vxmesh` as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallStatus {
    /// The table exists (planned whenever the node serves a network).
    pub table: bool,
    pub vxlan_filter: bool,
    /// Peers the filter accepts: planned, and in the kernel's set.
    pub peers_planned: usize,
    pub peers_in_kernel: usize,
    /// VXLAN packets from non-peers the filter dropped.
    pub dropped_packets: Option<u64>,
    /// Packets the secure underlay's guard dropped (an encrypted network's
    /// VXLAN from outside the tunnel).
    #[serde(default)]
    pub spoofed_packets: Option<u64>,
    pub networks: Vec<NatStatus>,
    /// Published ports: `tcp 8080 -> 10.1.0.5:80 (network, owner)`.
    pub ports: Vec<String>,
    /// The changes a reconcile would make (empty: in place).
    pub drift: Vec<String>,
}

impl FirewallStatus {
    pub fn ok(&self) -> bool {
        self.drift.is_empty()
    }
}

/// Whether `plan` masquerades the network `name`'s traffic.
fn nat_of(plan: &NodePlan, name: &str) -> bool {
    plan.networks.get(name).is_some_and(|st| {
        plan.firewall
            .nat_sources
            .iter()
            .any(|r| r.contains(&st.subnet))
    })
}

/// The status of the table from an inspection of the kernel.
pub fn firewall_status(plan: &NodePlan, i: &Inspection) -> FirewallStatus {
    FirewallStatus {
        table: i.present,
        vxlan_filter: plan.firewall.vxlan_filter,
        peers_planned: plan.firewall.peers.len(),
        peers_in_kernel: i.peers,
        dropped_packets: i.dropped.map(|d| d.0),
        spoofed_packets: i.spoofed.map(|d| d.0),
        networks: plan
            .networks
            .keys()
            .map(|n| NatStatus {
                network: n.clone(),
                outbound_nat: nat_of(plan, n),
            })
            .collect(),
        ports: plan
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{:?} {} -> {}:{} ({}, {})",
                    p.proto, p.host_port, p.container_ip, p.container_port, p.network, p.owner
                )
                .to_lowercase()
            })
            .collect(),
        drift: i.changes.iter().map(ToString::to_string).collect(),
    }
}

/// Inspect the table of the current namespace (runs `nft`).
pub async fn inspect(plan: &NodePlan) -> Result<Inspection, firewall::NftError> {
    let p = plan.clone();
    tokio::task::spawn_blocking(move || firewall::inspect(&p))
        .await
        .unwrap_or_else(|e| {
            Err(firewall::NftError::Spawn(std::io::Error::other(
                e.to_string(),
            )))
        })
}

/// The status lines of the table.
pub fn render(f: &FirewallStatus) -> Vec<String> {
    let mut out = vec![format!(
        "firewall (nftables table inet vxmesh): {}, vxlan filter {} ({} of {} peers in the set, {} dropped), {}",
        if f.table { "present" } else { "ABSENT" },
        if f.vxlan_filter { "on" } else { "off" },
        f.peers_in_kernel,
        f.peers_planned,
        f.dropped_packets.map_or("-".into(), |d| d.to_string()),
        if f.ok() { "in place" } else { "DRIFT" }
    )];
    if let Some(n) = f.spoofed_packets.filter(|_| f.table) {
        out.push(format!(
            "  encrypted networks' VXLAN only from the tunnel: {n} spoofed packet(s) dropped"
        ));
    }
    for n in &f.networks {
        out.push(format!(
            "  network {}: outbound NAT {}",
            n.network,
            if n.outbound_nat { "on" } else { "off" }
        ));
    }
    for p in &f.ports {
        out.push(format!("  published {p}"));
    }
    for d in &f.drift {
        out.push(format!("  would {d}"));
    }
    out
}
