//! What the Docker plugin answers when a request cannot be served: every
//! message names the Docker object and the vxmesh network, and says what to
//! change.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{endpoint}: cannot decode the request: {error}")]
    Decode {
        endpoint: String,
        error: serde_json::Error,
    },
    #[error(
        "no vxmesh network is served on this node (no state files in {state_dir}/networks): start `vxmesh agent --state-dir {state_dir}` first"
    )]
    NoneServed { state_dir: String },
    #[error(
        "this node serves several vxmesh networks ({served}): name one with -o vxmesh.network=NAME (and --ipam-opt vxmesh.network=NAME)"
    )]
    Ambiguous { served: String },
    #[error(transparent)]
    NotServed(Box<crate::state::StateError>),
    #[error(
        "--subnet {requested} contradicts vxmesh network '{network}', whose {what} is {subnet}: leave --subnet out or give {subnet}"
    )]
    SubnetMismatch {
        requested: String,
        network: String,
        what: &'static str,
        subnet: Ipv4Net,
    },
    #[error(
        "no vxmesh network served here has subnet {requested} (served: {served}): name the network with --ipam-opt vxmesh.network=NAME"
    )]
    NoSuchSubnet { requested: String, served: String },
    #[error(
        "Docker network {docker_network} uses address space '{space}', not vxmesh's: create it with --ipam-driver set to this plugin, so vxmesh allocates its addresses"
    )]
    ForeignAddressSpace {
        docker_network: String,
        space: String,
    },
    #[error(
        "Docker network {docker_network}: -o vxmesh.network={driver} but its pool is {pool} of vxmesh network '{ipam}': give the same network to -o and --ipam-opt vxmesh.network"
    )]
    PoolOfOtherNetwork {
        docker_network: String,
        driver: String,
        ipam: String,
        pool: String,
    },
    #[error(
        "vxmesh network '{network}' is routed: give this node's subnet, --subnet {subnet} (Docker refuses a pool without --subnet that a route of the host covers, and the node's bridge route does)"
    )]
    RoutedNeedsSubnet { network: String, subnet: Ipv4Net },
    #[error("vxmesh networks are IPv4 only: create the Docker network without --ipv6")]
    Ipv6,
    #[error(
        "--ip-range {sub_pool} is not supported: vxmesh allocates from the network's own range"
    )]
    SubPool { sub_pool: String },
    #[error("unknown option {key}: vxmesh understands vxmesh.network=NAME")]
    UnknownOption { key: String },
    #[error("option {key} must be a string, not {value}")]
    OptionNotText { key: String, value: String },
    #[error("'{pool_id}' is not a pool of vxmesh's IPAM (expected vxmesh/NETWORK)")]
    ForeignPool { pool_id: String },
    #[error("'{text}' is not an IPv4 address{context}")]
    BadAddress { text: String, context: String },
    #[error(
        "--gateway {requested} contradicts vxmesh network '{network}', whose gateway on this node is {gateway}: leave --gateway out"
    )]
    GatewayMismatch {
        requested: Ipv4Addr,
        network: String,
        gateway: Ipv4Addr,
    },
    #[error(
        "--mac-address {requested} is not possible on vxmesh network '{network}' (bridged): the container at {ip} must have MAC {derived}, which peers derive from its address; leave --mac-address out"
    )]
    MacMismatch {
        requested: String,
        network: String,
        ip: Ipv4Addr,
        derived: String,
    },
    #[error(
        "Docker network {docker_network} is unknown to this vxmesh plugin (no {path}): re-create it with `docker network create -d ...`"
    )]
    UnknownNetwork {
        docker_network: String,
        path: String,
    },
    #[error(
        "endpoint {endpoint} of vxmesh network '{network}' holds no address: was it created through vxmesh's IPAM (--ipam-driver)?"
    )]
    NoAddress { endpoint: String, network: String },
    #[error(
        "endpoint {endpoint}: address {ip} of vxmesh network '{network}' is held by {holder}, not by a Docker endpoint"
    )]
    HeldByOther {
        endpoint: String,
        network: String,
        ip: Ipv4Addr,
        holder: String,
    },
    #[error("cannot decode {key} {value}: {error}", key = super::protocol::PORT_MAP)]
    BadPortMap {
        value: String,
        error: serde_json::Error,
    },
    #[error("-p ...:{port}/{proto}: vxmesh publishes tcp and udp ports only")]
    PortProtocol { port: u16, proto: String },
    #[error(
        "-p {port}/{proto} (or -P): vxmesh does not choose host ports, as Docker cannot show the port a network plugin chose: give the host port, -p HOST:{port}/{proto}"
    )]
    PortChosenByDriver {
        port: u16,
        proto: crate::dataplane::PortProto,
    },
    #[error(
        "-p {ip}:{host_port}:{port}: {ip} is not an address of this node: leave the address out (-p {host_port}:{port}) to publish on every address of the node"
    )]
    PortAddressNotLocal {
        ip: std::net::IpAddr,
        port: u16,
        host_port: u16,
    },
    #[error(
        "-p {ip}:{host_port}:{port}: vxmesh publishes a port on every address of the node, not on one: leave the address out (-p {host_port}:{port})"
    )]
    PortOnOneAddress {
        ip: std::net::IpAddr,
        port: u16,
        host_port: u16,
    },
    #[error(
        "-p on vxmesh network '{network}': Docker publishes ports only through the network that gives the container its default gateway, and this bridged network has none: give the network a gateway (`gateway = true`), or connect the container to a routed vxmesh network"
    )]
    PortsNeedGateway { network: String },
    #[error(transparent)]
    Ports(Box<crate::ports::PortError>),
    #[error("{step} {path}: {io}")]
    Io {
        step: &'static str,
        path: String,
        io: std::io::Error,
    },
    #[error(transparent)]
    Store(Box<crate::store::error::StoreError>),
    #[error(transparent)]
    Attach(Box<crate::attach::AttachError>),
}

impl From<crate::state::StateError> for DockerError {
    fn from(e: crate::state::StateError) -> Self {
        DockerError::NotServed(Box::new(e))
    }
}

impl From<crate::store::error::StoreError> for DockerError {
    fn from(e: crate::store::error::StoreError) -> Self {
        DockerError::Store(Box::new(e))
    }
}

impl From<crate::ports::PortError> for DockerError {
    fn from(e: crate::ports::PortError) -> Self {
        DockerError::Ports(Box::new(e))
    }
}

impl From<crate::attach::AttachError> for DockerError {
    fn from(e: crate::attach::AttachError) -> Self {
        DockerError::Attach(Box::new(e))
    }
}

impl DockerError {
    /// The message Docker shows the user: the whole chain of causes.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            src = s.source();
        }
        msg
    }
}
