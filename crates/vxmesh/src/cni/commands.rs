//! The commands that act on one container or on the plugin's readiness:
//! ADD, DEL, CHECK and STATUS.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

use super::config::{NetConf, at_least_1_1, requested_ip, requested_mac};
use super::env::Env;
use super::error::{CniError, CniResult, Code};
use super::result::{AddResult, Dns, Interface, IpConfig, Route, convert_result};
use crate::attach::{self, AttachOptions, AttachRequest};
use crate::config::Mode;
use crate::dataplane::kernel::Netlink;
use crate::dataplane::netns::Netns;
use crate::ipam::Ipam;
use crate::model::{self, Mac};
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

/// ADD: attach the container and report what was made, in the
/// configuration's version.
pub(super) async fn add(env: &Env, conf: &NetConf) -> CniResult<Value> {
    let id = env.require(&env.container_id, "CNI_CONTAINERID")?;
    let netns_path = env.require(&env.netns, "CNI_NETNS")?;
    let ifname = env.require(&env.ifname, "CNI_IFNAME")?;
    let served = conf.served()?;
    let want_ip = requested_ip(env, conf)?;
    let want_mac = requested_mac(env, conf)?;
    if let Some(mac) = want_mac {
        refuse_unpublishable_mac(served.state.mode, mac, want_ip)?;
    }
    let ns = open_netns(netns_path)?;
    let a = attach::attach_with(
        &AttachRequest {
            state_dir: &conf.state_dir(),
            network: &served.state.network,
            container_id: id,
            ifname,
            host_ns: None,
            container_ns: &ns,
            ip: want_ip,
            mtu: conf.mtu,
        },
        &AttachOptions {
            cni_network: Some(&conf.name),
            mac: want_mac,
        },
    )
    .await
    .map_err(|e| CniError::io("attach failed", e))?;
    tracing::info!(
        "attached {id}/{ifname} to {} as {} ({})",
        a.network,
        a.ip,
        a.host_veth
    );
    let gateway = a.gateway.map(IpAddr::V4);
    let result = AddResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: a.host_veth.clone(),
                mac: host_mac(&a.host_veth).await,
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
    let mut out = result.to_json(conf.prev_result.as_ref());
    convert_result(&mut out, &conf.cni_version);
    Ok(out)
}

/// A requested MAC in a bridged network must be the one derived from the
/// address: peers (the static store; etcd endpoint records) derive a
/// container's MAC from its IP, so another one could not be reached from
/// them. Error 7 instead of an unreachable container.
fn refuse_unpublishable_mac(mode: Mode, mac: Mac, ip: Option<Ipv4Addr>) -> CniResult<()> {
    if mode == Mode::Routed || ip.map(model::container_mac) == Some(mac) {
        return Ok(());
    }
    Err(CniError::new(
        Code::InvalidConfig,
        format!("MAC {mac} cannot be used in a bridged network"),
        match ip {
            Some(ip) => format!(
                "peers reach a bridged container at the MAC derived from its address: {} for {ip}",
                model::container_mac(ip)
            ),
            None => "peers reach a bridged container at the MAC derived from its address; request the address too, with that MAC (02:xx prefix + IPv4 bytes)".to_string(),
        },
    ))
}

/// The MAC of a host-side interface (left out of the result if it cannot be read).
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

/// CHECK: the agent runs, the container still holds its address,
/// interface and routes as ADD reported them, and its host veth is up on
/// the network's bridge. Entries of prevResult for other interfaces or
/// other address families (chained plugins) are not vxmesh's to check.
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
    let want = prev_expectations(prev, ifname)?;
    let dir = conf.state_dir();
    let fail = |m: String| CniError::new(Code::IoFailure, m, format!("container {id}"));
    let ns = open_netns(netns_path)?;
    // The allocation is still ours.
    let owner = crate::ipam::Owner {
        container_id: id.to_string(),
        ifname: ifname.to_string(),
    };
    let held = Ipam::new(&dir, &served.state.network)
        .find(&owner)
        .map_err(|e| CniError::io("read allocations", e))?;
    let held = held.ok_or_else(|| fail(format!("no address is allocated to {id}/{ifname}")))?;
    if !want.addresses.is_empty() && !want.addresses.iter().any(|n| n.addr() == held) {
        return Err(fail(format!(
            "prevResult does not list {held}, the address {id}/{ifname} holds"
        )));
    }
    // The host veth is up and a port of the network's bridge.
    let host_veth = attach::host_veth_name(&served.state.network, id, ifname);
    let host = Netlink::connect()
        .await
        .map_err(|e| CniError::io("netlink", e))?;
    let links = host
        .list_links()
        .await
        .map_err(|e| CniError::io("list links", e))?;
    let veth = links
        .iter()
        .find(|l| l.name == host_veth)
        .ok_or_else(|| fail(format!("host veth {host_veth} is missing")))?;
    let bridge = links
        .iter()
        .find(|l| l.name == served.state.bridge)
        .ok_or_else(|| fail(format!("bridge {} is missing", served.state.bridge)))?;
    if !veth.up {
        return Err(fail(format!("host veth {host_veth} is down")));
    }
    if veth.master != Some(bridge.index) {
        return Err(fail(format!(
            "host veth {host_veth} is not a port of {}",
            served.state.bridge
        )));
    }
    // The interface, its address and routes match prevResult.
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
    let ours: Vec<Ipv4Net> = want
        .addresses
        .iter()
        .copied()
        .filter(|n| n.addr() == held)
        .collect();
    for net in &ours {
        if !facts.addresses.contains(net) {
            return Err(fail(format!("address {net} is missing on {ifname}")));
        }
    }
    for (dst, gw) in want.routes {
        // Routes through a gateway outside our subnet belong to another interface.
        if let Some(g) = gw
            && !ours.iter().any(|n| n.contains(&g))
        {
            continue;
        }
        if !facts
            .routes
            .iter()
            .any(|(d, g)| *d == dst && (gw.is_none() || *g == gw))
        {
            return Err(fail(format!("route {dst} is missing in the container")));
        }
    }
    // Last: the agent that keeps the network's data plane true.
    if !state::agent_running(&dir) {
        return Err(fail(format!(
            "the vxmesh agent is not running (no agent holds {})",
            dir.join("agent.lock").display()
        )));
    }
    Ok(())
}

/// What CHECK verifies from a prevResult: the IPv4 addresses of the
/// container interface `ifname` and the IPv4 routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrevExpectations {
    pub addresses: Vec<ipnet::Ipv4Net>,
    /// (destination, gateway if one is given and is IPv4).
    pub routes: Vec<(ipnet::Ipv4Net, Option<std::net::Ipv4Addr>)>,
}

/// Read a prevResult the way CHECK does. An `ips[].address` that is no
/// CIDR at all is error 6; IPv6 addresses, and addresses of an interface
/// other than the container's `ifname`, are skipped (chained plugins add
/// them); routes that are not IPv4 are skipped.
pub fn prev_expectations(prev: &Value, ifname: &str) -> CniResult<PrevExpectations> {
    let list = |key: &str| -> Vec<Value> {
        prev.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let interfaces = list("interfaces");
    let mut out = PrevExpectations::default();
    for ip in list("ips") {
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let net: IpNet = addr.parse().map_err(|_| {
            CniError::new(
                Code::DecodeFailure,
                format!("bad address {addr} in prevResult"),
                "ips[].address must be a CIDR",
            )
        })?;
        let IpNet::V4(net) = net else { continue };
        let on_other = ip
            .get("interface")
            .and_then(Value::as_u64)
            .and_then(|i| interfaces.get(i as usize))
            .is_some_and(|i| {
                i.get("name").and_then(Value::as_str) != Some(ifname)
                    || i.get("sandbox").and_then(Value::as_str).is_none()
            });
        if !on_other {
            out.addresses.push(net);
        }
    }
    for r in list("routes") {
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
    // No `network` at all is a configuration error (7), not unavailability.
    conf.network()?;
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
        let want = prev_expectations(&typed.to_json(None), "eth0").unwrap();
        assert_eq!(want, prev_expectations(&printed, "eth0").unwrap());
        assert_eq!(want.addresses, ["172.18.10.2/24".parse().unwrap()]);
        assert_eq!(
            want.routes,
            [(
                "0.0.0.0/0".parse().unwrap(),
                Some("172.18.10.1".parse().unwrap())
            )]
        );
        let bad = json!({"ips":[{"address":"banana"}]});
        assert_eq!(
            prev_expectations(&bad, "eth0").unwrap_err().code,
            Code::DecodeFailure
        );
    }

    #[test]
    fn check_skips_other_families_and_interfaces() {
        // A dual-stack chain: an IPv6 address on eth0, another plugin's
        // net1 with an IPv4 address, ours last.
        let prev = json!({
            "interfaces": [{"name":"net1","sandbox":"/x"},{"name":"vxm-1"},{"name":"eth0","sandbox":"/x"}],
            "ips": [{"address":"fd00::2/64","interface":2},{"address":"10.99.0.2/24","interface":0},
                    {"address":"172.18.10.2/24","interface":2},{"address":"192.0.2.9/32"}],
            "routes": [{"dst":"::/0","gw":"fd00::1"},{"dst":"0.0.0.0/0","gw":"172.18.10.1"}],
        });
        let want = prev_expectations(&prev, "eth0").unwrap();
        assert_eq!(
            want.addresses,
            [
                "172.18.10.2/24".parse().unwrap(),
                "192.0.2.9/32".parse().unwrap()
            ]
        );
        assert_eq!(want.routes.len(), 1);
    }

    #[test]
    fn a_requested_mac_is_refused_only_where_peers_cannot_reach_it() {
        let mac: Mac = "02:00:00:00:00:42".parse().unwrap();
        let ip: Ipv4Addr = "10.1.0.9".parse().unwrap();
        assert!(refuse_unpublishable_mac(Mode::Routed, mac, None).is_ok());
        let e = refuse_unpublishable_mac(Mode::Bridged, mac, Some(ip)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(
            e.details.contains(&model::container_mac(ip).to_string()),
            "{}",
            e.details
        );
        assert!(
            refuse_unpublishable_mac(Mode::Bridged, model::container_mac(ip), Some(ip)).is_ok()
        );
        assert!(refuse_unpublishable_mac(Mode::Bridged, mac, None).is_err());
    }
}
