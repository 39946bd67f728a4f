//! The NetworkDriver side: a Docker network is a vxmesh network the node
//! serves (remembered in `STATE/docker/networks/ID.json`), an endpoint is
//! an address of its allocator, Join plumbs the host side as CNI ADD does.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::DockerError;
use super::ipam::subnet_kind;
use super::protocol::{
    ADDRESS_SPACE, CreateEndpointRequest, CreateEndpointResponse, CreateNetworkRequest,
    ENABLE_IPV6, Empty, EndpointInterface, EndpointRequest, GENERIC_OPTIONS, InterfaceName,
    JoinResponse, NETWORK_OPTION, NetworkRequest, ROUTE_CONNECTED, StaticRoute,
};
use super::{DOCKER_IFNAME, Plugin, Result, endpoint_owner, is_pending, parse_ipv4, parse_subnet};
use crate::attach;
use crate::config::Mode;
use crate::ipam::Ipam;
use crate::model;
use crate::state::{self, ServedNetwork};
use crate::store::{AddressAllocator, Allocator};

/// What the plugin remembers of a Docker network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetwork {
    /// The vxmesh network it is.
    pub network: String,
}

impl Plugin {
    fn network_file(&self, docker_id: &str) -> PathBuf {
        self.state_dir
            .join("docker")
            .join("networks")
            .join(format!("{docker_id}.json"))
    }

    /// The vxmesh network of a Docker network, as CreateNetwork recorded it.
    pub(super) fn docker_network(&self, docker_id: &str) -> Result<ServedNetwork> {
        let path = self.network_file(docker_id);
        let unknown = || DockerError::UnknownNetwork {
            docker_network: docker_id.to_string(),
            path: path.display().to_string(),
        };
        let data = std::fs::read(&path).map_err(|_| unknown())?;
        let rec: DockerNetwork = serde_json::from_slice(&data).map_err(|_| unknown())?;
        Ok(state::read_network(&self.state_dir, &rec.network)?)
    }

    /// CreateNetwork: check the options and the pool against the vxmesh
    /// network, then remember which one it is. Nothing else is made: the
    /// agent has made the network already.
    pub(super) async fn create_network(&self, req: CreateNetworkRequest) -> Result<Empty> {
        let options = req.options.unwrap_or_default();
        if options.get(ENABLE_IPV6).and_then(Value::as_bool) == Some(true)
            || req.ipv6_data.as_ref().is_some_and(|d| !d.is_empty())
        {
            return Err(DockerError::Ipv6);
        }
        let named = driver_options(options.get(GENERIC_OPTIONS))?;
        let data = req.ipv4_data.unwrap_or_default();
        let Some(v4) = data.first() else {
            return Err(DockerError::ForeignAddressSpace {
                docker_network: req.network_id,
                space: "(none)".into(),
            });
        };
        if v4.address_space != ADDRESS_SPACE {
            return Err(DockerError::ForeignAddressSpace {
                docker_network: req.network_id,
                space: v4.address_space.clone(),
            });
        }
        let pool = parse_subnet(&v4.pool, " (the network's pool)")?;
        let served = match &named {
            Some(n) => {
                let served = state::read_network(&self.state_dir, n)?;
                if served.state.subnet != pool {
                    // Which vxmesh network the IPAM gave this pool from.
                    return Err(match self.resolve(None, Some(pool)) {
                        Ok(other) => DockerError::PoolOfOtherNetwork {
                            docker_network: req.network_id,
                            driver: n.clone(),
                            ipam: other.state.network,
                            pool: pool.to_string(),
                        },
                        Err(_) => DockerError::SubnetMismatch {
                            requested: pool.to_string(),
                            network: n.clone(),
                            what: subnet_kind(served.state.mode),
                            subnet: served.state.subnet,
                        },
                    });
                }
                served
            }
            None => self.resolve(None, Some(pool))?,
        };
        let path = self.network_file(&req.network_id);
        let rec = DockerNetwork {
            network: served.state.network.clone(),
        };
        let json = serde_json::to_vec(&rec).expect("a network record is plain JSON");
        state::write_atomic(&path, &json)?;
        tracing::info!(
            "Docker network {} is vxmesh network {}",
            req.network_id,
            rec.network
        );
        Ok(Empty {})
    }

    /// DeleteNetwork: forget it (the vxmesh network stays, the agent's).
    pub(super) async fn delete_network(&self, req: NetworkRequest) -> Result<Empty> {
        let path = self.network_file(&req.network_id);
        match std::fs::remove_file(&path) {
            Err(io) if io.kind() != std::io::ErrorKind::NotFound => Err(DockerError::Io {
                step: "remove",
                path: path.display().to_string(),
                io,
            }),
            _ => Ok(Empty {}),
        }
    }

    /// CreateEndpoint: the address Docker got from the IPAM becomes the
    /// endpoint's; the MAC is the one vxmesh derives from it.
    pub(super) async fn create_endpoint(
        &self,
        req: CreateEndpointRequest,
    ) -> Result<CreateEndpointResponse> {
        let served = self.docker_network(&req.network_id)?;
        let net = &served.state;
        let iface = req.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err(DockerError::Ipv6);
        }
        let owner = endpoint_owner(&req.endpoint_id);
        if iface.address.is_empty() {
            return Err(DockerError::NoAddress {
                endpoint: req.endpoint_id,
                network: net.network.clone(),
            });
        }
        let ip = parse_ipv4(&iface.address, " (the endpoint's address)")?;
        let derived = model::container_mac(ip);
        if !iface.mac_address.is_empty()
            && net.mode == Mode::Bridged
            && iface.mac_address.parse::<model::Mac>().ok() != Some(derived)
        {
            return Err(DockerError::MacMismatch {
                requested: iface.mac_address,
                network: net.network.clone(),
                ip,
                derived: derived.to_string(),
            });
        }
        let ipam = Ipam::new(&self.state_dir, &net.network);
        let lock = ipam.lock()?;
        match ipam.holder(ip)? {
            Some(h) if h == owner => {}
            Some(h) if is_pending(&h) => ipam.reassign(&lock, ip, &owner)?,
            Some(h) => {
                return Err(DockerError::HeldByOther {
                    endpoint: req.endpoint_id,
                    network: net.network.clone(),
                    ip,
                    holder: format!("{}/{}", h.container_id, h.ifname),
                });
            }
            None => {
                // The pending claim is gone (a state dir wiped under
                // Docker): claim the address again for the endpoint.
                drop(lock);
                Allocator::for_network(&self.state_dir, &served, None)
                    .claim(&owner, Some(ip))
                    .await?;
            }
        }
        let interface = iface.mac_address.is_empty().then(|| EndpointInterface {
            mac_address: derived.to_string(),
            ..Default::default()
        });
        Ok(CreateEndpointResponse { interface })
    }

    /// DeleteEndpoint: the veth goes if Leave left it; the address stays
    /// until Docker's IPAM ReleaseAddress.
    pub(super) async fn delete_endpoint(&self, req: EndpointRequest) -> Result<Empty> {
        self.leave(req).await
    }

    /// Join: a veth pair in the node's namespace, its host end on the
    /// network's bridge; Docker moves the other end into the container and
    /// addresses it. Routed: the gateway is the node's bridge address.
    /// Bridged: the segment has no gateway, the default route is on-link.
    pub(super) async fn join(&self, req: EndpointRequest) -> Result<JoinResponse> {
        let served = self.docker_network(&req.network_id)?;
        let net = &served.state;
        let owner = endpoint_owner(&req.endpoint_id);
        let ip = Ipam::new(&self.state_dir, &net.network)
            .find(&owner)?
            .ok_or_else(|| DockerError::NoAddress {
                endpoint: req.endpoint_id.clone(),
                network: net.network.clone(),
            })?;
        let peer = container_end_name(&net.network, &req.endpoint_id);
        attach::plumb_host_pair(
            net,
            &owner.container_id,
            DOCKER_IFNAME,
            &peer,
            model::container_mac(ip),
            None,
        )
        .await?;
        // Docker programs ports only through an endpoint with a gateway:
        // refuse rather than start a container whose -p does nothing.
        let has_bindings = !super::ports::port_bindings(req.options.as_ref())?.is_empty();
        let (gateway, static_routes) = match net.gateway {
            // Routed, or bridged with a distributed gateway: via the bridge.
            Some(gw) => (gw.to_string(), Vec::new()),
            _ => (
                String::new(),
                vec![StaticRoute {
                    destination: "0.0.0.0/0".into(),
                    route_type: ROUTE_CONNECTED,
                    next_hop: String::new(),
                }],
            ),
        };
        if has_bindings && gateway.is_empty() {
            let _ = attach::unplumb(&net.network, &owner.container_id, DOCKER_IFNAME, None).await;
            return Err(DockerError::PortsNeedGateway {
                network: net.network.clone(),
            });
        }
        Ok(JoinResponse {
            interface_name: InterfaceName {
                src_name: peer,
                dst_prefix: "eth".into(),
            },
            gateway,
            static_routes,
            disable_gateway_service: true,
        })
    }

    /// Leave: unpublish the endpoint's ports, delete the host veth (the
    /// container end goes with it).
    pub(super) async fn leave(&self, req: EndpointRequest) -> Result<Empty> {
        self.unpublish_endpoint(&req.network_id, &req.endpoint_id)?;
        let network = match self.docker_network(&req.network_id) {
            Ok(s) => s.state.network,
            // A network this node no longer serves has no bridge either; its
            // veths went with the agent's teardown or go with the container.
            Err(_) => return Ok(Empty {}),
        };
        let owner = endpoint_owner(&req.endpoint_id);
        attach::unplumb(&network, &owner.container_id, DOCKER_IFNAME, None).await?;
        Ok(Empty {})
    }
}

/// The name of the container end while it is still in the node's namespace:
/// `vxd` + the host end's hash (not `vxm-`: the reconciler owns that prefix).
pub fn container_end_name(network: &str, endpoint_id: &str) -> String {
    let owner = endpoint_owner(endpoint_id);
    let host = attach::host_veth_name(network, &owner.container_id, DOCKER_IFNAME);
    format!("vxd{}", &host[model::DEVICE_PREFIX.len()..])
}

/// The vxmesh network `-o vxmesh.network=NAME` names; other options that
/// are not Docker's own are refused.
fn driver_options(generic: Option<&Value>) -> Result<Option<String>> {
    let Some(map) = generic.and_then(Value::as_object) else {
        return Ok(None);
    };
    let mut named = None;
    for (k, v) in map {
        if k == NETWORK_OPTION {
            let text = v.as_str().ok_or_else(|| DockerError::OptionNotText {
                key: k.clone(),
                value: v.to_string(),
            })?;
            named = Some(text.to_string());
        } else if !k.starts_with("com.docker.") {
            return Err(DockerError::UnknownOption { key: k.clone() });
        }
    }
    Ok(named)
}
