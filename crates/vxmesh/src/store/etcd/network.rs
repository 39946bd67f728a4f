//! Network configs: create (idempotent), read, delete.

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::client::{ClientOptions, connect, op, txn_get};
use super::records::{self, Keys};
use crate::config::Network;
use crate::store::error::{Result, StoreError};

/// Validate a network given as in a cluster file (`vxmesh net create`),
/// with the cluster file's rules and messages.
pub fn validate_network(file: &crate::config::NetworkFile) -> Result<Network> {
    records::validate_network(file).map_err(|e| StoreError::invalid("", e))
}

/// Write network `net` under `prefix` (validated first). Idempotent: an
/// identical existing config is fine; a different one is an error.
pub async fn create_network(client: &ClientOptions, prefix: &str, net: &Network) -> Result<()> {
    records::check_prefix(prefix).map_err(|e| StoreError::invalid("prefix", e))?;
    let valid = records::validate_network(&records::network_file(net))
        .map_err(|e| StoreError::invalid("", e))?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, &net.name);
    let key = keys.config();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), records::network_json(&valid), None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = op(format!("create {key}"), c.kv_client().txn(txn)).await?;
    if resp.succeeded() {
        tracing::info!(network = %net.name, key = %key, "network created");
        return Ok(());
    }
    let stored = txn_get(&resp)
        .map(|kv| kv.value().to_vec())
        .unwrap_or_default();
    match records::parse_network(&net.name, &stored) {
        Ok(s) if s == valid => Ok(()),
        Ok(s) => Err(StoreError::Conflict(format!(
            "network {} already exists with different settings ({}): delete it first",
            net.name,
            records::network_diff(&s, &valid)
        ))),
        Err(e) => Err(StoreError::Conflict(format!(
            "network {} already exists but its stored config at {key} is invalid ({e}): delete it first",
            net.name
        ))),
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
