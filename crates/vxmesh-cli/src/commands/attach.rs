//! `attach` and `detach`: a network namespace joins or leaves a network as
//! a container, through the same code the CNI plugin runs.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use vxmesh::attach::{self, AttachRequest};
use vxmesh::dataplane::netns::Netns;
use vxmesh::ipam::Owner;
use vxmesh::ports::{self, PortRequest};
use vxmesh::state::DEFAULT_STATE_DIR;

#[derive(Args, Debug)]
pub struct AttachArgs {
    #[arg(long)]
    network: String,
    /// The container's network namespace: a name under /run/netns or a path.
    #[arg(long = "container-netns")]
    container_netns: String,
    /// Container id (default: the namespace name).
    #[arg(long)]
    id: Option<String>,
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// Ask for this address.
    #[arg(long)]
    ip: Option<Ipv4Addr>,
    /// Publish a port on the node's addresses: HOST:CONTAINER[/tcp|/udp]
    /// (tcp by default; repeatable). Removed by `vxmesh detach`.
    #[arg(long = "publish", value_name = "HOST:CONTAINER[/PROTO]")]
    publish: Vec<PortRequest>,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    #[arg(long)]
    network: String,
    #[arg(long)]
    id: String,
    #[arg(long, default_value = "eth0")]
    ifname: String,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

pub async fn attach(a: AttachArgs) -> Result<()> {
    let ns = if a.container_netns.contains('/') {
        Netns::open_path(Path::new(&a.container_netns))?
    } else {
        Netns::open(&a.container_netns)?
    };
    let id = a.id.unwrap_or_else(|| {
        a.container_netns
            .rsplit('/')
            .next()
            .unwrap_or(&a.container_netns)
            .to_string()
    });
    let attached = attach::attach(&AttachRequest {
        state_dir: &a.state_dir,
        network: &a.network,
        container_id: &id,
        ifname: &a.ifname,
        host_ns: None,
        container_ns: &ns,
        ip: a.ip,
        mtu: None,
    })
    .await?;
    if !a.publish.is_empty() {
        let owner = Owner {
            container_id: id.clone(),
            ifname: a.ifname.clone(),
        };
        let ip = attached.ip.addr();
        if let Err(e) = ports::publish(&a.state_dir, &a.network, &owner, ip, &a.publish) {
            // Nothing half-applied: the attachment goes again.
            attach::detach(&a.state_dir, &a.network, &id, &a.ifname, None).await?;
            return Err(e.into());
        }
    }
    println!("{}", serde_json::to_string_pretty(&attached)?);
    Ok(())
}

pub async fn detach(a: DetachArgs) -> Result<()> {
    match attach::detach(&a.state_dir, &a.network, &a.id, &a.ifname, None).await? {
        Some(ip) => println!("detached {} ({ip})", a.id),
        None => println!("{} was not attached", a.id),
    }
    Ok(())
}
