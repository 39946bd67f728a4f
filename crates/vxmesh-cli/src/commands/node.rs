//! This node's own state: `down` removes what vxmesh owns, `status` shows
//! it, `doctor` walks the packet path to the peers.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use vxmesh::state::DEFAULT_STATE_DIR;

#[derive(Args, Debug)]
pub struct DownArgs {
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// A container IP on a remote node.
    #[arg(long)]
    to: Option<Ipv4Addr>,
    /// Skip the ICMP echo to each peer's underlay IP.
    #[arg(long)]
    no_ping: bool,
    #[arg(long)]
    json: bool,
}

pub async fn down(a: DownArgs) -> Result<()> {
    let report = vxmesh::teardown::down(&a.state_dir).await?;
    print!("{}", vxmesh::teardown::render(&report));
    vxmesh::teardown::check_complete(&report)?;
    Ok(())
}

pub async fn status(a: StatusArgs) -> Result<()> {
    let r = vxmesh::status::status(&a.state_dir).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", vxmesh::status::render(&r));
    }
    Ok(())
}

/// Exit code 2 when a hop is broken.
pub async fn doctor(a: DoctorArgs) -> Result<ExitCode> {
    let opts = vxmesh::doctor::DoctorOptions {
        to: a.to,
        ping: !a.no_ping,
    };
    let r = vxmesh::doctor::doctor(&a.state_dir, &opts).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", vxmesh::doctor::render(&r));
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
