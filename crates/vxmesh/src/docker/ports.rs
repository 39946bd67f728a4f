//! Docker `-p`: the port bindings Docker hands a remote driver (the
//! sandbox's options in Join and ProgramExternalConnectivity) become the
//! endpoint's published-port records ([`crate::ports`]), removed at
//! RevokeExternalConnectivity, Leave and DeleteEndpoint.
//!
//! Docker calls ProgramExternalConnectivity only on the endpoint that gives
//! the container its default gateway (routed networks; a bridged network
//! has none unless it has a gateway), so that is where ports are published.
//! Docker does not read back what a remote driver mapped (`docker port`
//! shows nothing): vxmesh publishes exactly the host ports asked for, a
//! range's first free one, and refuses `-p CONTAINER`/`-P` (a port of the
//! driver's choosing nobody could find) with the fix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::Value;

use super::error::DockerError;
use super::protocol::{
    Empty, ExternalConnectivityRequest, PORT_MAP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PortBinding,
};
use super::{Plugin, Result, endpoint_owner};
use crate::dataplane::PortProto;
use crate::ipam::Ipam;
use crate::ports::{self, PortRequest};

/// The port bindings of a request's options (none: no `-p`).
pub fn port_bindings(options: Option<&BTreeMap<String, Value>>) -> Result<Vec<PortBinding>> {
    match options.and_then(|o| o.get(PORT_MAP)) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|error| DockerError::BadPortMap {
            value: v.to_string(),
            error,
        }),
    }
}

/// What vxmesh publishes for `bindings`. `is_local` says whether an address
/// is this node's. Every binding is checked before anything is published.
pub fn port_requests(
    bindings: &[PortBinding],
    is_local: impl Fn(IpAddr) -> bool,
) -> Result<Vec<PortRequest>> {
    let mut out = BTreeSet::new();
    for b in bindings {
        let proto = match b.proto {
            PROTO_TCP => PortProto::Tcp,
            PROTO_UDP => PortProto::Udp,
            other => {
                return Err(DockerError::PortProtocol {
                    port: b.port,
                    proto: match other {
                        PROTO_SCTP => "sctp".to_string(),
                        n => format!("number {n}"),
                    },
                });
            }
        };
        if let Some(text) = b.host_ip.as_deref().filter(|t| !t.is_empty()) {
            let ip: IpAddr = text.parse().map_err(|_| DockerError::BadAddress {
                text: text.to_string(),
                context: format!(" (the host address of -p {text}:...:{})", b.port),
            })?;
            if !ip.is_unspecified() {
                return Err(if is_local(ip) {
                    DockerError::PortOnOneAddress {
                        ip,
                        port: b.port,
                        host_port: b.host_port,
                    }
                } else {
                    DockerError::PortAddressNotLocal {
                        ip,
                        port: b.port,
                        host_port: b.host_port,
                    }
                });
            }
        }
        if b.host_port == 0 {
            return Err(DockerError::PortChosenByDriver {
                port: b.port,
                proto,
            });
        }
        out.insert(PortRequest {
            proto,
            host_first: b.host_port,
            host_last: b.host_port_end.max(b.host_port),
            container_port: b.port,
        });
    }
    Ok(out.into_iter().collect())
}

/// Is `ip` an address of an interface of this node (the plugin's namespace)?
fn is_node_address(ip: IpAddr) -> bool {
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            let Some(s) = a.address else { return false };
            match ip {
                IpAddr::V4(v4) => s.as_sockaddr_in().is_some_and(|x| x.ip() == v4),
                IpAddr::V6(v6) => s.as_sockaddr_in6().is_some_and(|x| x.ip() == v6),
            }
        })
    })
}

impl Plugin {
    /// ProgramExternalConnectivity: publish the sandbox's port bindings for
    /// the endpoint (replacing what it had; none: unpublish).
    pub(super) async fn program_external_connectivity(
        &self,
        req: ExternalConnectivityRequest,
    ) -> Result<Empty> {
        let served = self.docker_network(&req.network_id)?;
        let net = &served.state;
        let requests = port_requests(&port_bindings(req.options.as_ref())?, is_node_address)?;
        let owner = endpoint_owner(&req.endpoint_id);
        if requests.is_empty() {
            ports::unpublish(&self.state_dir, &net.network, &owner)?;
            return Ok(Empty {});
        }
        let ip = Ipam::new(&self.state_dir, &net.network)
            .find(&owner)?
            .ok_or_else(|| DockerError::NoAddress {
                endpoint: req.endpoint_id.clone(),
                network: net.network.clone(),
            })?;
        let published = ports::publish(&self.state_dir, &net.network, &owner, ip, &requests)?;
        tracing::info!(
            "endpoint {} ({ip}) of network {}: published {published:?}",
            req.endpoint_id,
            net.network
        );
        Ok(Empty {})
    }

    /// RevokeExternalConnectivity: unpublish the endpoint's ports.
    pub(super) async fn revoke_external_connectivity(
        &self,
        req: ExternalConnectivityRequest,
    ) -> Result<Empty> {
        self.unpublish_endpoint(&req.network_id, &req.endpoint_id)?;
        Ok(Empty {})
    }

    /// Remove the endpoint's published ports (Leave, DeleteEndpoint and
    /// Revoke all do; nothing published is fine, so is an unknown network).
    pub(super) fn unpublish_endpoint(&self, docker_network: &str, endpoint_id: &str) -> Result<()> {
        let Ok(served) = self.docker_network(docker_network) else {
            return Ok(());
        };
        ports::unpublish(
            &self.state_dir,
            &served.state.network,
            &endpoint_owner(endpoint_id),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bindings(v: Value) -> Result<Vec<PortBinding>> {
        let opts: BTreeMap<String, Value> = [(PORT_MAP.to_string(), v)].into();
        port_bindings(Some(&opts))
    }

    fn requests(v: Value) -> Result<Vec<PortRequest>> {
        port_requests(&bindings(v)?, |ip| {
            ip == "10.0.0.1".parse::<IpAddr>().unwrap()
        })
    }

    fn err(v: Value) -> String {
        requests(v).unwrap_err().message()
    }

    /// What dockerd 20.10 sends for `-p 8080:80 -p 5353:53/udp -p
    /// 0.0.0.0:9000-9002:90` (the container address is not known yet).
    #[test]
    fn docker_bindings_become_requests() {
        let got = requests(json!([
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
            {"Proto": 17, "IP": "", "Port": 53, "HostIP": "", "HostPort": 5353, "HostPortEnd": 5353},
            {"Proto": 6, "IP": "", "Port": 90, "HostIP": "0.0.0.0", "HostPort": 9000, "HostPortEnd": 9002},
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "::", "HostPort": 8080, "HostPortEnd": 8080},
        ]))
        .unwrap();
        assert_eq!(
            got,
            vec![
                PortRequest::single(PortProto::Tcp, 8080, 80),
                PortRequest {
                    proto: PortProto::Tcp,
                    host_first: 9000,
                    host_last: 9002,
                    container_port: 90
                },
                PortRequest::single(PortProto::Udp, 5353, 53),
            ]
        );
        // No -p: nothing; exposed ports alone publish nothing.
        assert!(port_bindings(None).unwrap().is_empty());
        let opts: BTreeMap<String, Value> = [(
            "com.docker.network.endpoint.exposedports".to_string(),
            json!([{"Proto": 6, "Port": 80}]),
        )]
        .into();
        assert!(port_bindings(Some(&opts)).unwrap().is_empty());
        assert!(bindings(Value::Null).unwrap().is_empty());
    }

    #[test]
    fn unsupported_bindings_are_clear_errors() {
        let e = err(json!([{"Proto": 6, "Port": 80, "HostPort": 0}]));
        assert!(e.contains("-p 80/tcp") && e.contains("-p HOST:80"), "{e}");
        let e = err(json!([{"Proto": 132, "Port": 80, "HostPort": 80}]));
        assert!(e.contains("sctp") && e.contains("tcp and udp"), "{e}");
        let e = err(json!([{"Proto": 6, "Port": 80, "HostIP": "192.0.2.7", "HostPort": 8080}]));
        assert!(
            e.contains("192.0.2.7 is not an address of this node"),
            "{e}"
        );
        let e = err(json!([{"Proto": 6, "Port": 80, "HostIP": "10.0.0.1", "HostPort": 8080}]));
        assert!(
            e.contains("every address of the node") && e.contains("-p 8080:80"),
            "{e}"
        );
        let e = err(json!([{"Proto": 6, "Port": 80, "HostIP": "nonsense", "HostPort": 8080}]));
        assert!(e.contains("'nonsense' is not an IPv4 address"), "{e}");
        let e = err(json!({"not": "a list"}));
        assert!(e.contains(PORT_MAP), "{e}");
    }
}
