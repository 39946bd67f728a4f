//! `vxmesh docker-plugin`: serve Docker's remote network and IPAM plugin
//! protocols for the networks this node's agent serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use vxmesh::docker::Plugin;
use vxmesh::docker::server::{DEFAULT_SOCKET, Listen, Listener};
use vxmesh::state::DEFAULT_STATE_DIR;

#[derive(Args, Debug)]
pub struct DockerPluginArgs {
    /// The agent's state dir (the networks it serves, the address allocations).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Unix socket to listen on (mode 0600). Docker finds the plugin by
    /// the socket's file name in /run/docker/plugins (NAME.sock). A socket
    /// passed by systemd (socket activation) is used instead when present.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, conflicts_with = "listen")]
    socket: PathBuf,
    /// Listen on TCP instead (IP:PORT), for a /etc/docker/plugins/NAME.spec
    /// file holding tcp://IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
}

pub async fn run(a: DockerPluginArgs) -> Result<()> {
    let listen = match a.listen {
        Some(addr) => Listen::Tcp(addr),
        None => Listen::Unix(a.socket.clone()),
    };
    // Under systemd socket activation (vxmesh-docker-plugin.socket) the
    // socket is passed in; --socket/--listen are then not used.
    let listener = match Listener::from_systemd()? {
        Some(passed) => passed,
        None => Listener::bind(&listen).await?,
    };
    let plugin = Arc::new(Plugin::new(&a.state_dir));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    eprintln!("vxmesh docker plugin: listening on {}", listener.url());
    listener.serve(plugin, shutdown).await;
    Ok(())
}
