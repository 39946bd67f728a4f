//! The JSON of Docker's remote (v1) plugin protocols: plugin activation,
//! the NetworkDriver and the IpamDriver. Field names are Docker's
//! (PascalCase); unknown fields are ignored, as Docker adds some over time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The content type Docker sends and expects.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// The address space vxmesh's IPAM answers (Docker shows it in `network inspect`).
pub const ADDRESS_SPACE: &str = "vxmesh";

/// `Options` key of IPAM address requests saying what the address is for.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
/// ... and its value for a network's gateway.
pub const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

/// `Options` key under which `docker network create -o K=V` options arrive.
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";
/// `Options` key of `--ipv6`.
pub const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
/// The option naming the vxmesh network (driver `-o` and IPAM `--ipam-opt`).
pub const NETWORK_OPTION: &str = "vxmesh.network";

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivateResponse {
    pub implements: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CapabilitiesResponse {
    pub scope: String,
    pub connectivity_scope: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamData {
    #[serde(default)]
    pub address_space: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub gateway: String,
    #[serde(default)]
    pub aux_addresses: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, Value>>,
    #[serde(default, rename = "IPv4Data")]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(default, rename = "IPv6Data")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInterface {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(
        default,
        rename = "AddressIPv6",
        skip_serializing_if = "String::is_empty"
    )]
    pub address_ipv6: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub interface: Option<EndpointInterface>,
    #[serde(default)]
    pub options: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointResponse {
    /// Only what Docker did not give (a field set on both sides is an error).
    pub interface: Option<EndpointInterface>,
}

/// Join, Leave, DeleteEndpoint and EndpointOperInfo name an endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub sandbox_key: String,
    /// Join: the sandbox's options (port bindings among them).
    #[serde(default)]
    pub options: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: String,
}

/// Route types of Join's `StaticRoutes`.
pub const ROUTE_NEXTHOP: u8 = 0;
pub const ROUTE_CONNECTED: u8 = 1;

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StaticRoute {
    pub destination: String,
    pub route_type: u8,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub next_hop: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinResponse {
    pub interface_name: InterfaceName,
    pub gateway: String,
    pub static_routes: Vec<StaticRoute>,
    pub disable_gateway_service: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamCapabilitiesResponse {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    pub requires_request_replay: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressSpacesResponse {
    pub local_default_address_space: String,
    pub global_default_address_space: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPoolRequest {
    #[serde(default)]
    pub address_space: String,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub sub_pool: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub pool: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PoolRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddressResponse {
    pub address: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReleaseAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
}

/// The empty answer `{}` of requests with nothing to report.
#[derive(Debug, Serialize)]
pub struct Empty {}

/// Options key of Join and ProgramExternalConnectivity with the container's
/// port bindings (`docker run -p`): a list of [`PortBinding`].
pub const PORT_MAP: &str = "com.docker.network.portmap";
/// Options key with the container's exposed ports (`EXPOSE`, `--expose`):
/// a list of `{Proto, Port}`; informational, nothing is published for them.
pub const EXPOSED_PORTS: &str = "com.docker.network.endpoint.exposedports";

/// IANA protocol numbers Docker uses in `Proto`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// One port binding as Docker sends it: container port `Port` published on
/// `HostIP` (empty: every address), host port `HostPort`, or any port of
/// `HostPort..=HostPortEnd` (a range, `-p 8080-8090:80`); `HostPort` 0
/// asks the driver to choose (`-p 80`, `-P`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortBinding {
    #[serde(default)]
    pub proto: u8,
    #[serde(default, rename = "IP")]
    pub ip: Option<String>,
    #[serde(default)]
    pub port: u16,
    #[serde(default, rename = "HostIP")]
    pub host_ip: Option<String>,
    #[serde(default)]
    pub host_port: u16,
    #[serde(default)]
    pub host_port_end: u16,
}

/// ProgramExternalConnectivity (with the sandbox's options) and
/// RevokeExternalConnectivity (without).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExternalConnectivityRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default)]
    pub options: Option<BTreeMap<String, Value>>,
}
