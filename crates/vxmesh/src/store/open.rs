//! Which store an agent runs on, chosen from its options: a cluster file
//! (static store) or etcd, with every contradiction refused before anything
//! is touched.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config;
use crate::metrics::Metrics;
use crate::store::etcd;
use crate::store::static_file::StaticFile;

/// An error of a layer below (config, etcd options, the static file), shown
/// as that layer wrote it.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why no store could be chosen or opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("--cluster and --store name two different stores: give exactly one")]
    TwoStores,
    #[error(
        "no store given: use --cluster FILE (static store) or --store etcd://HOST:2379 --network NAME --underlay-ip IP (etcd store)"
    )]
    NoStore,
    #[error(
        "--network, --underlay-ip, --underlay-dev, --ttl, --leave, --prefix and --etcd-* belong to the etcd store (--store): with --cluster the cluster file says it all"
    )]
    EtcdOptionWithCluster,
    #[error("node '{node}' is not in {} (known: {}): check --node", file.display(), known.join(", "))]
    UnknownNode {
        node: String,
        file: PathBuf,
        known: Vec<String>,
    },
    #[error("--store etcd://HOST:2379 is required")]
    NoEtcdUrl,
    #[error("--etcd-cert needs --etcd-ca (the CA that signed the etcd server certificate)")]
    CertWithoutCa,
    #[error("TLS file {}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--store needs --network NAME: the network(s) to join (create them with `vxmesh net create`)"
    )]
    NoNetwork,
    #[error("--store needs --underlay-ip IP: this node's address on the underlay")]
    NoUnderlayIp,
    /// The cluster file, the store URL, the password file or the etcd
    /// options were refused by the layer that reads them.
    #[error(transparent)]
    Invalid(Cause),
}

/// Where the etcd store is and how to log in (the `--store`, `--prefix` and
/// `--etcd-*` options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdLogin {
    /// `etcd://HOST:2379[,HOST2:2379]`.
    pub store: Option<String>,
    pub prefix: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdLogin {
    /// Was any etcd option given?
    pub fn given(&self) -> bool {
        self.store.is_some()
            || self.prefix.is_some()
            || self.ca.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.user.is_some()
            || self.password_file.is_some()
    }

    /// The key prefix, [`etcd::DEFAULT_PREFIX`] unless given.
    pub fn prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| etcd::DEFAULT_PREFIX.to_string())
    }

    /// Client options; the TLS and password files are checked now, so that
    /// a typo fails at once rather than in the agent's retry loop.
    pub fn client(&self) -> Result<etcd::ClientOptions, OpenStoreError> {
        let url = self.store.as_deref().ok_or(OpenStoreError::NoEtcdUrl)?;
        if self.cert.is_some() && self.ca.is_none() {
            return Err(OpenStoreError::CertWithoutCa);
        }
        let endpoints = etcd::parse_store_url(url, self.ca.is_some())
            .map_err(|e| OpenStoreError::Invalid(e.into()))?;
        for f in [&self.ca, &self.cert, &self.key].into_iter().flatten() {
            std::fs::metadata(f).map_err(|source| OpenStoreError::TlsFile {
                path: f.clone(),
                source,
            })?;
        }
        let user = match (&self.user, &self.password_file) {
            (Some(u), Some(f)) => Some((
                u.clone(),
                etcd::read_password(f).map_err(|e| OpenStoreError::Invalid(e.into()))?,
            )),
            _ => None,
        };
        Ok(etcd::ClientOptions {
            endpoints,
            tls: self.ca.as_ref().map(|ca| etcd::TlsOptions {
                ca: ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
            user,
        })
    }
}

/// The store options of `vxmesh agent`, as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreChoice {
    /// The cluster file of the static store.
    pub cluster: Option<PathBuf>,
    pub etcd: EtcdLogin,
    /// etcd: the networks to join.
    pub networks: Vec<String>,
    pub underlay_ip: Option<Ipv4Addr>,
    pub underlay_dev: Option<String>,
    /// etcd: lease TTL in seconds.
    pub ttl: Option<u64>,
    /// etcd: leave the networks when the agent stops.
    pub leave: bool,
}

/// The store an agent runs on.
pub enum ChosenStore {
    /// The cluster file, opened; it lists the node.
    Static(StaticFile),
    /// etcd: the options of every network to join (their `network` field is
    /// the first network), and where the password came from.
    Etcd {
        options: Box<etcd::EtcdOptions>,
        networks: Vec<String>,
        password_file: Option<PathBuf>,
    },
}

impl StoreChoice {
    /// Options that only the etcd store understands.
    fn names_etcd(&self) -> bool {
        self.etcd.given()
            || !self.networks.is_empty()
            || self.underlay_ip.is_some()
            || self.underlay_dev.is_some()
            || self.ttl.is_some()
            || self.leave
    }

    /// Which store, with what, for `node`; the static store's file is opened
    /// and must list `node`. Nothing is contacted yet. The store records
    /// into `metrics` (a cluster file that cannot be watched, etcd's links).
    pub fn open(&self, node: &str, metrics: &Metrics) -> Result<ChosenStore, OpenStoreError> {
        match (&self.cluster, &self.etcd.store) {
            (Some(_), Some(_)) => Err(OpenStoreError::TwoStores),
            (None, None) => Err(OpenStoreError::NoStore),
            (Some(file), None) => {
                if self.names_etcd() {
                    return Err(OpenStoreError::EtcdOptionWithCluster);
                }
                open_static(file, node, metrics).map(ChosenStore::Static)
            }
            (None, Some(_)) => {
                let client = self.etcd.client()?;
                if self.networks.is_empty() {
                    return Err(OpenStoreError::NoNetwork);
                }
                let ip = self.underlay_ip.ok_or(OpenStoreError::NoUnderlayIp)?;
                let mut o = etcd::EtcdOptions::new(client.endpoints, &self.networks[0], node, ip);
                o.prefix = self.etcd.prefix();
                o.underlay_dev = self.underlay_dev.clone();
                o.ttl = self.ttl.map_or(etcd::DEFAULT_TTL, Duration::from_secs);
                o.tls = client.tls;
                o.user = client.user;
                o.metrics = metrics.clone();
                o.validate()
                    .map_err(|e| OpenStoreError::Invalid(e.into()))?;
                Ok(ChosenStore::Etcd {
                    options: Box::new(o),
                    networks: self.networks.clone(),
                    password_file: self.etcd.password_file.clone(),
                })
            }
        }
    }
}

/// Open the cluster file and check that it lists `node`: a bad file or node
/// fails before anything is touched.
fn open_static(file: &Path, node: &str, metrics: &Metrics) -> Result<StaticFile, OpenStoreError> {
    let store = StaticFile::open(file, metrics).map_err(|e| OpenStoreError::Invalid(e.into()))?;
    let cluster = config::load(file).map_err(|e| OpenStoreError::Invalid(e.into()))?;
    if cluster.node(node).is_none() {
        return Err(OpenStoreError::UnknownNode {
            node: node.to_string(),
            file: file.to_path_buf(),
            known: cluster.nodes.iter().map(|n| n.name.to_string()).collect(),
        });
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd_choice() -> StoreChoice {
        StoreChoice {
            etcd: EtcdLogin {
                store: Some("etcd://127.0.0.1:2379".into()),
                ..EtcdLogin::default()
            },
            networks: vec!["blue".into()],
            underlay_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..StoreChoice::default()
        }
    }

    fn err(c: &StoreChoice) -> OpenStoreError {
        match c.open("n1", &Metrics::new()) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn exactly_one_store() {
        assert!(matches!(
            err(&StoreChoice::default()),
            OpenStoreError::NoStore
        ));
        let mut c = etcd_choice();
        c.cluster = Some("/nonexistent/cluster.toml".into());
        assert!(matches!(err(&c), OpenStoreError::TwoStores));
    }

    #[test]
    fn etcd_options_are_refused_with_a_cluster_file() {
        let base = StoreChoice {
            cluster: Some("/nonexistent/cluster.toml".into()),
            ..StoreChoice::default()
        };
        let variants: Vec<fn(&mut StoreChoice)> = vec![
            |c| c.networks = vec!["a".into()],
            |c| c.underlay_ip = Some(Ipv4Addr::LOCALHOST),
            |c| c.underlay_dev = Some("eth0".into()),
            |c| c.ttl = Some(3),
            |c| c.leave = true,
            |c| c.etcd.prefix = Some("/x".into()),
            |c| c.etcd.ca = Some("/ca.pem".into()),
            |c| c.etcd.user = Some("u".into()),
        ];
        for set in variants {
            let mut c = base.clone();
            set(&mut c);
            assert!(matches!(err(&c), OpenStoreError::EtcdOptionWithCluster));
        }
        // Without them, the (missing) file itself is the problem.
        assert!(matches!(err(&base), OpenStoreError::Invalid(_)));
    }

    #[test]
    fn a_node_missing_from_the_cluster_file_is_named() {
        // The static store watches its file with inotify through tokio
        // (or polls it where that is unavailable).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.toml");
        std::fs::write(
            &file,
            r#"
[[network]]
name = "default"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 42

[[node]]
name = "a"
underlay_ip = "10.0.0.1"
subnet = "172.18.1.0/24"

[[node]]
name = "b"
underlay_ip = "10.0.0.2"
subnet = "172.18.2.0/24"
"#,
        )
        .unwrap();
        let c = StoreChoice {
            cluster: Some(file.clone()),
            ..StoreChoice::default()
        };
        assert!(matches!(
            c.open("a", &Metrics::new()),
            Ok(ChosenStore::Static(_))
        ));
        let e = match c.open("zz", &Metrics::new()) {
            Err(e) => e,
            Ok(_) => panic!("zz is not in the file"),
        };
        assert_eq!(
            e.to_string(),
            format!(
                "node 'zz' is not in {} (known: a, b): check --node",
                file.display()
            )
        );
    }

    #[test]
    fn etcd_needs_networks_and_an_underlay_ip() {
        let mut c = etcd_choice();
        c.networks.clear();
        assert!(matches!(err(&c), OpenStoreError::NoNetwork));
        let mut c = etcd_choice();
        c.underlay_ip = None;
        assert!(matches!(err(&c), OpenStoreError::NoUnderlayIp));
    }

    #[test]
    fn etcd_options_carry_every_setting() {
        let mut c = etcd_choice();
        c.networks.push("red".into());
        c.ttl = Some(7);
        c.underlay_dev = Some("eth1".into());
        c.etcd.prefix = Some("/lab".into());
        let Ok(ChosenStore::Etcd {
            options,
            networks,
            password_file,
        }) = c.open("n1", &Metrics::new())
        else {
            panic!("expected the etcd store");
        };
        assert_eq!(networks, ["blue", "red"]);
        assert_eq!(options.network, "blue");
        assert_eq!(options.node, "n1");
        assert_eq!(options.prefix, "/lab");
        assert_eq!(options.ttl, Duration::from_secs(7));
        assert_eq!(options.underlay_dev.as_deref(), Some("eth1"));
        assert_eq!(options.underlay_ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(password_file, None);
    }

    #[test]
    fn client_checks_url_certificates_and_files_first() {
        assert!(matches!(
            EtcdLogin::default().client(),
            Err(OpenStoreError::NoEtcdUrl)
        ));
        let mut l = etcd_choice().etcd;
        l.cert = Some("/c.pem".into());
        assert!(matches!(l.client(), Err(OpenStoreError::CertWithoutCa)));
        let mut l = etcd_choice().etcd;
        l.ca = Some("/nonexistent/ca.pem".into());
        let e = l.client().unwrap_err();
        assert!(matches!(e, OpenStoreError::TlsFile { .. }));
        assert_eq!(e.to_string(), "TLS file /nonexistent/ca.pem");
        assert_eq!(EtcdLogin::default().prefix(), etcd::DEFAULT_PREFIX);
        assert!(!EtcdLogin::default().given());
        assert!(l.given());
    }
}
