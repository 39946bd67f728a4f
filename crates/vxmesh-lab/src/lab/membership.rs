//! Hosts joining and leaving a running etcd lab, and containers moving
//! between hosts (bridged networks keep their addresses).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::{Lab, LabContainer};
use vxmesh::attach::{self, AttachRequest};
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::store::etcd;

impl Lab {
    /// Add a host to an etcd lab: namespace, underlay link and address
    /// (`hostN`, 198.18.0.N, N one more than the highest so far). Its agent
    /// is not started yet ([`Lab::start_agent`]); [`Lab::add_node`] does it all.
    pub async fn add_host(&mut self) -> Result<String> {
        self.etcd()?;
        let next = self
            .info
            .nodes
            .iter()
            .filter_map(|n| {
                n.name
                    .strip_prefix("host")
                    .and_then(|i| i.parse::<usize>().ok())
            })
            .max()
            .unwrap_or(0)
            + 1;
        let ul = Netns::open(&self.info.underlay_ns)?;
        let ul_nl = Netlink::connect_in(&ul).await?;
        let node = self.create_host(&ul_nl, next, BTreeMap::new()).await?;
        self.pin_underlay(std::slice::from_ref(&node)).await?;
        self.save()?;
        Ok(node)
    }

    /// Attach a host's containers like every other host's.
    pub async fn attach_node_containers(&mut self, node: &str) -> Result<()> {
        let nets = self.etcd()?.networks.clone();
        self.attach_containers(node, &nets, self.info.containers_per_node)
            .await?;
        self.save()
    }

    /// A new host joins the running lab: namespace, agent (it claims a
    /// subnet in etcd and every peer learns it from the watch), containers.
    pub async fn add_node(&mut self) -> Result<String> {
        let node = self.add_host().await?;
        self.start_agent(&node)?;
        self.wait_agent_ready(&node, Duration::from_secs(30))
            .await?;
        self.attach_node_containers(&node).await?;
        Ok(node)
    }

    /// A host leaves the lab. Graceful: its agent gets SIGTERM and the node
    /// then leaves (its lease is revoked), so peers drop it at once. With
    /// `crash`: `kill -9`, nothing withdrawn: peers drop it when its lease
    /// expires. Either way the host and its containers are gone afterwards.
    pub async fn remove_node(&mut self, node: &str, crash: bool) -> Result<()> {
        let networks = self.etcd()?.networks.clone();
        let n = self.node(node)?.clone();
        if crash {
            self.stop_agent_async(node, Signal::SIGKILL).await?;
        } else {
            self.stop_agent_async(node, Signal::SIGTERM).await?;
            let name = node.to_string();
            self.in_underlay(move |co| async move {
                for net in &networks {
                    etcd::leave_node(&co, etcd::DEFAULT_PREFIX, net, &name).await?;
                }
                Ok(())
            })
            .await
            .with_context(|| format!("{node} leaves the network(s)"))?;
        }
        let mut problems = Vec::new();
        // The underlay port would go with the host's namespace, but the
        // kernel dismantles namespaces asynchronously: delete the veth now, so
        // a host added right after can reuse the name.
        let port = format!("p-{node}");
        let ul_nl = Netlink::connect_in(&Netns::open(&self.info.underlay_ns)?).await?;
        if ul_nl.get_link(&port).await?.is_some()
            && let Err(e) = ul_nl.delete_link(&port).await
        {
            problems.push(format!("delete underlay port {port}: {e:#}"));
        }
        for c in self.info.containers.iter().filter(|c| c.node == node) {
            if let Err(e) = netns::delete(&c.netns) {
                problems.push(format!("delete {}: {e:#}", c.netns));
            }
        }
        if let Err(e) = netns::delete(&n.netns) {
            problems.push(format!("delete {}: {e:#}", n.netns));
        }
        // Its state too: a host added later under the same name must not
        // look ready before its own agent has published anything.
        if n.state_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&n.state_dir)
        {
            problems.push(format!("remove {}: {e}", n.state_dir.display()));
        }
        self.info.containers.retain(|c| c.node != node);
        self.info.nodes.retain(|x| x.name != node);
        self.save()?;
        if !problems.is_empty() {
            bail!("remove {node}: {}", problems.join("; "));
        }
        Ok(())
    }

    /// Detach a container and delete its namespace.
    pub async fn remove_container(&mut self, cname: &str) -> Result<()> {
        let c = self.container(cname)?;
        if self.info.runtime == super::Runtime::Docker {
            return self.docker_remove(&c);
        }
        let n = self.node(&c.node)?.clone();
        let host_ns = Netns::open(&n.netns)?;
        attach::detach(&n.state_dir, &c.network, cname, "eth0", Some(&host_ns)).await?;
        netns::delete(&c.netns)?;
        self.info.containers.retain(|x| x.name != cname);
        self.save()
    }

    /// Move a container to another host: detach it where it is, attach the
    /// same namespace on `to` asking for the same address (bridged networks
    /// keep it; the etcd store lets it move once released).
    /// With Docker, the container is removed on its host and run anew on
    /// `to` with the same name and `--ip`.
    pub async fn move_container(&mut self, cname: &str, to: &str) -> Result<LabContainer> {
        let c = self.container(cname)?;
        if self.info.runtime == super::Runtime::Docker {
            self.docker_remove(&c)?;
            return self.docker_add(to, &c.network, cname, Some(c.ip)).await;
        }
        let from = self.node(&c.node)?.clone();
        let dest = self.node(to)?.clone();
        attach::detach(
            &from.state_dir,
            &c.network,
            cname,
            "eth0",
            Some(&Netns::open(&from.netns)?),
        )
        .await?;
        let cns = Netns::open(&c.netns)?;
        let host_ns = Netns::open(&dest.netns)?;
        let a = attach::attach(&AttachRequest {
            state_dir: &dest.state_dir,
            network: &c.network,
            container_id: cname,
            ifname: "eth0",
            host_ns: Some(&host_ns),
            container_ns: &cns,
            ip: Some(c.ip),
            mtu: None,
        })
        .await?;
        let moved = LabContainer {
            node: to.to_string(),
            ip: a.ip.addr(),
            ..c
        };
        for x in self.info.containers.iter_mut().filter(|x| x.name == cname) {
            *x = moved.clone();
        }
        self.save()?;
        Ok(moved)
    }

    pub(crate) fn container(&self, cname: &str) -> Result<LabContainer> {
        self.info
            .containers
            .iter()
            .find(|c| c.name == cname)
            .cloned()
            .with_context(|| format!("lab '{}' has no container '{cname}'", self.info.name))
    }
}
