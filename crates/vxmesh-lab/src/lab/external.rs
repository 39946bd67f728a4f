//! The lab's outside world: a namespace `vxm-LAB-out` standing for the
//! internet (the host [`OUTSIDE_IP`]) behind a router on the underlay
//! ([`ROUTER_IP`], the underlay namespace itself), with no route to any
//! container subnet; every lab host routes [`OUTSIDE_NET`] through the
//! router. `lab check --external` probes it from every container, and every
//! published port from it ([`Lab::check_external`]).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::{self, Netns};

use super::{Lab, LabNode};
use crate::probe::{self, Responder, tcp_hello};

/// The outside host (TEST-NET-3: never a real destination).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outside network the lab hosts route to the router.
pub const OUTSIDE_NET: &str = "203.0.113.0/24";
/// The router's address on the outside link.
const ROUTER_OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// The router's address on the underlay (the underlay bridge; the lab's own
/// address in etcd labs, see `LAB_CONTROL_IP`).
pub const ROUTER_IP: Ipv4Addr = super::LAB_CONTROL_IP;
/// The port the outside host's responder listens on.
pub const OUTSIDE_PORT: u16 = 8081;
/// The underlay range (every lab host, up to `MAX_HOST`), the only thing
/// the outside host routes back to.
fn underlay_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 18, 0, 0), super::UNDERLAY_PREFIX)
        .expect("a valid prefix")
        .trunc()
}

/// A port `lab up --publish HOST:CONTAINER` published for one container:
/// the k-th container of a node (from 0) gets host port `HOST + k`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabPublished {
    pub container: String,
    pub node: String,
    pub host_port: u16,
    pub container_port: u16,
}

/// Parse `--publish HOST:CONTAINER` (TCP ports, 1-65535 each).
pub fn parse_publish(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str, what: &str| match p.parse::<u16>() {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(format!(
            "'{s}': {what} port '{p}' is not a port 1-65535 (write HOST:CONTAINER, e.g. 8080:80)"
        )),
    };
    let (h, c) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not HOST:CONTAINER (e.g. 8080:80)"))?;
    Ok((port(h, "host")?, port(c, "container")?))
}

/// The name of a lab's outside namespace.
pub fn outside_ns(lab: &str) -> String {
    format!("vxm-{lab}-out")
}

/// Host ports of `--publish HOST:CONTAINER` for a node's containers, in order.
pub fn host_ports(base: u16, containers: usize) -> Result<Vec<u16>> {
    (0..containers)
        .map(|k| {
            u16::try_from(base as usize + k).ok().with_context(|| {
                format!("--publish {base}: host port {base} + {k} is above 65535: use a lower one")
            })
        })
        .collect()
}

impl Lab {
    /// Build the outside namespace, the router and a route to it on every host.
    pub(super) async fn build_external(&mut self, ul_nl: &Netlink) -> Result<()> {
        let name = outside_ns(&self.info.name);
        let out = netns::create(&name)?;
        ul_nl
            .create_veth("p-out", "eth0", Some(&out), 1500)
            .await
            .context("the outside world's link")?;
        ul_nl
            .set_link("p-out", up())
            .await
            .context("the router's outside link")?;
        ul_nl
            .add_address("br-ul", Ipv4Net::new(ROUTER_IP, 24)?)
            .await
            .context("the router's underlay address")?;
        ul_nl
            .add_address("p-out", Ipv4Net::new(ROUTER_OUTSIDE_IP, 24)?)
            .await?;
        let ul = Netns::open(&self.info.underlay_ns)?;
        ul.run(|| vxmesh::dataplane::sysctl::set_ip_forward(true).map_err(anyhow::Error::from))
            .context("ip_forward in the underlay namespace (the router)")?;
        let o = Netlink::connect_in(&out).await?;
        o.set_link("lo", up()).await?;
        o.set_link("eth0", up()).await?;
        o.add_address("eth0", Ipv4Net::new(OUTSIDE_IP, 24)?).await?;
        // Only the underlay is reachable from outside: never a container subnet.
        o.add_route(
            underlay_cidr(),
            Some(ROUTER_OUTSIDE_IP),
            "eth0",
            false,
            None,
        )
        .await
        .context("the outside host's route to the underlay")?;
        self.info.external = true;
        for n in self.info.nodes.clone() {
            route_to_outside(&n).await?;
        }
        Ok(())
    }

    /// Probe the outside world: from every container ICMP and TCP to the
    /// outside host, and from the outside host every published port on its
    /// node's underlay address (it must answer as that container).
    pub fn check_external(&self, timeout: Duration) -> Result<ExternalReport> {
        if !self.info.external {
            bail!(
                "lab '{}' has no outside world: build it with `vxmesh lab up --external`",
                self.info.name
            );
        }
        let out = Netns::open(&outside_ns(&self.info.name))?;
        let _outside =
            Responder::start(&out, SocketAddrV4::new(OUTSIDE_IP, OUTSIDE_PORT), "outside")?;
        let mut responders = Vec::new();
        for p in &self.info.published {
            let c = self.container(&p.container)?;
            let ns = Netns::open(&c.netns)?;
            responders.push(Responder::start(
                &ns,
                SocketAddrV4::new(c.ip, p.container_port),
                &c.name,
            )?);
        }
        let jobs: Vec<probe::PairJob> = self
            .info
            .containers
            .iter()
            .map(|c| probe::PairJob {
                src_ns: c.netns.clone(),
                src_label: c.name.clone(),
                dst: OUTSIDE_IP,
                dst_label: "outside".into(),
                expect_reach: true,
            })
            .collect();
        let mut probes: Vec<ExternalProbe> = probe::probe_pairs(&jobs, timeout)
            .into_iter()
            .map(|r| ExternalProbe {
                what: format!("{} -> {OUTSIDE_IP} icmp", r.src_label),
                ok: r.ok(),
                detail: (!r.ok()).then(|| r.to_string()),
            })
            .collect();
        for c in &self.info.containers {
            let ns = Netns::open(&c.netns)?;
            let dst = SocketAddrV4::new(OUTSIDE_IP, OUTSIDE_PORT);
            probes.push(tcp_probe(
                format!("{} -> {dst} tcp", c.name),
                tcp_hello(&ns, dst, timeout),
                "outside",
            ));
        }
        for p in &self.info.published {
            let node = self.node(&p.node)?;
            let dst = SocketAddrV4::new(node.underlay_ip, p.host_port);
            probes.push(tcp_probe(
                format!("outside -> {dst} (published {})", p.container),
                tcp_hello(&out, dst, timeout),
                &p.container,
            ));
        }
        Ok(ExternalReport { probes })
    }

    /// `--publish HOST:CONTAINER`: publish CONTAINER (TCP) of every
    /// container through the product's port records, the k-th container of
    /// a node on host port HOST + k.
    pub(super) async fn publish_all(&mut self, host: u16, container: u16) -> Result<()> {
        for n in self.info.nodes.clone() {
            let cs: Vec<_> = self
                .info
                .containers
                .iter()
                .filter(|c| c.node == n.name)
                .cloned()
                .collect();
            for (c, port) in cs.iter().zip(host_ports(host, cs.len())?) {
                let owner = vxmesh::ipam::Owner {
                    container_id: c.name.clone(),
                    ifname: "eth0".into(),
                };
                let req = vxmesh::ports::PortRequest::single(
                    vxmesh::dataplane::PortProto::Tcp,
                    port,
                    container,
                );
                vxmesh::ports::publish(&n.state_dir, &c.network, &owner, c.ip, &[req])
                    .with_context(|| format!("publish {port}:{container} of {}", c.name))?;
                self.info.published.push(LabPublished {
                    container: c.name.clone(),
                    node: n.name.clone(),
                    host_port: port,
                    container_port: container,
                });
            }
        }
        for n in &self.info.nodes {
            let want: Vec<u16> = self
                .info
                .published
                .iter()
                .filter(|p| p.node == n.name)
                .map(|p| p.host_port)
                .collect();
            wait_ports_applied(n, &want, Duration::from_secs(10)).await?;
        }
        Ok(())
    }
}

/// Wait until the agent of `n` has applied a plan publishing every host
/// port of `want` (its saved plan, `STATE/plan.json`, is written after the
/// pass that applied it).
async fn wait_ports_applied(n: &LabNode, want: &[u16], timeout: Duration) -> Result<()> {
    let path = n.state_dir.join(vxmesh::status::PLAN_FILE);
    let t0 = std::time::Instant::now();
    loop {
        let applied: Vec<u16> = std::fs::read(&path)
            .ok()
            .and_then(|d| serde_json::from_slice::<vxmesh::status::SavedPlan>(&d).ok())
            .map(|s| s.plan.ports.iter().map(|p| p.host_port).collect())
            .unwrap_or_default();
        if want.iter().all(|p| applied.contains(p)) {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            bail!(
                "{}: the agent has not applied the published ports {want:?} after {timeout:?} (applied: {applied:?}); see {}",
                n.name,
                n.agent_log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The route of a lab host to the outside network, through the router.
pub(super) async fn route_to_outside(n: &LabNode) -> Result<()> {
    let nl = Netlink::connect_in(&Netns::open(&n.netns)?).await?;
    nl.add_route(OUTSIDE_NET.parse()?, Some(ROUTER_IP), "eth0", false, None)
        .await
        .with_context(|| format!("{}: route to the outside world", n.name))
}

fn up() -> LinkOptions {
    LinkOptions {
        up: Some(true),
        ..Default::default()
    }
}

fn tcp_probe(what: String, got: Result<String>, want: &str) -> ExternalProbe {
    let detail = match got {
        Ok(who) if who == want => None,
        Ok(who) => Some(format!("answered by '{who}', not '{want}'")),
        Err(e) => Some(format!("{e:#}")),
    };
    ExternalProbe {
        what,
        ok: detail.is_none(),
        detail,
    }
}

/// One probe of `lab check --external`.
#[derive(Clone, Debug, Serialize)]
pub struct ExternalProbe {
    pub what: String,
    pub ok: bool,
    pub detail: Option<String>,
}

/// The outcome of `lab check --external`.
#[derive(Clone, Debug, Serialize)]
pub struct ExternalReport {
    pub probes: Vec<ExternalProbe>,
}

impl ExternalReport {
    pub fn failures(&self) -> Vec<&ExternalProbe> {
        self.probes.iter().filter(|p| !p.ok).collect()
    }

    /// One line per probe: `ok` or `MISS` and why.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.probes {
            match &p.detail {
                None => s += &format!("ok    {}\n", p.what),
                Some(d) => s += &format!("MISS  {}: {d}\n", p.what),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_count_up_and_stop_at_the_top() {
        assert_eq!(host_ports(8080, 3).unwrap(), vec![8080, 8081, 8082]);
        let e = host_ports(65535, 2).unwrap_err().to_string();
        assert!(e.contains("65535"), "{e}");
    }

    #[test]
    fn publish_parses_host_and_container() {
        assert_eq!(parse_publish("8080:80"), Ok((8080, 80)));
        for bad in ["8080", "0:80", "8080:x", "70000:80"] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_wrong_answer_is_a_miss() {
        let p = tcp_probe("x".into(), Ok("host2-c1".into()), "host1-c1");
        assert!(!p.ok && p.detail.unwrap().contains("host2-c1"));
        assert!(tcp_probe("x".into(), Ok("outside".into()), "outside").ok);
    }
}
