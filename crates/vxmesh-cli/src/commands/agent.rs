//! `vxmesh agent`: read the configuration file, put the flags over it,
//! validate both, choose the store, serve metrics if asked, and run the
//! node agent. `vxmesh validate --agent-config` checks a file the same way.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use vxmesh::agent_config::{self, AgentConfig, AgentFile, AgentSettings, AgentStore};
use vxmesh::store::Store;
use vxmesh::store::etcd;
use vxmesh::store::open::ChosenStore;

use super::EtcdArgs;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent configuration file (TOML; every flag below is a key of the
    /// same name with `_` for `-`, `networks` for --network). Default:
    /// /etc/vxmesh/agent.toml when it exists. Flags override the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Read no configuration file, not even /etc/vxmesh/agent.toml.
    #[arg(long, conflicts_with = "config")]
    no_config: bool,
    /// The cluster file (static store). Give this or --store.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// This node's name in the cluster.
    #[arg(long)]
    node: Option<String>,
    /// Where the agent keeps its state [default: /run/vxmesh].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// One reconcile pass, then exit.
    #[arg(long)]
    once: bool,
    /// Seconds between full passes (kernel events and file edits act at once) [default: 5].
    #[arg(long, value_name = "SECS")]
    resync: Option<f64>,
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
    /// Accept VXLAN packets only from this node's peers (nftables table inet
    /// vxmesh; dropped ones count in vxmesh_vxlan_dropped_total) [default: true].
    #[arg(long, value_name = "BOOL")]
    vxlan_filter: Option<bool>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 10.0.0.1:9472).
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<String>,
    /// The secure underlay's private key (mode 0600, base64 as `vxmesh
    /// keygen` writes it) [default: STATE_DIR/wg.key, made on first start].
    /// The agent replaces it with the new key when a rotation (`vxmesh
    /// rotate-key`) is done.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

impl AgentArgs {
    /// The options given as flags, as keys of the configuration file.
    fn flags(&self) -> AgentFile {
        let login = self.etcd.login();
        AgentFile {
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            store: login.store,
            prefix: login.prefix,
            etcd_ca: login.ca,
            etcd_cert: login.cert,
            etcd_key: login.key,
            etcd_user: login.user,
            etcd_password_file: login.password_file,
            networks: (!self.networks.is_empty()).then(|| self.networks.clone()),
            underlay_ip: self.underlay_ip.map(|ip| ip.to_string()),
            underlay_dev: self.underlay_dev.clone(),
            ttl: self.ttl.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            leave: self.leave.then_some(true),
            metrics: self.metrics.clone(),
            state_dir: self.state_dir.clone(),
            resync: self.resync,
            once: self.once.then_some(true),
            vxlan_filter: self.vxlan_filter,
            key_file: self.key_file.clone(),
        }
    }

    /// The configuration file to read: --config, else the default one when
    /// it exists; none with --no-config.
    fn config_file(&self) -> Option<PathBuf> {
        if self.no_config {
            return None;
        }
        self.config.clone().or_else(|| {
            let default = Path::new(agent_config::DEFAULT_PATH);
            default.exists().then(|| default.to_path_buf())
        })
    }

    /// The file's settings with the flags over them, validated.
    fn config(&self) -> Result<AgentConfig> {
        let mut settings = match self.config_file() {
            Some(f) => agent_config::load(&f)?,
            None => AgentSettings::default(),
        };
        settings.override_with(self.flags());
        Ok(agent_config::validate(&settings)?)
    }
}

/// `vxmesh validate --agent-config FILE`: the file alone (no flags, no
/// default file), validated, then its store opened the way the agent opens
/// it (the cluster file read and checked for the node, TLS and password
/// files read) without contacting anything.
pub fn check_file(file: &Path) -> Result<()> {
    let settings = agent_config::load(file)?;
    let c = agent_config::validate(&settings)?;
    c.store_choice()
        .open(&c.node, &vxmesh::metrics::Metrics::new())?;
    if let Some(f) = &c.key_file {
        vxmesh::secure::keys::read_key_file(f)?;
    }
    let store = match &c.store {
        AgentStore::ClusterFile(f) => format!("static store {}", f.display()),
        AgentStore::Etcd(e) => format!(
            "etcd store {}, network(s) {}, underlay {}",
            e.login.store.as_deref().unwrap_or_default(),
            e.networks
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            e.underlay_ip
        ),
    };
    println!("{}: node {}, {store}", file.display(), c.node);
    Ok(())
}

pub async fn run(a: AgentArgs) -> Result<()> {
    let c = a.config()?;
    let metrics = vxmesh::metrics::Metrics::new();
    // Listen before anything is applied: a bad --metrics fails at once.
    let _metrics_server = match &c.metrics {
        Some(addr) => {
            let listener = vxmesh::metrics::bind(&addr.to_string()).await?;
            Some(vxmesh::metrics::serve(listener, metrics.clone()))
        }
        None => None,
    };
    let opts = vxmesh::agent::AgentOptions {
        node: c.node.to_string(),
        state_dir: c.state_dir.clone(),
        resync: c.resync,
        once: c.once,
        metrics: metrics.clone(),
        vxlan_filter: c.vxlan_filter,
        key_file: c.key_file.clone(),
    };
    // A configured key file must be usable before anything is applied.
    if let Some(f) = &c.key_file {
        vxmesh::secure::keys::read_key_file(f)?;
    }
    match c.store_choice().open(&c.node, &metrics)? {
        ChosenStore::Static(mut store) => Ok(vxmesh::agent::run(&mut store, &opts).await?),
        ChosenStore::Etcd {
            mut options,
            networks,
            password_file,
        } => {
            // Peers find this node's public key in its records.
            options.keys =
                vxmesh::secure::underlay::listed_keys(c.key_file.as_deref(), &c.state_dir)?;
            let store = vxmesh::agent::join_and_run(&opts, || {
                etcd::EtcdNetworks::join(&options, &networks, password_file.clone())
            })
            .await?;
            if c.leave()
                && let Some(store) = store
            {
                store.leave().await?;
                tracing::info!(node = %c.node, "left the network(s): records removed");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn every_flag_sets_its_key() {
        let w = Wrap::parse_from([
            "agent",
            "--cluster=/c.toml",
            "--node=h1",
            "--state-dir=/s",
            "--once",
            "--resync=3",
            "--store=etcd://10.0.0.1:2379",
            "--prefix=/p",
            "--etcd-ca=/ca",
            "--etcd-cert=/cert",
            "--etcd-key=/key",
            "--etcd-user=u",
            "--etcd-password-file=/pw",
            "--network=a,b",
            "--underlay-ip=10.0.0.2",
            "--underlay-dev=eth0",
            "--ttl=9",
            "--leave",
            "--metrics=10.0.0.2:9472",
            "--vxlan-filter=false",
            "--key-file=/k",
        ]);
        let mut s = AgentSettings::default();
        s.override_with(w.agent.flags());
        let mut all: Vec<&str> = agent_config::KEYS.iter().map(|k| k.name).collect();
        all.sort();
        let set: Vec<&str> = s.from_flags.iter().copied().collect(); // sorted (a BTreeSet)
        assert_eq!(set, all, "a flag that sets no key, or a key no flag sets");
        for k in agent_config::KEYS {
            assert_eq!(agent_config::flag_of(k.name), Some(k.flag));
        }
        assert_eq!(s.values.networks, Some(vec!["a".into(), "b".into()]));
        assert_eq!(s.values.ttl, Some(9));
        assert_eq!(s.values.underlay_ip.as_deref(), Some("10.0.0.2"));
        // Without flags, nothing is set (the file's values stay).
        let w = Wrap::parse_from(["agent"]);
        let mut s = AgentSettings::default();
        s.override_with(w.agent.flags());
        assert!(s.from_flags.is_empty());
        assert_eq!(s.values, AgentFile::default());
        assert!(!w.agent.no_config);
        let w = Wrap::parse_from(["agent", "--no-config"]);
        assert_eq!(w.agent.config_file(), None);
        let w = Wrap::parse_from(["agent", "--config", "/x.toml"]);
        assert_eq!(w.agent.config_file(), Some(PathBuf::from("/x.toml")));
        assert!(Wrap::try_parse_from(["agent", "--config", "/x", "--no-config"]).is_err());
    }
}
