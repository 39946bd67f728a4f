//! The Docker remote network and IPAM plugin (`vxmesh docker-plugin`): one
//! process answering Docker's legacy v1 plugin protocol for both the
//! NetworkDriver and the IpamDriver, local scope, no swarm.
//!
//! It serves the networks the node's agent serves (read from the agent's
//! state dir, as the CNI plugin does) through the same allocator and the
//! same veth, alias and MAC as CNI and `vxmesh attach`. Docker asks for an
//! address (IPAM) before the endpoint exists, so an address is first held
//! by a pending owner and handed to the endpoint (`docker:ENDPOINT_ID`) at
//! CreateEndpoint. Everything the plugin needs lives on disk (the IPAM
//! files and `STATE/docker/networks/ID.json`, the Docker network to vxmesh
//! network map), so it can be restarted at any time.
//!
//! The module by idea: [`protocol`] (the JSON), [`error`], `network` (the
//! NetworkDriver handlers), [`ports`] (Docker `-p`: published ports),
//! `ipam` (the IpamDriver handlers) and [`server`] (HTTP over a unix
//! socket or TCP).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::Ipv4Net;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub mod error;
mod ipam;
pub mod network;
pub mod ports;
pub mod protocol;
pub mod server;

pub use error::DockerError;

use crate::ipam::Owner;
use crate::state::{self, ServedNetwork};

type Result<T, E = DockerError> = std::result::Result<T, E>;

/// The interface name recorded for Docker endpoints (Docker names the
/// container's interface itself, `eth0`, `eth1`, ... in join order).
pub const DOCKER_IFNAME: &str = "eth0";

/// Owners of Docker-held addresses start with this.
pub const DOCKER_OWNER_PREFIX: &str = "docker:";

/// The owner of an endpoint's address (and the container id of its veth alias).
pub fn endpoint_owner(endpoint_id: &str) -> Owner {
    Owner {
        container_id: format!("{DOCKER_OWNER_PREFIX}{endpoint_id}"),
        ifname: DOCKER_IFNAME.to_string(),
    }
}

/// Is this an address Docker holds (an endpoint's or a pending one)?
pub fn is_docker_owner(owner: &Owner) -> bool {
    owner.container_id.starts_with(DOCKER_OWNER_PREFIX)
}

fn is_pending(owner: &Owner) -> bool {
    owner
        .container_id
        .starts_with(&format!("{DOCKER_OWNER_PREFIX}pending:"))
}

/// The plugin's pool id of a vxmesh network.
pub fn pool_id(network: &str) -> String {
    format!("vxmesh/{network}")
}

fn network_of_pool(pool_id: &str) -> Result<&str> {
    pool_id
        .strip_prefix("vxmesh/")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| DockerError::ForeignPool {
            pool_id: pool_id.to_string(),
        })
}

/// What a handler answers: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn ok(body: impl Serialize) -> Reply {
        Reply {
            status: 200,
            body: serde_json::to_value(body).expect("plugin replies are plain JSON"),
        }
    }

    /// Docker reads a NetworkDriver failure from `Err`, an IPAM one from `Error`.
    fn error(e: &DockerError, ipam: bool) -> Reply {
        let key = if ipam { "Error" } else { "Err" };
        Reply {
            status: 200,
            body: json!({ key: e.message() }),
        }
    }

    fn not_found(path: &str) -> Reply {
        Reply {
            status: 404,
            body: json!({ "Err": format!("{path}: not implemented by vxmesh") }),
        }
    }
}

/// The plugin: the agent's state dir and a counter that makes pending
/// owners unique.
pub struct Plugin {
    state_dir: PathBuf,
    pending: AtomicU64,
}

impl Plugin {
    pub fn new(state_dir: &Path) -> Plugin {
        Plugin {
            state_dir: state_dir.to_path_buf(),
            pending: AtomicU64::new(0),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Answer one request: `path` is Docker's `/Group.Method`.
    pub async fn handle(&self, path: &str, body: &[u8]) -> Reply {
        let ipam = path.starts_with("/IpamDriver.");
        let result = match path {
            "/Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
            "/NetworkDriver.GetCapabilities" => {
                Ok(json!({ "Scope": "local", "ConnectivityScope": "local" }))
            }
            "/NetworkDriver.CreateNetwork" => self.run(path, body, Self::create_network).await,
            "/NetworkDriver.DeleteNetwork" => self.run(path, body, Self::delete_network).await,
            "/NetworkDriver.CreateEndpoint" => self.run(path, body, Self::create_endpoint).await,
            "/NetworkDriver.DeleteEndpoint" => self.run(path, body, Self::delete_endpoint).await,
            "/NetworkDriver.Join" => self.run(path, body, Self::join).await,
            "/NetworkDriver.Leave" => self.run(path, body, Self::leave).await,
            "/NetworkDriver.EndpointOperInfo" => Ok(json!({ "Value": {} })),
            "/NetworkDriver.ProgramExternalConnectivity" => {
                self.run(path, body, Self::program_external_connectivity)
                    .await
            }
            "/NetworkDriver.RevokeExternalConnectivity" => {
                self.run(path, body, Self::revoke_external_connectivity)
                    .await
            }
            "/NetworkDriver.DiscoverNew" | "/NetworkDriver.DiscoverDelete" => Ok(json!({})),
            "/IpamDriver.GetCapabilities" => Ok(json!({
                "RequiresMACAddress": false,
                "RequiresRequestReplay": false,
            })),
            "/IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": protocol::ADDRESS_SPACE,
                "GlobalDefaultAddressSpace": protocol::ADDRESS_SPACE,
            })),
            "/IpamDriver.RequestPool" => self.run(path, body, Self::request_pool).await,
            "/IpamDriver.ReleasePool" => self.run(path, body, Self::release_pool).await,
            "/IpamDriver.RequestAddress" => self.run(path, body, Self::request_address).await,
            "/IpamDriver.ReleaseAddress" => self.run(path, body, Self::release_address).await,
            _ => return Reply::not_found(path),
        };
        match result {
            Ok(v) => Reply::ok(v),
            Err(e) => {
                tracing::warn!("{path}: {}", e.message());
                Reply::error(&e, ipam)
            }
        }
    }

    /// Decode the request, run the handler, encode its answer.
    async fn run<'s, Req, Resp, F, Fut>(&'s self, path: &str, body: &[u8], f: F) -> Result<Value>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: FnOnce(&'s Plugin, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp>>,
    {
        // Docker sends an empty body for requests without arguments.
        let body = if body.is_empty() {
            b"{}".as_slice()
        } else {
            body
        };
        let req = serde_json::from_slice(body).map_err(|error| DockerError::Decode {
            endpoint: path.trim_start_matches('/').to_string(),
            error,
        })?;
        let resp = f(self, req).await?;
        Ok(serde_json::to_value(resp).expect("plugin replies are plain JSON"))
    }

    /// The vxmesh network a Docker request means: the one `named`, else
    /// the one whose subnet is `subnet`, else the only one served.
    fn resolve(&self, named: Option<&str>, subnet: Option<Ipv4Net>) -> Result<ServedNetwork> {
        if let Some(n) = named {
            return Ok(state::read_network(&self.state_dir, n)?);
        }
        let served: Vec<ServedNetwork> = state::list_networks(&self.state_dir)
            .iter()
            .filter_map(|n| state::read_network(&self.state_dir, n).ok())
            .collect();
        let names = || {
            served
                .iter()
                .map(|s| s.state.network.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if served.is_empty() {
            return Err(DockerError::NoneServed {
                state_dir: self.state_dir.display().to_string(),
            });
        }
        let matching: Vec<&ServedNetwork> = match subnet {
            Some(s) => served.iter().filter(|n| n.state.subnet == s).collect(),
            None => served.iter().collect(),
        };
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(DockerError::NoSuchSubnet {
                requested: subnet.map(|s| s.to_string()).unwrap_or_default(),
                served: names(),
            }),
            _ => Err(DockerError::Ambiguous { served: names() }),
        }
    }

    /// A fresh pending owner for an address Docker asked for.
    fn pending_owner(&self) -> Owner {
        let n = self.pending.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Owner {
            container_id: format!(
                "{DOCKER_OWNER_PREFIX}pending:{}-{nanos:x}-{n}",
                std::process::id()
            ),
            ifname: DOCKER_IFNAME.to_string(),
        }
    }
}

/// Parse `A.B.C.D` or `A.B.C.D/LEN` (Docker's addresses come both ways).
fn parse_ipv4(text: &str, context: &str) -> Result<Ipv4Addr> {
    text.split('/')
        .next()
        .unwrap_or(text)
        .parse()
        .map_err(|_| DockerError::BadAddress {
            text: text.to_string(),
            context: context.to_string(),
        })
}

fn parse_subnet(text: &str, context: &str) -> Result<Ipv4Net> {
    text.parse::<Ipv4Net>()
        .map(|n| n.trunc())
        .map_err(|_| DockerError::BadAddress {
            text: text.to_string(),
            context: context.to_string(),
        })
}

#[cfg(test)]
mod tests;
