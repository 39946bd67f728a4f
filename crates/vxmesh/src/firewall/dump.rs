//! What vxmesh's table holds, read from `nft -j list table inet vxmesh`:
//! sets with their elements, chains, rules (with handles) and the named
//! counter. Nothing outside the table is read.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nftables::types::{NfChainPolicy, NfChainType, NfHook};
use serde_json::Value;

use super::ruleset::Elem;

/// A set as the kernel holds it. Elements nft prints in a form vxmesh never
/// writes are kept as JSON (`other`): they are extra.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActualSet {
    pub kind: String,
    pub interval: bool,
    pub elems: BTreeSet<Elem>,
    pub other: Vec<Value>,
}

/// A chain as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActualChain {
    pub hook: Option<(NfChainType, NfHook, i32)>,
    pub policy: Option<NfChainPolicy>,
}

/// A rule as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActualRule {
    pub handle: u64,
    pub comment: Option<String>,
    pub expr: Vec<Value>,
}

/// vxmesh's table as dumped; `None` from [`parse`] when there is no table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActualTable {
    pub sets: BTreeMap<String, ActualSet>,
    pub chains: BTreeMap<String, ActualChain>,
    /// Rules per chain, in chain order.
    pub rules: BTreeMap<String, Vec<ActualRule>>,
    /// Named counters: (packets, bytes).
    pub counters: BTreeMap<String, (u64, u64)>,
    /// Objects of other kinds (maps, quotas...): vxmesh writes none.
    pub other: Vec<String>,
}

/// The dump could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("unexpected `nft -j` output: {0}")]
pub struct DumpError(pub String);

fn str_field<'v>(o: &'v Value, k: &str) -> Option<&'v str> {
    o.get(k).and_then(Value::as_str)
}

/// An element as nft prints it: `"1.2.3.4"`, `4789`, `{"prefix": {...}}`.
pub fn parse_elem(v: &Value) -> Option<Elem> {
    match v {
        Value::String(s) => s.parse::<Ipv4Addr>().ok().map(Elem::Addr),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map(Elem::Port),
        Value::Object(o) => {
            // `{"elem": {"val": ...}}` when an element carries options.
            if let Some(inner) = o.get("elem").and_then(|e| e.get("val")) {
                return parse_elem(inner);
            }
            let p = o.get("prefix")?;
            let addr: Ipv4Addr = str_field(p, "addr")?.parse().ok()?;
            let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
            Ipv4Net::new(addr, len).ok().map(Elem::net)
        }
        _ => None,
    }
}

fn parse_set(o: &Value) -> ActualSet {
    let mut s = ActualSet {
        kind: o
            .get("type")
            .map(|t| match t {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default(),
        interval: o
            .get("flags")
            .map(|f| {
                f == "interval"
                    || f.as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "interval"))
            })
            .unwrap_or(false),
        ..Default::default()
    };
    for e in o
        .get("elem")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match parse_elem(e) {
            Some(el) => {
                s.elems.insert(el);
            }
            None => s.other.push(e.clone()),
        }
    }
    s
}

fn parse_chain(o: &Value) -> Result<ActualChain, DumpError> {
    let hook = match (o.get("type"), o.get("hook"), o.get("prio")) {
        (Some(t), Some(h), Some(p)) => {
            let t: NfChainType =
                serde_json::from_value(t.clone()).map_err(|e| DumpError(e.to_string()))?;
            let h: NfHook =
                serde_json::from_value(h.clone()).map_err(|e| DumpError(e.to_string()))?;
            let p = p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| DumpError(format!("chain prio {p}")))?;
            Some((t, h, p))
        }
        _ => None,
    };
    let policy = match o.get("policy") {
        Some(p) => Some(serde_json::from_value(p.clone()).map_err(|e| DumpError(e.to_string()))?),
        None => None,
    };
    Ok(ActualChain { hook, policy })
}

/// Parse the JSON of `nft -j list table inet vxmesh`.
pub fn parse(text: &str) -> Result<ActualTable, DumpError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| DumpError(e.to_string()))?;
    let objs = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| DumpError("no \"nftables\" array".into()))?;
    let mut t = ActualTable::default();
    for obj in objs {
        let Some((kind, o)) = obj.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        let name = || str_field(o, "name").unwrap_or_default().to_string();
        match kind.as_str() {
            "metainfo" | "table" => {}
            "set" => {
                t.sets.insert(name(), parse_set(o));
            }
            "chain" => {
                t.chains.insert(name(), parse_chain(o)?);
                t.rules.entry(name()).or_default();
            }
            "rule" => {
                let chain = str_field(o, "chain").unwrap_or_default().to_string();
                t.rules.entry(chain).or_default().push(ActualRule {
                    handle: o.get("handle").and_then(Value::as_u64).unwrap_or_default(),
                    comment: str_field(o, "comment").map(str::to_string),
                    expr: o
                        .get("expr")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                });
            }
            // Read by hand: the counts outgrow the u32 of the crate's schema.
            "counter" => {
                let n = |k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
                t.counters.insert(name(), (n("packets"), n("bytes")));
            }
            other => t.other.push(format!("{other} {}", name())),
        }
    }
    Ok(t)
}
