//! Network configs (with an encrypted network's secure underlay
//! settings): create (idempotent), read, delete.

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::client::{ClientOptions, connect, op, txn_gets};
use super::records::{self, Keys};
use crate::config::Network;
use crate::secure::config::{Encryption, EncryptionFile};
use crate::store::error::{Result, StoreError};

/// Validate a network given as in a cluster file (`vxmesh net create`),
/// with the cluster file's rules and messages.
pub fn validate_network(file: &crate::config::NetworkFile) -> Result<Network> {
    records::validate_network(file).map_err(|e| StoreError::invalid("", e))
}

/// Write network `net` under `prefix` (validated first). Idempotent: an
/// identical existing config is fine; a different one is an error.
///
/// An encrypted network is written with its secure underlay settings
/// (`encryption`, a cluster file's `[encryption]` table): given ones must
/// match every other encrypted network's (a node has one secure underlay);
/// without them, those of the encrypted networks already stored are taken,
/// or the defaults. A network without `encrypt` takes none.
pub async fn create_network(
    client: &ClientOptions,
    prefix: &str,
    net: &Network,
    encryption: Option<&EncryptionFile>,
) -> Result<()> {
    records::check_prefix(prefix).map_err(|e| StoreError::invalid("prefix", e))?;
    let valid = records::validate_network(&records::network_file(net))
        .map_err(|e| StoreError::invalid("", e))?;
    let given = given_encryption(&valid, encryption)?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, &net.name);
    let settings = if valid.encrypt {
        let stored = stored_encryption(&c, prefix, &net.name).await?;
        Some(agreed_encryption(&net.name, given, &stored)?)
    } else {
        None
    };
    let key = keys.config();
    let mut put = vec![TxnOp::put(key.clone(), records::network_json(&valid), None)];
    if let Some(e) = &settings {
        put.push(TxnOp::put(
            keys.encryption(),
            records::encryption_json(e),
            None,
        ));
    }
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then(put)
        .or_else([
            TxnOp::get(key.clone(), None),
            TxnOp::get(keys.encryption(), None),
        ]);
    let resp = op(format!("create {key}"), c.kv_client().txn(txn)).await?;
    if resp.succeeded() {
        tracing::info!(network = %net.name, key = %key, "network created");
        return Ok(());
    }
    let got = txn_gets(&resp);
    let value = |k: &str| {
        got.iter()
            .find(|kv| kv.key() == k.as_bytes())
            .map(|kv| kv.value())
    };
    let stored = records::parse_network(&net.name, value(&key).unwrap_or_default());
    let stored_enc = value(&keys.encryption())
        .map(|v| records::parse_encryption(&valid, v))
        .transpose();
    let (stored, stored_enc) = match (stored, stored_enc) {
        (Ok(s), Ok(e)) => (s, e.unwrap_or_default()),
        (Err(e), _) | (_, Err(e)) => {
            return Err(StoreError::Conflict(format!(
                "network {} already exists but its stored config under {} is invalid ({e}): delete it first",
                net.name,
                keys.root()
            )));
        }
    };
    let wanted_enc = settings.unwrap_or_default();
    if stored != valid {
        Err(StoreError::Conflict(format!(
            "network {} already exists with different settings ({}): delete it first",
            net.name,
            records::network_diff(&stored, &valid)
        )))
    } else if valid.encrypt && stored_enc != wanted_enc {
        Err(StoreError::Conflict(format!(
            "network {} already exists with other secure underlay settings ({}): delete it first",
            net.name,
            encryption_diff(&stored_enc, &wanted_enc)
        )))
    } else {
        Ok(())
    }
}

/// The secure underlay settings given for `net`, validated.
fn given_encryption(net: &Network, file: Option<&EncryptionFile>) -> Result<Option<Encryption>> {
    let Some(file) = file else {
        return Ok(None);
    };
    if !net.encrypt {
        return Err(StoreError::invalid(
            "encryption",
            format!(
                "network {} is not encrypted: secure underlay settings (--transport-cidr, --wg-port) apply only with --encrypt",
                net.name
            ),
        ));
    }
    crate::secure::config::validate(Some(file), &[net.port])
        .map(Some)
        .map_err(|problems| {
            let (field, _) = problems[0].clone();
            let all: Vec<String> = problems.iter().map(|(f, m)| format!("{f}: {m}")).collect();
            StoreError::invalid(field, all.join("; "))
        })
}

/// The settings the other encrypted networks under `prefix` were created
/// with, by network name.
async fn stored_encryption(
    c: &Client,
    prefix: &str,
    except: &str,
) -> Result<Vec<(String, EncryptionFile)>> {
    let root = format!("{}/networks/", records::normalize_prefix(prefix));
    let listed = op(
        format!("list {root}"),
        c.kv_client().get(
            root.clone(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await?;
    let mut found = Vec::new();
    for kv in listed.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        let Some(name) = key
            .strip_prefix(root.as_str())
            .and_then(|r| r.strip_suffix("/encryption"))
        else {
            continue;
        };
        if name == except || name.contains('/') {
            continue;
        }
        let got = op(format!("read {key}"), c.kv_client().get(key, None)).await?;
        if let Some(v) = got.kvs().first()
            && let Ok(f) = serde_json::from_slice::<EncryptionFile>(v.value())
        {
            found.push((name.to_string(), f));
        }
    }
    Ok(found)
}

/// The settings network `name` gets: the given ones, which must equal every
/// other encrypted network's, else the others' (the first), else the
/// defaults.
pub(crate) fn agreed_encryption(
    name: &str,
    given: Option<Encryption>,
    stored: &[(String, EncryptionFile)],
) -> Result<Encryption> {
    let others: Vec<(&String, Encryption)> = stored
        .iter()
        .filter_map(|(n, f)| {
            crate::secure::config::validate(Some(f), &[])
                .ok()
                .map(|e| (n, e))
        })
        .collect();
    match (given, others.first()) {
        (None, None) => Ok(Encryption::default()),
        (None, Some((_, e))) => Ok(*e),
        (Some(g), _) => match others.iter().find(|(_, e)| *e != g) {
            None => Ok(g),
            Some((other, e)) => Err(StoreError::Conflict(format!(
                "network {name}: encrypted network {other} has other secure underlay settings ({}); a node has one secure underlay for all its encrypted networks: give {other}'s settings, or none to take them",
                encryption_diff(e, &g)
            ))),
        },
    }
}

/// "transport_cidr 10.255.0.0/16 there, 100.64.0.0/24 requested; ...".
fn encryption_diff(stored: &Encryption, wanted: &Encryption) -> String {
    let mut d = Vec::new();
    if stored.transport != wanted.transport {
        d.push(format!(
            "transport_cidr {} there, {} requested",
            stored.transport, wanted.transport
        ));
    }
    if stored.port != wanted.port {
        d.push(format!(
            "port {} there, {} requested",
            stored.port, wanted.port
        ));
    }
    d.join(", ")
}

/// The secure underlay settings of network `name` (the defaults when it
/// was stored without them).
pub async fn get_encryption(
    client: &ClientOptions,
    prefix: &str,
    name: &str,
) -> Result<Option<Encryption>> {
    records::check_prefix(prefix).map_err(|e| StoreError::invalid("prefix", e))?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, name);
    let Some(net) = read_network(&c, &keys, name).await? else {
        return Ok(None);
    };
    let key = keys.encryption();
    let resp = op(format!("read {key}"), c.kv_client().get(key.clone(), None)).await?;
    match resp.kvs().first() {
        None => Ok(Some(Encryption::default())),
        Some(kv) => records::parse_encryption(&net, kv.value())
            .map(Some)
            .map_err(|e| StoreError::BadRecord {
                what: format!("the secure underlay settings of network {name}"),
                key,
                reason: e,
                fix: ": delete the network and create it again",
            }),
    }
}

/// Read network `name`'s config (`None` if it does not exist).
pub async fn get_network(
    client: &ClientOptions,
    prefix: &str,
    name: &str,
) -> Result<Option<Network>> {
    records::check_prefix(prefix).map_err(|e| StoreError::invalid("prefix", e))?;
    let c = connect(client).await?;
    read_network(&c, &Keys::new(prefix, name), name).await
}

pub(crate) async fn read_network(c: &Client, keys: &Keys, name: &str) -> Result<Option<Network>> {
    let key = keys.config();
    let resp = op(format!("read {key}"), c.kv_client().get(key.clone(), None)).await?;
    match resp.kvs().first() {
        None => Ok(None),
        Some(kv) => records::parse_network(name, kv.value())
            .map(Some)
            .map_err(|e| StoreError::BadRecord {
                what: format!("the config of network {name}"),
                key,
                reason: e.to_string(),
                fix: ": delete the network and create it again",
            }),
    }
}

/// Delete network `name` and everything under it. Refuses while nodes are
/// still registered (make them leave first, or wait for their leases to expire).
pub async fn delete_network(client: &ClientOptions, prefix: &str, name: &str) -> Result<()> {
    records::check_prefix(prefix).map_err(|e| StoreError::invalid("prefix", e))?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, name);
    let nodes = op(
        "list nodes",
        c.kv_client().get(
            keys.nodes(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await?;
    if !nodes.kvs().is_empty() {
        let names: Vec<String> = nodes
            .kvs()
            .iter()
            .filter_map(|kv| {
                kv.key_str()
                    .ok()
                    .and_then(|k| k.rsplit('/').next())
                    .map(str::to_string)
            })
            .collect();
        return Err(StoreError::Conflict(format!(
            "network {name} still has {} node(s) ({}): make them leave first (or stop them and wait for their leases to expire)",
            names.len(),
            names.join(", ")
        )));
    }
    let root = keys.root().to_string();
    op(
        format!("delete {root}"),
        c.kv_client().delete(
            root.clone(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(cidr: &str, port: u32) -> EncryptionFile {
        EncryptionFile {
            transport_cidr: Some(cidr.into()),
            port: Some(port),
        }
    }

    fn valid(f: &EncryptionFile) -> Encryption {
        crate::secure::config::validate(Some(f), &[]).unwrap()
    }

    #[test]
    fn the_first_encrypted_network_sets_the_settings_for_all() {
        let a = file("100.64.0.0/24", 51999);
        // None stored: the given ones, or the defaults.
        assert_eq!(
            agreed_encryption("n", None, &[]).unwrap(),
            Encryption::default()
        );
        assert_eq!(
            agreed_encryption("n", Some(valid(&a)), &[]).unwrap(),
            valid(&a)
        );
        // Stored: taken when none are given, the same accepted, others refused.
        let stored = vec![("first".to_string(), a.clone())];
        assert_eq!(agreed_encryption("n", None, &stored).unwrap(), valid(&a));
        assert_eq!(
            agreed_encryption("n", Some(valid(&a)), &stored).unwrap(),
            valid(&a)
        );
        let e = agreed_encryption("n", Some(valid(&file("100.64.0.0/24", 51820))), &stored)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network n: encrypted network first has other secure underlay settings (port 51999 there, 51820 requested)")
                && e.contains("give first's settings, or none"),
            "{e}"
        );
    }
}
