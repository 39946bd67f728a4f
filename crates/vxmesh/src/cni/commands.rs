//! The commands that act on one container or on the plugin's readiness:
//! ADD, DEL, CHECK and STATUS.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

use super::config::{NetConf, at_least_1_1, requested_ip};
use super::env::Env;
use super::error::{CniError, CniResult, Code};
use super::result::{AddResult, Dns, Interface, IpConfig, Route};
use crate::attach::{self, AttachRequest};
use crate::dataplane::kernel::Netlink;
use crate::dataplane::netns::Netns;
use crate::ipam::Ipam;
use crate::state;

/// The container's namespace, or error 3.
fn open_netns(path: &str) -> CniResult<Netns> {
    Netns::open_path(Path::new(path)).map_err(|e| {
        CniError::new(
            Code::UnknownContainer,
            format!("network namespace {path} does not exist"),
            format!("{e:#}"),
        )
    })
}

/// ADD: attach the container and report what was made.
pub(super) async fn add(env: &Env, conf: &NetConf) -> CniResult<Value> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let served = conf.served()?;
    let want_ip = requested_ip(env, conf)?;
    let ns = open_netns(netns_path)?;
    let a = attach::attach(&AttachRequest {
        state_dir: &conf.state_dir(),
        network: &served.state.network,
        container_id: id,
        ifname,
        host_ns: None,
        container_ns: &ns,
        ip: want_ip,
        mtu: conf.mtu,
    })
    .await
    .map_err(|e| CniError::io("attach failed", e))?;
    let gateway = a.gateway.map(IpAddr::V4);
    let result = AddResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: a.host_veth.clone(),
                mac: Some(host_mac(&a.host_veth).await.unwrap_or_default()),
                mtu: None,
                sandbox: None,
            },
            Interface {
                name: a.ifname.clone(),
                mac: Some(a.mac.to_string()),
                mtu: Some(a.mtu),
                sandbox: Some(netns_path.to_string()),
            },
        ],
        ips: vec![IpConfig {
            address: IpNet::V4(a.ip),
            gateway,
            interface: Some(1),
        }],
        routes: vec![Route {
            // The default route.
            dst: IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("prefix 0 is valid")),
            gw: gateway,
        }],
        dns: Dns::default(),
    };
    // Chained after another plugin: keep what it reported.
    Ok(result.to_json(conf.prev_result.as_ref()))
}

/// The MAC of a host-side interface (empty in the result if it cannot be read).
async fn host_mac(name: &str) -> Option<String> {
    let nl = Netlink::connect().await.ok()?;
    let links = nl.list_links().await.ok()?;
    links
        .into_iter()
        .find(|l| l.name == name)
        .and_then(|l| l.mac)
        .map(|m| m.to_string())
}

/// DEL: detach the container; repeating it succeeds.
pub(super) async fn del(env: &Env, conf: &NetConf) -> CniResult<()> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    // DEL must succeed even if the network is gone from the node's state.
    let net = conf.network()?;
    attach::detach(&conf.state_dir(), net, id, ifname, None)
        .await
        .map_err(|e| CniError::io("detach failed", e))?;
    Ok(())
}

/// CHECK: the container still holds its address, interface and routes as ADD reported.
pub(super) async fn check(env: &Env, conf: &NetConf) -> CniResult<()> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let served = conf.served()?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "CHECK needs prevResult",
            "the runtime must pass the ADD result",
        )
    })?;
    let ns = open_netns(netns_path)?;
    let fail = |m: String| CniError::new(Code::IoFailure, m, format!("container {id}"));
    // The allocation is still ours.
    let owner = crate::ipam::Owner {
        container_id: id.to_string(),
        ifname: ifname.to_string(),
    };
    let held = Ipam::new(&conf.state_dir(), &served.state.network)
        .find(&owner)
        .map_err(|e| CniError::io("read allocations", e))?;
    let held = held.ok_or_else(|| fail(format!("no address is allocated to {id}/{ifname}")))?;
    // The interface, its addresses and routes match prevResult.
    let nl = Netlink::connect_in(&ns)
        .await
        .map_err(|e| CniError::io("netlink in container", e))?;
    let facts = nl
        .interface_facts(ifname)
        .await
        .map_err(|e| CniError::io("inspect container interface", e))?;
    let facts =
        facts.ok_or_else(|| fail(format!("interface {ifname} is missing in {netns_path}")))?;
    if !facts.up {
        return Err(fail(format!("interface {ifname} is down")));
    }
    let want = prev_expectations(prev)?;
    for net in want.addresses {
        if net.addr() == held && !facts.addresses.contains(&net) {
            return Err(fail(format!("address {net} is missing on {ifname}")));
        }
    }
    for (dst, gw) in want.routes {
        if !facts
            .routes
            .iter()
            .any(|(d, g)| *d == dst && (gw.is_none() || *g == gw))
        {
            return Err(fail(format!("route {dst} is missing in the container")));
        }
    }
    Ok(())
}

/// What CHECK verifies from a prevResult: its IPv4 addresses and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrevExpectations {
    pub addresses: Vec<ipnet::Ipv4Net>,
    /// (destination, gateway if one is given and is IPv4).
    pub routes: Vec<(ipnet::Ipv4Net, Option<std::net::Ipv4Addr>)>,
}

/// Read a prevResult the way CHECK does: every `ips[].address` must be an
/// IPv4 CIDR (error 6 otherwise); routes that are not IPv4 are skipped.
pub fn prev_expectations(prev: &Value) -> CniResult<PrevExpectations> {
    let mut out = PrevExpectations::default();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let net: ipnet::Ipv4Net = addr.parse().map_err(|_| {
            CniError::new(
                Code::DecodeFailure,
                format!("bad address {addr} in prevResult"),
                "",
            )
        })?;
        out.addresses.push(net);
    }
    for r in prev
        .get("routes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let dst = r.get("dst").and_then(Value::as_str).unwrap_or_default();
        let gw = r
            .get("gw")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        let Ok(dst) = dst.parse::<ipnet::Ipv4Net>() else {
            continue;
        };
        out.routes.push((dst, gw));
    }
    Ok(out)
}

/// STATUS (spec 1.1): the network is served and its agent runs, or error 50.
pub(super) fn status(conf: &NetConf) -> CniResult<()> {
    if !at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "STATUS needs cniVersion 1.1.0",
            "",
        ));
    }
    let dir = conf.state_dir();
    conf.served()
        .map_err(|e| CniError::new(Code::NotAvailable, e.msg, e.details))?;
    if !state::agent_running(&dir) {
        return Err(CniError::new(
            Code::NotAvailable,
            "the vxmesh agent is not running",
            format!("no agent holds {}", dir.join("agent.lock").display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn check_reads_back_what_add_prints() {
        let printed = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name":"vxm-0123456789","mac":""},{"name":"eth0","sandbox":"/run/netns/c"}],
            "ips": [{"address":"172.18.10.2/24","gateway":"172.18.10.1","interface":1}],
            "routes": [{"dst":"0.0.0.0/0","gw":"172.18.10.1"},{"dst":"fd00::/8"}],
            "dns": {},
        });
        let typed: AddResult = serde_json::from_value(printed.clone()).unwrap();
        let want = prev_expectations(&typed.to_json(None)).unwrap();
        assert_eq!(want, prev_expectations(&printed).unwrap());
        assert_eq!(want.addresses, ["172.18.10.2/24".parse().unwrap()]);
        assert_eq!(
            want.routes,
            [(
                "0.0.0.0/0".parse().unwrap(),
                Some("172.18.10.1".parse().unwrap())
            )]
        );
        let bad = json!({"ips":[{"address":"fd00::2/64"}]});
        assert_eq!(
            prev_expectations(&bad).unwrap_err().code,
            Code::DecodeFailure
        );
    }
}
