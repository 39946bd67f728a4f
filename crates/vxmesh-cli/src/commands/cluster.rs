//! The cluster file, read without touching anything: `validate` checks it
//! (or an agent configuration file), `plan` prints a node's desired state.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use vxmesh::config;
use vxmesh::dataplane::plan::{PlanInput, plan};

#[derive(Args, Debug)]
#[group(id = "what", required = true, multiple = true)]
pub struct ValidateArgs {
    /// A cluster file: print the resolved cluster.
    #[arg(long, value_name = "FILE", group = "what")]
    cluster: Option<PathBuf>,
    /// An agent configuration file: every problem with its key, then its
    /// store opened as the agent would (nothing is contacted or started).
    #[arg(long, value_name = "FILE", group = "what")]
    agent_config: Option<PathBuf>,
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
    if let Some(file) = &a.cluster {
        validate_cluster(file)?;
    }
    if let Some(file) = &a.agent_config {
        super::agent::check_file(file)?;
    }
    Ok(())
}

fn validate_cluster(file: &Path) -> Result<()> {
    let c = config::load(file)?;
    println!(
        "{}: {} network(s), {} node(s)",
        file.display(),
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
        vxlan_filter: true,
    })?;
    println!("{}", serde_json::to_string_pretty(&p)?);
    Ok(())
}
