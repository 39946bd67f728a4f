//! `vxmesh leave`: remove a node's records from etcd networks at once, unless
//! its agent still runs here.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vxmesh::state::DEFAULT_STATE_DIR;
use vxmesh::store::etcd;

use super::EtcdArgs;

#[derive(Args, Debug)]
pub struct LeaveArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[arg(
        long = "network",
        value_name = "NAME",
        value_delimiter = ',',
        required = true
    )]
    networks: Vec<String>,
    #[arg(long)]
    node: String,
    /// Refuse if an agent serving this node runs with this state dir.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

pub async fn run(a: LeaveArgs) -> Result<()> {
    let login = a.etcd.login();
    let client = login.client()?;
    vxmesh::leave::ensure_agent_stopped(&a.state_dir, &a.node)?;
    let node = &a.node;
    for net in &a.networks {
        if etcd::leave_node(&client, &login.prefix(), net, node).await? {
            println!("node {node} left network {net}");
        } else {
            println!("node {node} has no record in network {net} (already gone)");
        }
    }
    Ok(())
}
