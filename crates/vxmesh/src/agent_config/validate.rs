//! Validation of agent settings (a file with flags on top): every problem,
//! named as the user wrote it, and the [`AgentConfig`] they resolve to.
//! Pure: files the settings name are checked when the store is opened.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    AgentConfig, AgentConfigError, AgentSettings, AgentStore, DEFAULT_RESYNC_SECS, EtcdAgent,
    flag_of,
};
use crate::config::Problem;
use crate::model;
use crate::names::{IfName, NetworkName, NodeName};
use crate::state::DEFAULT_STATE_DIR;
use crate::store::etcd;
use crate::store::open::EtcdLogin;

/// The lease TTLs etcd accepts from an agent, in seconds.
const TTL_RANGE: std::ops::RangeInclusive<i64> = 2..=3600;
/// `resync` must be above 0 and below this many seconds (a day).
const MAX_RESYNC_SECS: f64 = 86400.0;

/// The problems found so far, each named as written.
struct Problems<'a> {
    settings: &'a AgentSettings,
    list: Vec<Problem>,
}

impl Problems<'_> {
    /// `--flag VALUE` for a value from the command line, `key = VALUE` for
    /// one from the file, the bare key for a missing one.
    fn name(&self, key: &str, value: Option<toml::Value>) -> String {
        let from_flag = self.settings.from_flags.contains(key);
        match (value, from_flag) {
            (None, _) => key.to_string(),
            (Some(v), true) => {
                let flag = flag_of(key).unwrap_or(key);
                match v {
                    toml::Value::String(s) => format!("{flag} {s}"),
                    // As typed: `--resync 0`, not TOML's `0.0`.
                    toml::Value::Float(f) => format!("{flag} {f}"),
                    v => format!("{flag} {v}"),
                }
            }
            (Some(v), false) => format!("{key} = {v}"),
        }
    }

    fn add(&mut self, key: &str, value: Option<toml::Value>, message: impl Into<String>) {
        let field = self.name(key, value);
        self.list.push(Problem {
            field,
            message: message.into(),
        });
    }
}

fn text(s: &str) -> Option<toml::Value> {
    Some(toml::Value::String(s.to_string()))
}

fn path(p: &Path) -> Option<toml::Value> {
    text(&p.display().to_string())
}

/// Validate the settings, collecting every problem.
pub fn validate(settings: &AgentSettings) -> Result<AgentConfig, AgentConfigError> {
    let v = &settings.values;
    let mut p = Problems {
        settings,
        list: Vec::new(),
    };
    let node = match &v.node {
        None => {
            p.add(
                "node",
                None,
                "missing: name this node as the cluster knows it: node = \"host1\" (or --node NAME)",
            );
            None
        }
        Some(n) => n
            .parse::<NodeName>()
            .map_err(|e| p.add("node", text(n), e.to_string()))
            .ok(),
    };
    for (key, file) in [
        ("cluster", &v.cluster),
        ("etcd_ca", &v.etcd_ca),
        ("etcd_cert", &v.etcd_cert),
        ("etcd_key", &v.etcd_key),
        ("etcd_password_file", &v.etcd_password_file),
        ("state_dir", &v.state_dir),
        ("key_file", &v.key_file),
    ] {
        if file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            p.add(key, None, "empty path: name a file (or remove the key)");
        }
    }
    let store = match (&v.cluster, &v.store) {
        (Some(cluster), Some(url)) => {
            let field = format!(
                "{} and {}",
                p.name("cluster", path(cluster)),
                p.name("store", text(url))
            );
            p.list.push(Problem {
                field,
                message: "two different stores: give exactly one (cluster for the static store, store for etcd)".into(),
            });
            None
        }
        (None, None) => {
            p.add(
                "store",
                None,
                "no store given: use --cluster FILE or cluster = \"FILE\" (static store), or --store etcd://HOST:2379 or store = \"etcd://HOST:2379\" with networks and underlay_ip (etcd store)",
            );
            None
        }
        (Some(cluster), None) => {
            refuse_etcd_keys(settings, &mut p);
            Some(AgentStore::ClusterFile(cluster.clone()))
        }
        (None, Some(url)) => {
            etcd_store(settings, url, &mut p).map(|e| AgentStore::Etcd(Box::new(e)))
        }
    };
    let metrics = v.metrics.as_ref().and_then(|m| {
        m.parse::<SocketAddr>()
            .map_err(|_| {
                p.add(
                    "metrics",
                    text(m),
                    "not an IP:PORT address: give an address of this host and a port, e.g. 10.0.0.1:9472 (0.0.0.0:9472 listens on every address)",
                )
            })
            .ok()
    });
    let resync = v.resync.unwrap_or(DEFAULT_RESYNC_SECS);
    if !(resync > 0.0 && resync < MAX_RESYNC_SECS) {
        p.add(
            "resync",
            Some(toml::Value::Float(resync)),
            format!(
                "must be between 0 and 86400 seconds (default {DEFAULT_RESYNC_SECS}): kernel events and store changes act at once, this is the full pass in between"
            ),
        );
    }
    match (node, store) {
        (Some(node), Some(store)) if p.list.is_empty() => Ok(AgentConfig {
            node,
            store,
            state_dir: v
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            resync: Duration::from_secs_f64(resync),
            once: v.once.unwrap_or(false),
            vxlan_filter: v.vxlan_filter.unwrap_or(true),
            key_file: v.key_file.clone(),
            metrics,
        }),
        _ => Err(AgentConfigError {
            source_name: settings.source_name(),
            problems: p.list,
        }),
    }
}

/// With a cluster file, every key of the etcd store is a mistake.
fn refuse_etcd_keys(settings: &AgentSettings, p: &mut Problems) {
    let v = &settings.values;
    let given: [(&str, Option<toml::Value>); 11] = [
        ("prefix", v.prefix.as_deref().and_then(text)),
        ("etcd_ca", v.etcd_ca.as_deref().and_then(path)),
        ("etcd_cert", v.etcd_cert.as_deref().and_then(path)),
        ("etcd_key", v.etcd_key.as_deref().and_then(path)),
        ("etcd_user", v.etcd_user.as_deref().and_then(text)),
        (
            "etcd_password_file",
            v.etcd_password_file.as_deref().and_then(path),
        ),
        (
            "networks",
            v.networks.as_ref().map(|n| {
                toml::Value::Array(n.iter().map(|s| toml::Value::String(s.clone())).collect())
            }),
        ),
        ("underlay_ip", v.underlay_ip.as_deref().and_then(text)),
        ("underlay_dev", v.underlay_dev.as_deref().and_then(text)),
        ("ttl", v.ttl.map(toml::Value::Integer)),
        ("leave", v.leave.map(toml::Value::Boolean)),
    ];
    for (key, value) in given {
        if value.is_some() {
            p.add(
                key,
                value,
                "belongs to the etcd store (store); with cluster the cluster file says it all: remove it",
            );
        }
    }
}

/// The etcd store's keys, each checked.
fn etcd_store(settings: &AgentSettings, url: &str, p: &mut Problems) -> Option<EtcdAgent> {
    let v = &settings.values;
    let mut ok = true;
    let mut bad = |p: &mut Problems, key: &str, value: Option<toml::Value>, msg: String| {
        ok = false;
        p.add(key, value, msg);
    };
    if etcd::parse_store_url(url, v.etcd_ca.is_some()).is_err() {
        bad(
            p,
            "store",
            text(url),
            "write it like etcd://HOST:2379 or etcd://HOST1:2379,HOST2:2379 (or http(s)://HOST:2379,...)".into(),
        );
    }
    if let Some(prefix) = &v.prefix
        && let Err(e) = etcd::check_prefix(prefix)
    {
        bad(p, "prefix", text(prefix), e);
    }
    // (key, given, the key it needs is given, the fix)
    let pairs = [
        (
            "etcd_cert",
            v.etcd_cert.is_some(),
            v.etcd_key.is_some(),
            "needs etcd_key (--etcd-key): the key of the client certificate",
        ),
        (
            "etcd_key",
            v.etcd_key.is_some(),
            v.etcd_cert.is_some(),
            "needs etcd_cert (--etcd-cert): the client certificate of this key",
        ),
        (
            "etcd_cert",
            v.etcd_cert.is_some(),
            v.etcd_ca.is_some(),
            "needs etcd_ca (--etcd-ca): the CA that signed the etcd server certificate",
        ),
        (
            "etcd_user",
            v.etcd_user.is_some(),
            v.etcd_password_file.is_some(),
            "needs etcd_password_file (--etcd-password-file): the file holding the user's password",
        ),
        (
            "etcd_password_file",
            v.etcd_password_file.is_some(),
            v.etcd_user.is_some(),
            "needs etcd_user (--etcd-user): whose password the file holds",
        ),
    ];
    for (key, given, has, msg) in pairs {
        if given && !has {
            bad(p, key, None, msg.to_string());
        }
    }
    let networks = match v.networks.as_deref() {
        None | Some([]) => {
            bad(
                p,
                "networks",
                None,
                "missing: the network(s) to join: networks = [\"blue\"] (or --network NAME); create them with `vxmesh net create`".into(),
            );
            Vec::new()
        }
        Some(list) => {
            let mut seen = BTreeSet::new();
            let mut out = Vec::new();
            for n in list {
                match n.parse::<NetworkName>() {
                    Err(e) => bad(p, "networks", text(n), e.to_string()),
                    Ok(_) if !seen.insert(n.as_str()) => {
                        bad(p, "networks", text(n), "listed twice: name it once".into())
                    }
                    Ok(name) => out.push(name),
                }
            }
            out
        }
    };
    let underlay_ip = match v.underlay_ip.as_deref() {
        None => {
            bad(
                p,
                "underlay_ip",
                None,
                "missing: this node's address on the underlay: underlay_ip = \"198.18.0.1\" (or --underlay-ip IP)".into(),
            );
            None
        }
        Some(s) => match s.parse::<Ipv4Addr>() {
            Err(_) => {
                bad(
                    p,
                    "underlay_ip",
                    text(s),
                    "not an IPv4 address (write it like 198.18.0.1)".into(),
                );
                None
            }
            Ok(ip) => match model::check_underlay_ip(ip) {
                Err(e) => {
                    bad(p, "underlay_ip", text(s), e.to_string());
                    None
                }
                Ok(ip) => Some(ip),
            },
        },
    };
    let underlay_dev = v.underlay_dev.as_deref().and_then(|d| {
        d.parse::<IfName>()
            .map_err(|e| bad(p, "underlay_dev", text(d), e.to_string()))
            .ok()
    });
    if let Some(ttl) = v.ttl
        && !TTL_RANGE.contains(&ttl)
    {
        bad(
            p,
            "ttl",
            Some(toml::Value::Integer(ttl)),
            format!(
                "out of range: use {} to {} seconds (default {}): peers drop a crashed node after this long",
                TTL_RANGE.start(),
                TTL_RANGE.end(),
                etcd::DEFAULT_TTL.as_secs()
            ),
        );
    }
    if !ok {
        return None;
    }
    Some(EtcdAgent {
        login: EtcdLogin {
            store: Some(url.to_string()),
            prefix: v.prefix.clone(),
            ca: v.etcd_ca.clone(),
            cert: v.etcd_cert.clone(),
            key: v.etcd_key.clone(),
            user: v.etcd_user.clone(),
            password_file: v.etcd_password_file.clone(),
        },
        networks,
        underlay_ip: underlay_ip?,
        underlay_dev,
        ttl: v.ttl.map(|t| t as u64),
        leave: v.leave.unwrap_or(false),
    })
}
