//! The cluster file, read without touching anything: `validate` checks it,
//! `plan` prints a node's desired state.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vxmesh::config;
use vxmesh::dataplane::plan::{PlanInput, plan};

#[derive(Args, Debug)]
pub struct ValidateArgs {
    #[arg(long)]
    cluster: PathBuf,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[arg(long)]
    cluster: PathBuf,
    #[arg(long)]
    node: String,
    /// Underlay MTU to assume for networks without an explicit MTU.
    #[arg(long, default_value_t = 1500)]
    underlay_mtu: u32,
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let c = config::load(&a.cluster)?;
    println!(
        "{}: {} network(s), {} node(s)",
        a.cluster.display(),
        c.networks.len(),
        c.nodes.len()
    );
    for n in &c.nodes {
        let subs: Vec<String> = n.subnets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {} {} {}", n.name, n.underlay_ip, subs.join(" "));
    }
    Ok(())
}

pub fn plan_node(a: PlanArgs) -> Result<()> {
    let c = config::load(&a.cluster)?;
    let p = plan(&PlanInput {
        cluster: &c,
        node: &a.node,
        endpoints: None,
        underlay_mtu: a.underlay_mtu,
    })?;
    println!("{}", serde_json::to_string_pretty(&p)?);
    Ok(())
}
