//! The agent: records in, reconcile out.
//!
//! One pass = snapshot the store, plan this node, reconcile the kernel,
//! publish the served networks in the state dir. Passes run at start, when the
//! store reports a change, when the kernel reports a change to an owned
//! object, and periodically (drift the events missed). SIGTERM/SIGINT end the
//! agent and leave the data plane in place: a restart does not interrupt
//! traffic, and the next start repairs whatever changed meanwhile.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use crate::dataplane::events::{self, OwnedIndexes};
use crate::dataplane::kernel::Netlink;
use crate::dataplane::plan::{PlanInput, plan};
use crate::dataplane::{NodePlan, reconcile};
use crate::model::NodeRecord;
use crate::state::{self, ServedNetwork};
use crate::store::{Snapshot, Store};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    pub state_dir: PathBuf,
    /// Period of full passes that repair drift no event reported.
    pub resync: Duration,
    /// One pass, then exit.
    pub once: bool,
}

/// The underlay device that carries `ip` and its MTU.
pub async fn find_underlay(nl: &Netlink, me: &NodeRecord) -> Result<(String, u32)> {
    let links = nl.list_links().await?;
    let dev = match &me.underlay_dev {
        Some(d) => d.clone(),
        None => device_with_address(me.underlay_ip)?.with_context(|| {
            format!(
                "underlay IP {} of node '{}' is not on any interface of this host: fix underlay_ip in the cluster file or add the address",
                me.underlay_ip, me.name
            )
        })?,
    };
    let link = links
        .iter()
        .find(|l| l.name == dev)
        .with_context(|| format!("underlay device '{dev}' of node '{}' does not exist", me.name))?;
    Ok((dev, link.mtu))
}

fn device_with_address(ip: Ipv4Addr) -> Result<Option<String>> {
    let addrs = nix::ifaddrs::getifaddrs().context("list interface addresses")?;
    for a in addrs {
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in())
            && sin.ip() == ip
        {
            return Ok(Some(a.interface_name));
        }
    }
    Ok(None)
}

/// Plan this node from a snapshot.
pub async fn plan_node(nl: &Netlink, snap: &Snapshot, node: &str) -> Result<NodePlan> {
    let me = snap.cluster.node(node).with_context(|| {
        format!(
            "node '{node}' is not in the cluster (known: {}): check --node",
            snap.cluster.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let (_, underlay_mtu) = find_underlay(nl, me).await?;
    Ok(plan(&PlanInput {
        cluster: &snap.cluster,
        node,
        endpoints: snap.endpoints.as_deref(),
        underlay_mtu,
    })?)
}

/// Publish what attach/CNI need and drop networks no longer served.
pub fn publish(state_dir: &std::path::Path, node: &str, p: &NodePlan) -> Result<()> {
    let now = state::now_secs();
    for st in p.networks.values() {
        state::write_network(state_dir, &ServedNetwork { node: node.to_string(), state: st.clone(), confirmed_at: now })?;
    }
    for name in state::list_networks(state_dir) {
        if !p.networks.contains_key(&name) {
            state::remove_network(state_dir, &name)?;
        }
    }
    Ok(())
}

/// One full pass. Returns the number of changes applied.
pub async fn pass<S: Store>(store: &mut S, nl: &Netlink, opts: &AgentOptions) -> Result<usize> {
    let snap = store.snapshot().await.with_context(|| format!("read {}", store.describe()))?;
    let p = plan_node(nl, &snap, &opts.node).await?;
    let report = reconcile(nl, &p).await?;
    let reattached = repair_attachments(nl, &p).await?;
    publish(&opts.state_dir, &opts.node, &p)?;
    Ok(report.changes + reattached)
}

/// Container veths (alias `vxmesh:veth:NETWORK:...`) must be ports of their
/// network's bridge. A bridge that was deleted and recreated has lost them:
/// put them back. Returns how many were fixed.
pub async fn repair_attachments(nl: &Netlink, p: &NodePlan) -> Result<usize> {
    let links = nl.list_links().await?;
    let index_of = |name: &str| links.iter().find(|l| l.name == name).map(|l| l.index);
    let mut fixed = 0;
    for l in &links {
        let Some(rest) = l.alias.as_deref().and_then(|a| a.strip_prefix(crate::dataplane::kernel::ATTACHED_ALIAS_PREFIX)) else {
            continue;
        };
        let network = rest.split(':').next().unwrap_or_default();
        let Some(st) = p.networks.get(network) else { continue };
        let Some(bridge) = index_of(&st.bridge) else { continue };
        if l.master != Some(bridge) || !l.up {
            nl.set_link(
                &l.name,
                crate::dataplane::kernel::LinkOptions { master: Some(st.bridge.clone()), up: Some(true), ..Default::default() },
            )
            .await
            .with_context(|| format!("re-attach container veth {} to {}", l.name, st.bridge))?;
            tracing::info!("re-attached container veth {} to {}", l.name, st.bridge);
            fixed += 1;
        }
    }
    Ok(fixed)
}

async fn refresh_owned(nl: &Netlink, owned: &OwnedIndexes) {
    if let Ok(links) = nl.list_links().await {
        let set: HashSet<u32> = links
            .iter()
            .filter(|l| l.name.starts_with(crate::model::DEVICE_PREFIX))
            .map(|l| l.index)
            .collect();
        if let Ok(mut g) = owned.lock() {
            *g = set;
        }
    }
}

/// Run the agent until SIGTERM/SIGINT (or after one pass with `once`).
pub async fn run<S: Store>(mut store: S, opts: AgentOptions) -> Result<()> {
    let _lock = state::lock_agent(&opts.state_dir)?;
    let nl = Netlink::connect().await.context("connect to rtnetlink")?;
    if opts.once {
        let n = pass(&mut store, &nl, &opts).await?;
        tracing::info!(changes = n, "reconciled once");
        return Ok(());
    }
    let owned: OwnedIndexes = Arc::new(Mutex::new(HashSet::new()));
    let kernel_changed = Arc::new(Notify::new());
    let _watcher = events::spawn_watcher(owned.clone(), kernel_changed.clone())?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut last_error: Option<String> = None;
    let mut retry = Duration::from_millis(200);
    tracing::info!(node = %opts.node, store = %store.describe(), "agent started");
    loop {
        let started = Instant::now();
        let outcome = pass(&mut store, &nl, &opts).await;
        refresh_owned(&nl, &owned).await;
        let wait = match outcome {
            Ok(n) => {
                if last_error.take().is_some() {
                    tracing::info!("recovered: node is converged again");
                }
                if n > 0 {
                    tracing::info!(changes = n, elapsed_ms = started.elapsed().as_millis() as u64, "reconciled");
                } else {
                    tracing::debug!("pass: no changes");
                }
                retry = Duration::from_millis(200);
                opts.resync
            }
            Err(e) => {
                let msg = format!("{e:#}");
                // Log once per distinct failure, not on every retry.
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("pass failed (keeping the last applied state): {msg}");
                    last_error = Some(msg);
                }
                let w = retry;
                retry = (retry * 2).min(opts.resync);
                w
            }
        };
        tokio::select! {
            r = store.changed() => {
                if let Err(e) = r { bail!("watching {}: {e:#}", store.describe()); }
                tracing::debug!("store changed");
            }
            _ = kernel_changed.notified() => {
                tracing::debug!("kernel changed an owned object");
            }
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => { tracing::info!("SIGTERM: exiting, data plane left in place"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: exiting, data plane left in place"); return Ok(()); }
        }
        // Coalesce bursts (an editor's several writes, a flurry of kernel events).
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}
