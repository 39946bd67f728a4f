//! The IpamDriver side: pools are vxmesh networks (the node's subnet in
//! routed mode, the network's range in bridged mode), addresses come from
//! the network's allocator, the one CNI and `vxmesh attach` use.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use super::error::DockerError;
use super::protocol::{
    Empty, GATEWAY_REQUEST, NETWORK_OPTION, PoolRequest, REQUEST_ADDRESS_TYPE,
    ReleaseAddressRequest, RequestAddressRequest, RequestAddressResponse, RequestPoolRequest,
    RequestPoolResponse,
};
use super::{Plugin, Result, is_docker_owner, network_of_pool, parse_ipv4, parse_subnet, pool_id};
use crate::config::Mode;
use crate::ipam::Ipam;
use crate::state;
use crate::store::{AddressAllocator, Allocator};

impl Plugin {
    /// RequestPool: the vxmesh network named by `--ipam-opt vxmesh.network`,
    /// or whose subnet `--subnet` gives, or the only one served.
    pub(super) async fn request_pool(
        &self,
        req: RequestPoolRequest,
    ) -> Result<RequestPoolResponse> {
        if req.v6 {
            return Err(DockerError::Ipv6);
        }
        if !req.sub_pool.is_empty() {
            return Err(DockerError::SubPool {
                sub_pool: req.sub_pool,
            });
        }
        let mut named = None;
        for (k, v) in req.options.iter().flatten() {
            if k == NETWORK_OPTION {
                named = Some(v.as_str());
            } else {
                return Err(DockerError::UnknownOption { key: k.clone() });
            }
        }
        let requested = match req.pool.as_str() {
            "" => None,
            p => Some(parse_subnet(p, " (--subnet)")?),
        };
        let served = self.resolve(named, requested)?;
        // Docker re-asks for a pool without --subnet as long as a route of
        // its host covers it (forever: the node's bridge route always does).
        if requested.is_none() && served.state.mode == Mode::Routed {
            return Err(DockerError::RoutedNeedsSubnet {
                network: served.state.network.clone(),
                subnet: served.state.subnet,
            });
        }
        if let Some(r) = requested
            && r != served.state.subnet
        {
            return Err(DockerError::SubnetMismatch {
                requested: r.to_string(),
                network: served.state.network.clone(),
                what: subnet_kind(served.state.mode),
                subnet: served.state.subnet,
            });
        }
        Ok(RequestPoolResponse {
            pool_id: pool_id(&served.state.network),
            pool: served.state.subnet.to_string(),
            data: BTreeMap::new(),
        })
    }

    /// ReleasePool: nothing is held per pool.
    pub(super) async fn release_pool(&self, req: PoolRequest) -> Result<Empty> {
        network_of_pool(&req.pool_id)?;
        Ok(Empty {})
    }

    /// RequestAddress: the gateway (routed: the node's bridge address;
    /// bridged: the segment has none, Docker is given the subnet's network
    /// address, which no container can get and nothing plumbs), or a
    /// container's address claimed for a pending owner.
    pub(super) async fn request_address(
        &self,
        req: RequestAddressRequest,
    ) -> Result<RequestAddressResponse> {
        let network = network_of_pool(&req.pool_id)?;
        let served = state::read_network(&self.state_dir, network)?;
        let net = &served.state;
        let prefix = net.subnet.prefix_len();
        let want = match req.address.as_str() {
            "" => None,
            a => Some(parse_ipv4(a, " (--ip)")?),
        };
        let gateway_request = req
            .options
            .as_ref()
            .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
            .is_some_and(|t| t == GATEWAY_REQUEST);
        let ip = if gateway_request {
            match (net.gateway, want) {
                (Some(gw), Some(w)) if w != gw => {
                    return Err(DockerError::GatewayMismatch {
                        requested: w,
                        network: net.network.clone(),
                        gateway: gw,
                    });
                }
                (Some(gw), _) => gw,
                _ => net.subnet.network(),
            }
        } else {
            let owner = self.pending_owner();
            Allocator::for_network(&self.state_dir, &served, None)
                .claim(&owner, want)
                .await?
        };
        Ok(RequestAddressResponse {
            address: Ipv4Net::new(ip, prefix).expect("valid prefix").to_string(),
            data: BTreeMap::new(),
        })
    }

    /// ReleaseAddress: give back an address a Docker endpoint (or a pending
    /// request) holds; an address nobody holds, or a CNI container holds,
    /// is left as it is (the gateway, a repeated release).
    pub(super) async fn release_address(&self, req: ReleaseAddressRequest) -> Result<Empty> {
        let network = network_of_pool(&req.pool_id)?;
        let ip = parse_ipv4(&req.address, "")?;
        let ipam = Ipam::new(&self.state_dir, network);
        let Some(holder) = ipam.holder(ip)? else {
            return Ok(Empty {});
        };
        if !is_docker_owner(&holder) {
            tracing::warn!(
                "ReleaseAddress {ip} of {network}: held by {}/{}, not a Docker endpoint: left as is",
                holder.container_id,
                holder.ifname
            );
            return Ok(Empty {});
        }
        match state::read_network(&self.state_dir, network) {
            Ok(served) => {
                Allocator::for_network(&self.state_dir, &served, None)
                    .release(&holder)
                    .await?;
            }
            // The network is gone from this node: only the file is left.
            Err(_) => {
                ipam.release(&holder)?;
            }
        }
        Ok(Empty {})
    }
}

/// How a mode's subnet reads in messages.
pub(super) fn subnet_kind(mode: Mode) -> &'static str {
    match mode {
        Mode::Routed => "subnet on this node",
        Mode::Bridged => "subnet",
    }
}
