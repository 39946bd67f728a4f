//! `vxmesh agent`: choose the store from the options, serve metrics if asked,
//! and run the node agent.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use vxmesh::state::DEFAULT_STATE_DIR;
use vxmesh::store::Store;
use vxmesh::store::etcd;
use vxmesh::store::open::{ChosenStore, StoreChoice};

use super::EtcdArgs;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The cluster file (static store). Give this or --store.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// This node's name in the cluster.
    #[arg(long)]
    node: String,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// One reconcile pass, then exit.
    #[arg(long)]
    once: bool,
    /// Seconds between full passes (kernel events and file edits act at once).
    #[arg(long, default_value_t = 5.0)]
    resync: f64,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// etcd store: network(s) to join (repeat the option or separate by commas).
    #[arg(long = "network", value_name = "NAME", value_delimiter = ',')]
    networks: Vec<String>,
    /// etcd store: this node's underlay address (VXLAN source; peers send to it).
    #[arg(long, value_name = "IP")]
    underlay_ip: Option<Ipv4Addr>,
    /// etcd store: the underlay device (default: the one holding --underlay-ip).
    #[arg(long, value_name = "DEV")]
    underlay_dev: Option<String>,
    /// etcd store: lease TTL in seconds; peers drop a crashed node after this long.
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
    /// etcd store: on SIGTERM/SIGINT leave the network(s) (revoke the lease:
    /// peers drop this node at once) instead of keeping the records for a restart.
    #[arg(long)]
    leave: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 10.0.0.1:9472).
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<String>,
}

impl AgentArgs {
    fn store_choice(&self) -> StoreChoice {
        StoreChoice {
            cluster: self.cluster.clone(),
            etcd: self.etcd.login(),
            networks: self.networks.clone(),
            underlay_ip: self.underlay_ip,
            underlay_dev: self.underlay_dev.clone(),
            ttl: self.ttl,
            leave: self.leave,
        }
    }
}

pub async fn run(a: AgentArgs) -> Result<()> {
    if !(a.resync > 0.0 && a.resync < 86400.0) {
        anyhow::bail!("--resync must be between 0 and 86400 seconds");
    }
    let metrics = vxmesh::metrics::Metrics::new();
    // Listen before anything is applied: a bad --metrics fails at once.
    let _metrics_server = match &a.metrics {
        Some(addr) => {
            let listener = vxmesh::metrics::bind(addr).await?;
            Some(vxmesh::metrics::serve(listener, metrics.clone()))
        }
        None => None,
    };
    let opts = vxmesh::agent::AgentOptions {
        node: a.node.clone(),
        state_dir: a.state_dir.clone(),
        resync: Duration::from_secs_f64(a.resync),
        once: a.once,
        metrics: metrics.clone(),
    };
    match a.store_choice().open(&a.node)? {
        ChosenStore::Static(mut store) => Ok(vxmesh::agent::run(&mut store, &opts).await?),
        ChosenStore::Etcd {
            mut options,
            networks,
            password_file,
        } => {
            options.metrics = metrics.clone();
            let store = vxmesh::agent::join_and_run(&opts, || {
                etcd::EtcdNetworks::join(&options, &networks, password_file.clone())
            })
            .await?;
            if a.leave
                && let Some(store) = store
            {
                store.leave().await?;
                tracing::info!(node = %a.node, "left the network(s): records removed");
            }
            Ok(())
        }
    }
}
