//! The lab's containers: which ones each host gets, and attaching them,
//! several at once when a lab is built (each attach mostly waits on netlink,
//! the IPAM lock or etcd; hundreds one after the other made the containers
//! the slowest phase of a big lab), recorded in a fixed order.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use futures::StreamExt;
use vxmesh::attach::{self, AttachRequest};
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::state;

use super::cni::cni_add;
use super::{AttachMode, Lab, LabContainer, LabNode, Runtime};

/// Most hosts attaching containers at once while a lab is built.
const PARALLEL_ATTACHES: usize = 8;

/// One container to attach: where, its name, and its address (bridged).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Planned {
    node: String,
    network: String,
    name: String,
    ip: Option<Ipv4Addr>,
}

/// The container names of `node`: `NODE-cK` (routed), `NODE-nMcK` (bridged).
fn container_name(mode: Mode, node: &str, m: usize, k: usize) -> String {
    match mode {
        Mode::Routed => format!("{node}-c{k}"),
        Mode::Bridged => format!("{node}-n{}c{k}", m + 1),
    }
}

/// What the attach of one container needs, owned (attaches run concurrently
/// while the lab itself is not borrowed).
struct AttachCtx {
    lab: String,
    mode: AttachMode,
    exe: std::path::PathBuf,
}

impl Lab {
    /// The `k` containers per network of `nets` that `node` gets.
    fn plan_containers(&self, node: &str, nets: &[String], k: usize) -> Result<Vec<Planned>> {
        let state_dir = self.node(node)?.state_dir.clone();
        let mut out = Vec::new();
        for (m, net) in nets.iter().enumerate() {
            for k in 1..=k {
                // Bridged: network m starts m addresses further into the slice, so
                // networks share some addresses (same IP, different VNI) and not
                // others (an isolation probe has a real target in one network only).
                let ip = match self.info.mode {
                    Mode::Routed => None,
                    Mode::Bridged => {
                        let st = state::read_network(&state_dir, net)?.state;
                        vxmesh::dataplane::plan::usable_addresses(st.pool, st.subnet, st.gateway)
                            .nth(k - 1 + m)
                    }
                };
                out.push(Planned {
                    node: node.to_string(),
                    network: net.clone(),
                    name: container_name(self.info.mode, node, m, k),
                    ip,
                });
            }
        }
        Ok(out)
    }

    /// Attach `k` containers per network of `nets` on `node`.
    pub(super) async fn attach_containers(
        &mut self,
        node: &str,
        nets: &[String],
        k: usize,
    ) -> Result<()> {
        for p in self.plan_containers(node, nets, k)? {
            self.add_container(&p.node, &p.network, &p.name, p.ip)
                .await?;
        }
        Ok(())
    }

    /// Attach `k` containers per network of `nets` on every host, up to
    /// [`PARALLEL_ATTACHES`] at once (Docker: one at a time, through each
    /// host's daemon). The lab records them in host order whatever order
    /// they finished in; on a failure the ones attached stay recorded (so
    /// teardown removes them) and the first error is returned.
    pub(super) async fn attach_everywhere(&mut self, nets: &[String], k: usize) -> Result<()> {
        let mut plan = Vec::new();
        for node in self.info.nodes.clone() {
            plan.extend(self.plan_containers(&node.name, nets, k)?);
        }
        if self.info.runtime == Runtime::Docker {
            for p in plan {
                self.add_container(&p.node, &p.network, &p.name, p.ip)
                    .await?;
            }
            return Ok(());
        }
        let ctx = AttachCtx {
            lab: self.info.name.clone(),
            mode: self.attach,
            exe: self.spec_exe.clone(),
        };
        // One host's containers one after the other (an attach holds the
        // host's IPAM lock, a blocking file lock, across its awaits: two of
        // one host in one task would deadlock), hosts concurrently.
        let mut hosts: Vec<(LabNode, Vec<Planned>)> = Vec::new();
        for p in plan {
            match hosts.last_mut() {
                Some((n, ps)) if n.name == p.node => ps.push(p),
                _ => hosts.push((self.node(&p.node)?.clone(), vec![p])),
            }
        }
        let per_host: Vec<Vec<Result<LabContainer>>> = futures::stream::iter(hosts)
            .map(|(n, ps)| {
                let ctx = &ctx;
                async move {
                    let mut out = Vec::with_capacity(ps.len());
                    for p in ps {
                        let r = attach_one(ctx, &n, &p)
                            .await
                            .with_context(|| format!("attach container {} on {}", p.name, p.node));
                        let failed = r.is_err();
                        out.push(r);
                        if failed {
                            break;
                        }
                    }
                    out
                }
            })
            .buffered(PARALLEL_ATTACHES)
            .collect()
            .await;
        let results = per_host.into_iter().flatten();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(c) => self.info.containers.push(c),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.save()?;
        first_err.map_or(Ok(()), Err)
    }

    /// Attach every host's containers (etcd lab built without agents or
    /// containers: the cold-start bench), several at once.
    pub async fn attach_all_containers(&mut self) -> Result<()> {
        let nets = self.etcd()?.networks.clone();
        self.attach_everywhere(&nets, self.info.containers_per_node)
            .await
    }

    /// Create a container namespace on `node` and attach it to `network`.
    pub async fn add_container(
        &mut self,
        node: &str,
        network: &str,
        cname: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<LabContainer> {
        if self.info.runtime == Runtime::Docker {
            return self.docker_add(node, network, cname, ip).await;
        }
        let ctx = AttachCtx {
            lab: self.info.name.clone(),
            mode: self.attach,
            exe: self.spec_exe.clone(),
        };
        let n = self.node(node)?.clone();
        let p = Planned {
            node: node.to_string(),
            network: network.to_string(),
            name: cname.to_string(),
            ip,
        };
        let c = attach_one(&ctx, &n, &p).await?;
        self.info.containers.push(c.clone());
        self.save()?;
        Ok(c)
    }
}

/// Create `p`'s namespace on host `n` and attach it (library or CNI); on
/// failure its namespace is removed again.
async fn attach_one(ctx: &AttachCtx, n: &LabNode, p: &Planned) -> Result<LabContainer> {
    let ns_name = format!("vxm-{}-{}", ctx.lab, p.name);
    let cns = netns::create(&ns_name)?;
    let host_ns = Netns::open(&n.netns)?;
    let attached = match ctx.mode {
        AttachMode::Library => {
            let req = AttachRequest {
                state_dir: &n.state_dir,
                network: &p.network,
                container_id: &p.name,
                ifname: "eth0",
                host_ns: Some(&host_ns),
                container_ns: &cns,
                ip: p.ip,
                mtu: None,
            };
            attach::attach(&req)
                .await
                .map(|a| a.ip.addr())
                .map_err(anyhow::Error::from)
        }
        AttachMode::Cni => {
            cni_add(
                &ctx.exe,
                host_ns,
                &n.state_dir,
                &p.network,
                &p.name,
                &ns_name,
                p.ip,
            )
            .await
        }
    };
    let ip = match attached {
        Ok(ip) => ip,
        Err(e) => {
            let _ = netns::delete(&ns_name);
            return Err(e);
        }
    };
    Ok(LabContainer {
        name: p.name.clone(),
        node: p.node.clone(),
        network: p.network.clone(),
        netns: ns_name,
        ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_per_mode() {
        assert_eq!(container_name(Mode::Routed, "host3", 0, 2), "host3-c2");
        assert_eq!(container_name(Mode::Bridged, "host3", 1, 2), "host3-n2c2");
    }
}
