//! The keys of the agent configuration file, their flags and value types,
//! and the parse that reports every unknown key and every wrongly typed
//! value (not just the first, as serde alone would).

use super::{AgentConfigError, AgentFile};
use crate::config::Problem;

/// One key of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    /// The `vxmesh agent` flag that sets it.
    pub flag: &'static str,
    /// The value it takes, as a fix for a wrong one.
    pub want: &'static str,
}

const fn key(name: &'static str, flag: &'static str, want: &'static str) -> Key {
    Key { name, flag, want }
}

/// Every key, in the order of the example file.
pub const KEYS: &[Key] = &[
    key("node", "--node", "a string, like node = \"host1\""),
    key(
        "cluster",
        "--cluster",
        "a path, like cluster = \"/etc/vxmesh/cluster.toml\"",
    ),
    key(
        "store",
        "--store",
        "a string, like store = \"etcd://10.0.0.10:2379\"",
    ),
    key("prefix", "--prefix", "a string, like prefix = \"/vxmesh\""),
    key(
        "etcd_ca",
        "--etcd-ca",
        "a path, like etcd_ca = \"/etc/vxmesh/etcd-ca.pem\"",
    ),
    key(
        "etcd_cert",
        "--etcd-cert",
        "a path, like etcd_cert = \"/etc/vxmesh/etcd-client.pem\"",
    ),
    key(
        "etcd_key",
        "--etcd-key",
        "a path, like etcd_key = \"/etc/vxmesh/etcd-client-key.pem\"",
    ),
    key(
        "etcd_user",
        "--etcd-user",
        "a string, like etcd_user = \"vxmesh\"",
    ),
    key(
        "etcd_password_file",
        "--etcd-password-file",
        "a path, like etcd_password_file = \"/etc/vxmesh/etcd-password\"",
    ),
    key(
        "networks",
        "--network",
        "a list of names, like networks = [\"blue\", \"red\"]",
    ),
    key(
        "underlay_ip",
        "--underlay-ip",
        "a string, like underlay_ip = \"198.18.0.1\"",
    ),
    key(
        "underlay_dev",
        "--underlay-dev",
        "a string, like underlay_dev = \"eth0\"",
    ),
    key("ttl", "--ttl", "a whole number of seconds, like ttl = 10"),
    key("leave", "--leave", "true or false"),
    key(
        "metrics",
        "--metrics",
        "a string, like metrics = \"10.0.0.1:9472\"",
    ),
    key(
        "state_dir",
        "--state-dir",
        "a path, like state_dir = \"/run/vxmesh\"",
    ),
    key("resync", "--resync", "a number of seconds, like resync = 5"),
    key("once", "--once", "true or false"),
    key("vxlan_filter", "--vxlan-filter", "true or false"),
    key(
        "key_file",
        "--key-file",
        "a path, like key_file = \"/etc/vxmesh/wg.key\"",
    ),
];

/// The flag of key `name` (`--network` for `networks`).
pub fn flag_of(name: &str) -> Option<&'static str> {
    KEYS.iter().find(|k| k.name == name).map(|k| k.flag)
}

/// A file's values as a TOML table (keys that are set only).
pub(super) fn to_table(file: &AgentFile) -> toml::Table {
    match toml::Value::try_from(file) {
        Ok(toml::Value::Table(t)) => t,
        other => unreachable!("an AgentFile serializes to a table, not {other:?}"),
    }
}

/// The known key a mistyped one most likely meant: the same letters with
/// `-` for `_`, a singular for a plural, or a flag's spelling.
fn suggestion(unknown: &str) -> Option<&'static str> {
    let norm = unknown.trim_start_matches('-').replace('-', "_");
    KEYS.iter()
        .find(|k| k.name == norm || k.name.trim_end_matches('s') == norm.trim_end_matches('s'))
        .map(|k| k.name)
}

/// Parse the text: a TOML syntax error is one problem at its line; else
/// every unknown key and every value of the wrong type is one problem each.
pub(super) fn parse(text: &str, source_name: &str) -> Result<AgentFile, AgentConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let field = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            }
            None => "toml".to_string(),
        };
        AgentConfigError::one(
            source_name,
            &field,
            format!(
                "{} (the file is TOML: key = value, one a line; see the example in /usr/share/doc/vxmesh/examples/agent.toml)",
                e.message().trim_end()
            ),
        )
    })?;
    let mut problems = Vec::new();
    for (k, v) in &table {
        let Some(key) = KEYS.iter().find(|key| key.name == k) else {
            let fix = match suggestion(k) {
                Some(s) => format!("did you mean {s}?"),
                None => format!(
                    "remove it (known keys: {})",
                    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                ),
            };
            problems.push(Problem {
                field: k.clone(),
                message: format!("unknown key: {fix}"),
            });
            continue;
        };
        let mut one = toml::Table::new();
        one.insert(k.clone(), v.clone());
        if toml::Value::Table(one).try_into::<AgentFile>().is_err() {
            problems.push(Problem {
                field: format!("{k} = {v}"),
                message: format!("wrong type: want {}", key.want),
            });
        }
    }
    if !problems.is_empty() {
        return Err(AgentConfigError {
            source_name: source_name.to_string(),
            problems,
        });
    }
    // Every key is known and well typed, so the whole table is too.
    toml::Value::Table(table)
        .try_into()
        .map_err(|e| AgentConfigError::one(source_name, "toml", format!("{e}")))
}
