//! The agent: records in, reconcile out.
//!
//! One pass = snapshot the store, plan this node, reconcile the kernel,
//! publish the served networks and the applied plan (`plan.json`, read by
//! `vxmesh status` and `doctor`) in the state dir, and (etcd store, bridged
//! networks) keep the endpoints this node publishes equal to the addresses
//! attached on it. A full pass publishes the networks once the node's own
//! devices and firewall are in place, before the peer entries (`apply_plan`).
//! Passes run at start, when the store reports a change, when
//! the kernel reports a change to an owned object, and periodically (drift
//! the events missed). A pass triggered by the store alone, while the kernel
//! is known to hold the previous plan (no kernel event since it was applied),
//! applies a change of peer entries straight from the two plans: a node
//! joining a 10 000-peer cluster costs its 3 messages and no dump. Any kernel
//! event that contradicts the plan being applied (not the agent's own
//! changes, not the kernel's dynamic neighbours: `dataplane::expected`,
//! `dataplane::expected_links`), lost events (the notification socket
//! overflowed), the periodic resync and every error fall back to a full pass; the
//! nftables table (no rtnetlink event tells of its changes) is dumped on
//! the first pass, at every resync, after an error and when its rules change.
//! SIGTERM/SIGINT end the agent and leave the data plane
//! in place (and, with the etcd store, the node's lease and records until
//! their TTL): a restart does not interrupt traffic, and the next start
//! repairs whatever changed meanwhile. A state dir deleted under a running
//! agent is recreated by its next pass: the lock taken again, the network
//! and plan files rewritten, and the address allocations of containers still
//! attached restored from memory. A graceful leave is the caller's
//! choice afterwards ([`Store::leave`]): [`run`] only borrows the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::Mode;
use crate::dataplane::events::{self, KernelEvents, OwnedIndexes};
use crate::dataplane::expected::{Expectation, Expected};
use crate::dataplane::kernel::Netlink;
use crate::dataplane::plan::{PlanInput, plan};
use crate::dataplane::{NodePlan, ReconcileReport, reconcile_from, reconcile_local};
use crate::error::chain;
use crate::ipam::{Allocation, Ipam};
use crate::metrics::Metrics;
use crate::model::NodeRecord;
use crate::secure::SecureUnderlay;
use crate::secure::underlay::report::REPORT_EVERY;
use crate::state::{self, NetworkFiles, ServedNetwork, StateFiles};
use crate::store::{AllocatorSpec, Snapshot, Store, StoreError};

mod error;
mod published;

pub use error::AgentError;

type Result<T, E = AgentError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    pub state_dir: PathBuf,
    /// Period of full passes that repair drift no event reported.
    pub resync: Duration,
    /// One pass, then exit.
    pub once: bool,
    /// Where passes and reconciles are recorded (served with `--metrics`).
    pub metrics: Metrics,
    /// Drop VXLAN packets from anything but the node's peers.
    pub vxlan_filter: bool,
    /// The secure underlay's private key (`None`: `STATE_DIR/wg.key`).
    pub key_file: Option<PathBuf>,
}

/// The underlay device that carries `ip` and its MTU.
pub async fn find_underlay(nl: &Netlink, me: &NodeRecord) -> Result<(String, u32)> {
    let links = nl.list_links().await?;
    let dev = match &me.underlay_dev {
        Some(d) => d.clone(),
        None => {
            device_with_address(me.underlay_ip)?.ok_or_else(|| AgentError::UnderlayIpNotHere {
                ip: me.underlay_ip,
                node: me.name.clone(),
            })?
        }
    };
    let link =
        links
            .iter()
            .find(|l| l.name == dev)
            .ok_or_else(|| AgentError::NoUnderlayDevice {
                device: dev.clone(),
                node: me.name.clone(),
            })?;
    Ok((dev, link.mtu))
}

fn device_with_address(ip: Ipv4Addr) -> Result<Option<String>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(AgentError::Addresses)?;
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
    let me = snap
        .cluster
        .node(node)
        .ok_or_else(|| AgentError::UnknownNode {
            node: node.to_string(),
            known: snap.cluster.node_names(),
        })?;
    let (_, underlay_mtu) = find_underlay(nl, me).await?;
    Ok(plan(&PlanInput {
        cluster: &snap.cluster,
        node,
        endpoints: snap.endpoints.as_deref(),
        underlay_mtu,
        vxlan_filter: true,
    })?)
}

/// Publish what attach/CNI need and drop networks no longer served.
/// `allocator` gives the allocator the store names for a network; `files`
/// skips the rewrite of a file that already says it.
pub fn publish(
    state_dir: &std::path::Path,
    node: &str,
    p: &NodePlan,
    allocator: impl Fn(&str) -> AllocatorSpec,
    files: &mut NetworkFiles,
) -> Result<()> {
    let now = state::now_secs();
    for st in p.networks.values() {
        files.write(
            state_dir,
            &ServedNetwork {
                node: node.to_string(),
                state: st.clone(),
                confirmed_at: now,
                allocator: allocator(&st.network),
            },
        )?;
    }
    for name in state::list_networks(state_dir) {
        if !p.networks.contains_key(&name) {
            files.remove(state_dir, &name)?;
        }
    }
    Ok(())
}

/// What one pass did.
#[derive(Debug)]
pub struct PassOutcome {
    /// Kernel changes applied (plus container veths re-attached).
    pub changes: usize,
    /// The plan the kernel now holds.
    pub plan: NodePlan,
    /// Applied from the previous plan, without a dump.
    pub incremental: bool,
}

/// What a pass may take as already applied (see [`pass`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Trusted<'a> {
    /// The plan the kernel's routes, neighbours and FDB entries hold:
    /// applied by the previous pass, and no rtnetlink event since.
    pub kernel: Option<&'a NodePlan>,
    /// The plan vxmesh's nftables table holds: applied by the previous
    /// pass, no periodic resync due. nftables changes raise no rtnetlink
    /// event: a pass woken by one learns nothing new from an `nft` dump.
    pub firewall: Option<&'a NodePlan>,
}

/// One pass. With `trusted.kernel`, the plan the kernel is known to hold,
/// a change of peer entries only is applied straight from the two plans,
/// with no dump: a joining peer costs its few messages, not a walk over
/// every entry. Anything else (and every pass without it) dumps, diffs and
/// repairs container veths. Likewise the firewall: set elements from
/// `trusted.firewall`, else `nft` dump, diff and repair.
/// The network files and the applied plan are saved through `plans`
/// (each rewritten only when it changed).
/// `expect` is told the plan before the kernel is changed (the watcher of
/// kernel events then knows the changes that follow for the pass's own).
pub async fn pass<S: Store>(
    store: &mut S,
    nl: &Netlink,
    opts: &AgentOptions,
    trusted: Trusted<'_>,
    plans: &mut StateFiles,
    secure: &mut SecureUnderlay,
    expect: &(dyn Fn(&NodePlan) + Send + Sync),
) -> Result<PassOutcome> {
    if store.lists_keys() {
        // A rotation's next key (then the new key alone) goes into the
        // node's record before the snapshot, which then lists it.
        let keys = secure.listed_keys()?;
        store
            .publish_keys(keys)
            .await
            .map_err(|error| AgentError::PublishKeys {
                store: store.describe(),
                error,
            })?;
    }
    let t0 = Instant::now();
    let snap = store
        .snapshot()
        .await
        .map_err(|error| AgentError::Snapshot {
            store: store.describe(),
            error,
        })?;
    let snapshot_at = t0.elapsed();
    let mut p = plan_node(nl, &snap, &opts.node).await?;
    p.firewall.vxlan_filter = opts.vxlan_filter;
    p.ports = published::published_ports(nl, &opts.state_dir, &p).await?;
    // Published ports changed: the incremental diff knows only peer entries.
    let base = trusted.kernel.filter(|b| b.ports == p.ports);
    expect(&p);
    let planned_at = t0.elapsed();
    // Before the VTEPs: an encrypted network's VTEP sends to the TUN device.
    secure.apply(nl, p.secure.as_ref()).await?;
    let networks = &mut plans.networks;
    let shared: &S = store;
    let ready = || {
        publish(
            &opts.state_dir,
            &opts.node,
            &p,
            |n| shared.allocator(n),
            networks,
        )
    };
    let applied = apply_plan(nl, opts, base, trusted.firewall, &p, ready).await?;
    let (report, fw, incremental) = (applied.kernel, applied.firewall, applied.incremental);
    let (kernel_took, firewall_took) = (applied.kernel_took, applied.firewall_took);
    let reattached = if incremental {
        0
    } else {
        repair_attachments(nl, &p).await?
    };
    opts.metrics.reattached(reattached);
    let changes = report.changes + reattached + fw.changes.len();
    plans.plan.save(&opts.state_dir, &opts.node, &snap, &p)?;
    report_secure(opts, secure, p.secure.as_ref());
    sync_endpoints(store, opts, &p).await?;
    let ms = |d: Duration| d.as_millis() as u64;
    tracing::debug!(
        snapshot_ms = ms(snapshot_at),
        plan_ms = ms(planned_at - snapshot_at),
        kernel_ms = ms(kernel_took),
        firewall_ms = ms(firewall_took),
        total_ms = ms(t0.elapsed()),
        incremental,
        "pass timing"
    );
    Ok(PassOutcome {
        changes,
        plan: p,
        incremental,
    })
}

/// What [`apply_plan`] did.
struct Applied {
    kernel: ReconcileReport,
    firewall: crate::firewall::FirewallReport,
    incremental: bool,
    /// Time spent on the kernel's routes, devices and entries.
    kernel_took: Duration,
    /// Time spent on the nftables table.
    firewall_took: Duration,
}

/// The kernel and firewall part of a pass, with `ready` (publishing the
/// network files) run once the node can serve containers. Incremental
/// (peer entries from `base`): entries, firewall, `ready`. Full: the
/// node's own devices, addresses and forwarding, the firewall, `ready`,
/// then the peer entries: attach and CNI need the bridge and the firewall,
/// not the peers, and a node starting into a cluster of hundreds no
/// longer keeps them waiting while it programs every peer (the kernel
/// gets the same changes in the same order as from one reconcile). A
/// failed firewall or `ready` still lets the entries be applied; the
/// pass then fails with that error (and, the firewall failing, without
/// running `ready`, as before).
async fn apply_plan(
    nl: &Netlink,
    opts: &AgentOptions,
    base: Option<&NodePlan>,
    fw_base: Option<&NodePlan>,
    p: &NodePlan,
    ready: impl FnOnce() -> Result<()>,
) -> Result<Applied> {
    let t0 = Instant::now();
    if let Some(old) = base {
        let r = reconcile_from(nl, old, p).await;
        match r {
            Ok(None) => {}
            Ok(Some(kernel)) => {
                let kernel_took = t0.elapsed();
                opts.metrics.reconciled(p, kernel_took, Ok(&kernel));
                let firewall = firewall_pass(fw_base, p).await?;
                opts.metrics.firewall(&firewall);
                let firewall_took = t0.elapsed() - kernel_took;
                ready()?;
                return Ok(Applied {
                    kernel,
                    firewall,
                    incremental: true,
                    kernel_took,
                    firewall_took,
                });
            }
            Err(e) => {
                opts.metrics.reconciled(p, t0.elapsed(), Err(&e));
                return Err(e.into());
            }
        }
    }
    let staged = match reconcile_local(nl, p).await {
        Ok(s) => s,
        Err(e) => {
            opts.metrics.reconciled(p, t0.elapsed(), Err(&e));
            return Err(e.into());
        }
    };
    let local_took = t0.elapsed();
    let firewall = firewall_pass(fw_base, p).await;
    if let Ok(fw) = &firewall {
        opts.metrics.firewall(fw);
    }
    let firewall_took = t0.elapsed() - local_took;
    let published = firewall.as_ref().ok().map(|_| ready());
    let t1 = Instant::now();
    let kernel = staged.finish(nl).await;
    let kernel_took = local_took + t1.elapsed();
    opts.metrics.reconciled(p, kernel_took, kernel.as_ref());
    let kernel = kernel?;
    let firewall = firewall?;
    published.transpose()?;
    Ok(Applied {
        kernel,
        firewall,
        incremental: false,
        kernel_took,
        firewall_took,
    })
}

/// Hand the secure underlay's report to the metrics and write it to
/// `STATE/secure.json` for `status` and `doctor` (the data path lives in
/// this process); remove the file when no secure underlay runs.
fn report_secure(
    opts: &AgentOptions,
    secure: &SecureUnderlay,
    plan: Option<&crate::secure::plan::SecurePlan>,
) {
    let report = plan.and_then(|sp| secure.report(sp));
    if let Some(r) = &report {
        opts.metrics.secure(r);
    }
    if let Err(e) = crate::secure::underlay::report::write_report(&opts.state_dir, report.as_ref())
    {
        tracing::warn!("secure underlay report: {}", chain(&e));
    }
}

/// The firewall part of a pass, in the same pass as the routes and FDB
/// entries: from the previous plan when only set elements changed (a peer
/// joined or left; nothing when nothing changed), else dump, diff, repair.
async fn firewall_pass(
    base: Option<&NodePlan>,
    p: &NodePlan,
) -> Result<crate::firewall::FirewallReport> {
    let (old, new) = (base.cloned(), p.clone());
    let r = tokio::task::spawn_blocking(move || {
        if let Some(old) = &old
            && let Some(r) = crate::firewall::reconcile_from(old, &new)?
        {
            return Ok(r);
        }
        crate::firewall::reconcile(&new)
    })
    .await
    .map_err(AgentError::FirewallTask)?;
    Ok(r?)
}

/// Bridged networks whose addresses the store allocates (etcd): publish
/// exactly the addresses attached on this node. Every network with
/// allocations here (also one no longer served): detach the containers
/// whose address another node owns now ([`detach_lost`]). Runs under the
/// IPAM lock, so it never races an attach or detach in progress.
async fn sync_endpoints<S: Store>(store: &mut S, opts: &AgentOptions, p: &NodePlan) -> Result<()> {
    let mut names: BTreeSet<String> = p
        .networks
        .iter()
        .filter(|(name, st)| st.mode == Mode::Bridged && !store.allocator(name).is_local())
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(Ipam::networks(&opts.state_dir));
    for name in &names {
        let (dir, net) = (opts.state_dir.clone(), name.clone());
        let (lock, allocations) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let ipam = Ipam::new(&dir, &net);
            let lock = ipam.lock()?;
            let allocations = ipam.list()?;
            Ok((lock, allocations))
        })
        .await
        .map_err(|error| AgentError::IpamTask {
            network: name.clone(),
            error,
        })??;
        let allocated: BTreeSet<Ipv4Addr> = allocations.iter().map(|a| a.ip).collect();
        let lost = store
            .sync_endpoints(name, &allocated)
            .await
            .map_err(|error| AgentError::PublishEndpoints {
                network: name.clone(),
                error,
            });
        let r = match lost {
            Ok(lost) => detach_lost(opts, name, &lock, &allocations, &lost).await,
            Err(e) => Err(e),
        };
        drop(lock);
        r?;
    }
    Ok(())
}

/// Detach the containers of `network` whose address another node owns now
/// (`lost`, from the store), with the IPAM lock held: one error line per
/// container, counted in `vxmesh_containers_detached_total`. A container
/// whose address is still this node's is never in `lost`.
async fn detach_lost(
    opts: &AgentOptions,
    network: &str,
    lock: &crate::ipam::IpamLock,
    allocations: &[Allocation],
    lost: &[crate::store::LostAddress],
) -> Result<()> {
    let ipam = Ipam::new(&opts.state_dir, network);
    for l in lost {
        let Some(a) = allocations.iter().find(|a| a.ip == l.ip) else {
            continue;
        };
        let detached = crate::attach::detach_lost(&ipam, lock, network, &a.owner, a.ip, None)
            .await
            .map_err(|error| AgentError::DetachLost {
                network: network.to_string(),
                container_id: a.owner.container_id.clone(),
                ip: a.ip,
                error: Box::new(error),
            })?;
        if detached {
            opts.metrics.container_detached(network, "address_lost");
            tracing::error!(
                network, container = %a.owner.container_id, ifname = %a.owner.ifname, ip = %a.ip, owner = %l.owner,
                "THIS NODE LOST AN ADDRESS: detached container {} ({}) from network {network}: its address {} is \
                 now owned by node {} (claimed while this node's etcd lease was expired for longer than the grace \
                 period)",
                a.owner.container_id, a.owner.ifname, a.ip, l.owner
            );
        }
    }
    Ok(())
}

/// Container veths (alias `vxmesh:veth:NETWORK:...`) must be ports of their
/// network's bridge. A bridge that was deleted and recreated has lost them:
/// put them back. Returns how many were fixed.
pub async fn repair_attachments(nl: &Netlink, p: &NodePlan) -> Result<usize> {
    let links = nl.list_links().await?;
    let index_of = |name: &str| links.iter().find(|l| l.name == name).map(|l| l.index);
    let mut fixed = 0;
    for l in &links {
        let Some(alias) = l
            .alias
            .as_deref()
            .and_then(|a| a.parse::<crate::names::VethAlias>().ok())
        else {
            continue;
        };
        let Some(st) = p.networks.get(alias.network.as_str()) else {
            continue;
        };
        let Some(bridge) = index_of(&st.bridge) else {
            continue;
        };
        if l.master != Some(bridge) || !l.up {
            nl.set_link(
                &l.name,
                crate::dataplane::kernel::LinkOptions {
                    master: Some(st.bridge.clone()),
                    up: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| AgentError::Reattach {
                veth: l.name.clone(),
                bridge: st.bridge.clone(),
                error: Box::new(error),
            })?;
            tracing::info!("re-attached container veth {} to {}", l.name, st.bridge);
            fixed += 1;
        }
    }
    Ok(fixed)
}

/// The address allocations of the state dir as last seen, per network, so
/// that a deleted state dir does not hand out addresses still in use.
#[derive(Default)]
struct AllocationMemory(BTreeMap<String, Vec<Allocation>>);

impl AllocationMemory {
    /// Restore every remembered allocation whose file is gone while its
    /// container veth still exists, then remember what the state dir holds
    /// (networks no longer served are remembered as long as the agent runs).
    /// Runs under each network's IPAM lock: detach deletes the veth before
    /// it releases the address, so a released address is never restored.
    async fn keep(&mut self, nl: &Netlink, state_dir: &std::path::Path) -> Result<()> {
        let remembered = std::mem::take(&mut self.0);
        // The networks served now, and those remembered (their files may be gone).
        let mut networks: BTreeSet<String> = state::list_networks(state_dir).into_iter().collect();
        networks.extend(remembered.keys().cloned());
        let mut seen = BTreeMap::new();
        for net in networks {
            let (dir, name) = (state_dir.to_path_buf(), net.clone());
            let (lock, on_disk) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                let ipam = Ipam::new(&dir, &name);
                let lock = ipam.lock()?;
                let list = ipam.list()?;
                Ok((lock, list))
            })
            .await
            .map_err(|error| AgentError::IpamTask {
                network: net.clone(),
                error,
            })??;
            let missing: Vec<&Allocation> = remembered
                .get(&net)
                .into_iter()
                .flatten()
                .filter(|a| !on_disk.iter().any(|d| d.ip == a.ip || d.owner == a.owner))
                .collect();
            let mut now = on_disk;
            if !missing.is_empty() {
                let aliases: HashSet<String> = nl
                    .list_links()
                    .await?
                    .into_iter()
                    .filter_map(|l| l.alias)
                    .collect();
                let ipam = Ipam::new(state_dir, &net);
                for a in missing {
                    let alias =
                        crate::attach::veth_alias(&net, &a.owner.container_id, &a.owner.ifname);
                    if aliases.contains(&alias) {
                        ipam.restore(&lock, a)?;
                        tracing::warn!(
                            "restored the allocation of {} to {}/{} in network {net}",
                            a.ip,
                            a.owner.container_id,
                            a.owner.ifname
                        );
                        now.push(a.clone());
                    }
                }
            }
            drop(lock);
            seen.insert(net, now);
        }
        self.0 = seen;
        Ok(())
    }
}

/// Record the indexes of vxmesh's devices for the event watcher; returns
/// them by name (empty if the links cannot be listed).
async fn refresh_owned(nl: &Netlink, owned: &OwnedIndexes) -> HashMap<String, u32> {
    let Ok(links) = nl.list_links().await else {
        return HashMap::new();
    };
    let by_name: HashMap<String, u32> = links
        .into_iter()
        .filter(|l| l.name.starts_with(crate::model::DEVICE_PREFIX))
        .map(|l| (l.name, l.index))
        .collect();
    if let Ok(mut g) = owned.lock() {
        *g = by_name.values().copied().collect();
    }
    by_name
}

/// SIGTERM and SIGINT, installed once for the agent's whole life.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        let handler = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|error| AgentError::Signal {
                signal: name,
                error,
            })
        };
        Ok(Signals {
            term: handler(SignalKind::terminate(), "SIGTERM")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
        })
    }
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Run the agent until SIGTERM/SIGINT (or after one pass with `once`).
/// Takes the state dir's agent lock first. The store is only borrowed: the
/// caller may leave the network afterwards ([`Store::leave`]).
pub async fn run<S: Store>(store: &mut S, opts: &AgentOptions) -> Result<()> {
    let mut lock = state::lock_agent(&opts.state_dir)?;
    let mut signals = Signals::install()?;
    serve(store, opts, &mut signals, &mut lock).await
}

/// Like [`run`], but first obtain the store with `join` (the etcd store:
/// join the network), retrying with backoff while that fails (etcd
/// unreachable, network not created yet), logging once per distinct error.
/// The agent lock is held from the start, so two agents never join as one
/// node. Returns the store after a signal (for a graceful leave), or `None`
/// if the signal came before the join succeeded. With `once`, one attempt.
pub async fn join_and_run<S, F, Fut>(opts: &AgentOptions, mut join: F) -> Result<Option<S>>
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<S, StoreError>>,
{
    let mut lock = state::lock_agent(&opts.state_dir)?;
    let mut signals = Signals::install()?;
    let mut delay = Duration::from_millis(200);
    let mut last_error: Option<String> = None;
    let mut attempts = 0u32;
    let mut store = loop {
        attempts += 1;
        let r = tokio::select! {
            r = join() => r,
            sig = signals.recv() => {
                tracing::info!("{sig} before joining: exiting");
                return Ok(None);
            }
        };
        match r {
            Ok(s) => {
                if last_error.is_some() {
                    tracing::info!(attempts, "joined after retrying");
                }
                break s;
            }
            Err(e) if opts.once => return Err(e.into()),
            Err(e) => {
                // One log line per distinct cause (the message of one cause
                // varies with keys and leases), every failure counted.
                let cause = e.join_cause();
                opts.metrics.join_failed(cause);
                if last_error.as_deref() != Some(cause) {
                    tracing::warn!(cause, "cannot join yet, retrying with backoff: {e:#}");
                    last_error = Some(cause.to_string());
                }
                // Jittered, so that agents started together (or failed by
                // one etcd hiccup) do not retry in lockstep.
                tokio::select! {
                    _ = tokio::time::sleep(jittered(delay)) => {}
                    sig = signals.recv() => {
                        tracing::info!("{sig} before joining: exiting");
                        return Ok(None);
                    }
                }
                delay = next_join_delay(delay, cause);
            }
        }
    };
    serve(&mut store, opts, &mut signals, &mut lock).await?;
    Ok(Some(store))
}

/// The pause before the next join attempt: doubled each time, up to 2 s;
/// up to 5 s while etcd does not answer in time (`unreachable`): it is
/// down or overloaded, and hundreds of nodes retrying a join (each attempt
/// lists the whole network) every 2 s would keep it so.
fn next_join_delay(delay: Duration, cause: &str) -> Duration {
    let cap = if cause == "unreachable" {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(2)
    };
    (delay * 2).min(cap)
}

/// `d` plus up to 50 % jitter.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    let spread = (d.as_nanos() as u64 / 2).max(1);
    d + Duration::from_nanos(nanos % spread)
}

async fn serve<S: Store>(
    store: &mut S,
    opts: &AgentOptions,
    signals: &mut Signals,
    lock: &mut state::AgentLock,
) -> Result<()> {
    opts.metrics.store_ready();
    let nl = Netlink::connect().await.map_err(AgentError::Connect)?;
    if opts.once {
        let mut secure = SecureUnderlay::new(opts.key_file.clone(), opts.state_dir.clone());
        let plans = &mut StateFiles::new();
        let none = Trusted::default();
        let outcome = pass(store, &nl, opts, none, plans, &mut secure, &|_| {}).await;
        opts.metrics.pass_done(outcome.is_ok());
        let o = outcome?;
        tracing::info!(changes = o.changes, "reconciled once");
        return Ok(());
    }
    let owned: OwnedIndexes = Arc::new(Mutex::new(HashSet::new()));
    let expected: Expectation = Arc::new(Mutex::new(None));
    // Owned devices by name, for `expected` (refreshed with `owned`).
    let mut devices: HashMap<String, u32> = HashMap::new();
    let kernel = Arc::new(KernelEvents::default());
    let _watcher = events::spawn_watcher(owned.clone(), expected.clone(), kernel.clone())?;
    let mut last_error: Option<String> = None;
    let mut retry = Duration::from_millis(200);
    // The plan the kernel holds and the kernel event count when the pass
    // that applied it started: while the count is unchanged, nothing but
    // that pass touched what vxmesh owns.
    let mut trusted: Option<(NodePlan, u64)> = None;
    // The secure underlay of the last good pass: its report goes on between
    // passes, also while passes fail (a refused key listing, say).
    let mut secure_plan: Option<crate::secure::plan::SecurePlan> = None;
    let mut resync_due = false;
    let mut allocations = AllocationMemory::default();
    let mut plans = StateFiles::new();
    // Publishers (Docker -p, attach --publish) poke it: a pass right away.
    let mut waker = crate::wake::Waker::bind(&opts.state_dir)?;
    let mut secure = SecureUnderlay::new(opts.key_file.clone(), opts.state_dir.clone());
    tracing::info!(node = %opts.node, store = %store.describe(), "agent started");
    loop {
        // The state dir may have been deleted under us: take the lock again
        // (before the pass recreates the rest) and put back the addresses
        // of containers still attached.
        if lock.keep()? {
            tracing::warn!(
                "state dir {} was removed: lock taken again, its files are being recreated",
                opts.state_dir.display()
            );
        }
        if let Err(e) = waker.keep() {
            tracing::error!("{}", chain(&e));
        }
        // Before the pass: it publishes the network files (attach must not
        // allocate from an emptied IPAM) and, bridged on etcd, exactly the
        // endpoints the IPAM holds (none must be withdrawn by mistake).
        if let Err(e) = allocations.keep(&nl, &opts.state_dir).await {
            tracing::error!("keeping the address allocations: {}", chain(&e));
        }
        let started = Instant::now();
        let seen = kernel.count();
        let last = trusted.take().filter(|_| !resync_due);
        let base = Trusted {
            kernel: last
                .as_ref()
                .filter(|(_, at)| *at == seen && kernel.reliable())
                .map(|(p, _)| p),
            firewall: last.as_ref().map(|(p, _)| p),
        };
        let expect = |p: &NodePlan| {
            if let Ok(mut e) = expected.lock() {
                *e = Some(Expected::of(p, &devices));
            }
        };
        let outcome = pass(store, &nl, opts, base, &mut plans, &mut secure, &expect).await;
        opts.metrics.pass_done(outcome.is_ok());
        // An incremental pass changes no device: the owned indexes stand.
        if !matches!(&outcome, Ok(o) if o.incremental) {
            devices = refresh_owned(&nl, &owned).await;
        }
        let wait = match outcome {
            Ok(o) => {
                if last_error.take().is_some() {
                    tracing::info!("recovered: node is converged again");
                }
                if o.changes > 0 {
                    tracing::info!(
                        changes = o.changes,
                        incremental = o.incremental,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "reconciled"
                    );
                } else {
                    tracing::debug!(incremental = o.incremental, "pass: no changes");
                }
                secure_plan = o.plan.secure.clone();
                if !o.incremental {
                    // The devices this pass created are listed now: from
                    // here on a change to them is drift, not a creation.
                    if let Ok(mut e) = expected.lock() {
                        *e = Some(Expected::of(&o.plan, &devices));
                    }
                }
                trusted = Some((o.plan, seen));
                retry = Duration::from_millis(200);
                opts.resync
            }
            Err(e) => {
                let msg = chain(&e);
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
        resync_due = false;
        let pass_took = started.elapsed();
        let mut coalesce = COALESCE;
        let resync = tokio::time::sleep(wait);
        tokio::pin!(resync);
        let mut report_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + REPORT_EVERY, REPORT_EVERY);
        loop {
            tokio::select! {
                r = store.changed() => {
                    if let Err(error) = r {
                        return Err(AgentError::Watch { store: store.describe(), error });
                    }
                    tracing::debug!("store changed");
                    coalesce = store_coalesce(pass_took);
                }
                () = waker.woken() => {
                    tracing::debug!("woken: published ports changed");
                }
                _ = kernel.notify.notified() => {
                    tracing::debug!("kernel changed an owned object");
                }
                _ = &mut resync => { resync_due = true; }
                sig = signals.recv() => { tracing::info!("{sig}: exiting, data plane left in place"); return Ok(()); }
                // Between passes: the secure underlay's sessions move on.
                _ = report_tick.tick(), if secure_plan.is_some() => {
                    report_secure(opts, &secure, secure_plan.as_ref());
                    continue;
                }
            }
            break;
        }
        // Coalesce bursts (an editor's several writes, a flurry of kernel
        // events, many nodes joining at once).
        tokio::time::sleep(coalesce).await;
    }
}

/// The pause after a wake-up before the next pass, so that a burst of
/// changes costs one pass.
const COALESCE: Duration = Duration::from_millis(30);
/// Store changes wait this many times the last pass's duration ...
const STORE_PASS_SPACING: u32 = 3;
/// ... but never longer than this.
const MAX_STORE_COALESCE: Duration = Duration::from_secs(2);

/// How long to gather store changes before the pass that applies them,
/// given how long the last pass took. A pass is O(cluster) (snapshot,
/// plan, plan file), so when hundreds of nodes join at once, every node
/// passing once per join is O(N^2) per node: with all of them on a few
/// cores (or a busy host) the passes starve etcd and the joins
/// themselves. Spacing store-triggered passes by a multiple of their own
/// duration bounds the share of time they take (at most a quarter here),
/// whatever the rate of changes, and costs a small cluster nothing
/// (passes of a few ms: the usual 30 ms).
fn store_coalesce(last_pass: Duration) -> Duration {
    (last_pass * STORE_PASS_SPACING).clamp(COALESCE, MAX_STORE_COALESCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_retries_back_off_further_while_etcd_does_not_answer() {
        let mut d = Duration::from_millis(200);
        for _ in 0..10 {
            d = next_join_delay(d, "lease_lost");
        }
        assert_eq!(d, Duration::from_secs(2));
        for _ in 0..10 {
            d = next_join_delay(d, "unreachable");
        }
        assert_eq!(d, Duration::from_secs(5));
    }

    #[test]
    fn store_passes_are_spaced_by_their_cost() {
        // Small clusters: passes of a few ms, the usual 30 ms.
        assert_eq!(store_coalesce(Duration::from_millis(2)), COALESCE);
        // Expensive passes (many peers, a busy host): three times theirs.
        assert_eq!(
            store_coalesce(Duration::from_millis(100)),
            Duration::from_millis(300)
        );
        // Bounded: a joining peer is never kept waiting long.
        assert_eq!(store_coalesce(Duration::from_secs(5)), MAX_STORE_COALESCE);
    }
}
