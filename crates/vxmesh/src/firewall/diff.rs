//! Compare the desired table with the dumped one (pure): the changes that
//! make the kernel match, each naming what drifted. Set elements are added
//! and deleted one by one; a chain whose rules drifted is rewritten whole
//! (flush and add, in the same transaction); a chain of vxmesh's the plan
//! no longer has is deleted; a table holding a chain or set of another
//! shape, or anything vxmesh never writes, is rebuilt.

use std::collections::BTreeSet;
use std::fmt;

use super::dump::{ActualRule, ActualTable};
use super::ruleset::{CHAINS, COUNTERS, ChainDef, Desired, Elem, RuleDef, SetDef};

/// One change to vxmesh's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FwChange {
    /// Create the table and everything in it.
    Create,
    /// Delete the table (the node serves no network any more).
    Delete,
    /// Delete and recreate the table (its shape drifted).
    Rebuild {
        reasons: Vec<String>,
    },
    AddCounter(&'static str),
    AddSet(SetDef),
    AddChain(ChainDef),
    Elements {
        set: &'static str,
        add: Vec<Elem>,
        delete: Vec<Elem>,
    },
    /// Flush the chain and add its planned rules.
    RewriteChain {
        chain: &'static str,
        reasons: Vec<String>,
    },
    /// Delete one of vxmesh's chains the plan no longer has (its rules
    /// go with it): the NAT chains once nothing needs NAT.
    DeleteChain(ChainDef),
}

impl FwChange {
    /// Order within one transaction: containers before contents.
    fn rank(&self) -> u8 {
        match self {
            FwChange::Delete | FwChange::Rebuild { .. } | FwChange::Create => 0,
            FwChange::AddCounter(_) => 1,
            FwChange::AddSet(_) => 2,
            FwChange::AddChain(_) => 3,
            FwChange::Elements { .. } => 4,
            FwChange::RewriteChain { .. } => 5,
            FwChange::DeleteChain(_) => 6,
        }
    }
}

fn list(v: &[Elem]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for FwChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FwChange::Create => write!(f, "nft add table inet vxmesh"),
            FwChange::Delete => write!(f, "nft delete table inet vxmesh"),
            FwChange::Rebuild { reasons } => {
                write!(f, "nft rebuild table inet vxmesh ({})", reasons.join("; "))
            }
            FwChange::AddCounter(name) => write!(f, "nft add counter inet vxmesh {name}"),
            FwChange::AddSet(s) => write!(f, "nft add set inet vxmesh {}", s.name),
            FwChange::AddChain(c) => write!(f, "nft add chain inet vxmesh {}", c.name),
            FwChange::Elements { set, add, delete } => {
                let mut parts = Vec::new();
                if !add.is_empty() {
                    parts.push(format!("add element inet vxmesh {set} {{ {} }}", list(add)));
                }
                if !delete.is_empty() {
                    parts.push(format!(
                        "delete element inet vxmesh {set} {{ {} }}",
                        list(delete)
                    ));
                }
                write!(f, "nft {}", parts.join("; "))
            }
            FwChange::RewriteChain { chain, reasons } => {
                write!(
                    f,
                    "nft rewrite chain inet vxmesh {chain} ({})",
                    reasons.join("; ")
                )
            }
            FwChange::DeleteChain(c) => write!(f, "nft delete chain inet vxmesh {}", c.name),
        }
    }
}

/// What is wrong with the rules of one chain, rule by rule (empty: as planned).
pub fn rule_drift(chain: &str, want: &[RuleDef], have: &[ActualRule]) -> Vec<String> {
    let mut out = Vec::new();
    for w in want {
        match have
            .iter()
            .find(|h| h.comment.as_deref() == Some(w.comment.as_str()))
        {
            None => out.push(format!("rule \"{}\" missing from chain {chain}", w.comment)),
            Some(h) if h.expr != w.expr => {
                out.push(format!("rule \"{}\" in chain {chain} differs", w.comment))
            }
            Some(_) => {}
        }
    }
    for h in have {
        let planned = h
            .comment
            .as_deref()
            .is_some_and(|c| want.iter().any(|w| w.comment == c));
        if !planned {
            out.push(format!(
                "unplanned rule (handle {}{}) in chain {chain}",
                h.handle,
                h.comment
                    .as_deref()
                    .map(|c| format!(", \"{c}\""))
                    .unwrap_or_default()
            ));
        }
    }
    let planned_order: Vec<Option<&str>> = want.iter().map(|w| Some(w.comment.as_str())).collect();
    let kernel_order: Vec<Option<&str>> = have.iter().map(|h| h.comment.as_deref()).collect();
    if out.is_empty() && planned_order != kernel_order {
        out.push(format!("rules of chain {chain} out of order"));
    }
    out
}

/// Why the existing table cannot be repaired in place (empty: it can).
fn shape_drift(d: &Desired, a: &ActualTable) -> Vec<String> {
    let mut out = Vec::new();
    for (name, s) in &a.sets {
        match d.sets.iter().find(|(def, _)| def.name == name) {
            None => out.push(format!("unplanned set {name}")),
            Some((def, _)) => {
                if s.kind != def.kind || s.interval != def.interval {
                    out.push(format!("set {name} is not of the planned type"));
                }
                if !s.other.is_empty() {
                    out.push(format!("set {name} holds elements vxmesh never writes"));
                }
            }
        }
    }
    for (name, c) in &a.chains {
        match d.chains.iter().find(|def| def.name == name) {
            // One of vxmesh's chains the plan does not need now: deleted.
            None if owned_chain(name).is_some_and(|def| def.hook == c.hook) => {}
            None => out.push(format!("unplanned chain {name}")),
            Some(def) if def.hook != c.hook || def.policy() != c.policy => {
                out.push(format!("chain {name} is not hooked as planned"))
            }
            Some(_) => {}
        }
    }
    for name in a
        .counters
        .keys()
        .filter(|n| !COUNTERS.contains(&n.as_str()))
    {
        out.push(format!("unplanned counter {name}"));
    }
    for o in &a.other {
        out.push(format!("unplanned object {o}"));
    }
    out
}

/// The changes that turn `actual` into `desired`, in transaction order.
pub fn diff(desired: Option<&Desired>, actual: Option<&ActualTable>) -> Vec<FwChange> {
    let (d, a) = match (desired, actual) {
        (None, None) => return vec![],
        (None, Some(_)) => return vec![FwChange::Delete],
        (Some(_), None) => return vec![FwChange::Create],
        (Some(d), Some(a)) => (d, a),
    };
    let reasons = shape_drift(d, a);
    if !reasons.is_empty() {
        return vec![FwChange::Rebuild { reasons }];
    }
    let mut out = Vec::new();
    for name in COUNTERS {
        if !a.counters.contains_key(name) {
            out.push(FwChange::AddCounter(name));
        }
    }
    for (def, want) in &d.sets {
        match a.sets.get(def.name) {
            None => {
                out.push(FwChange::AddSet(*def));
                if !want.is_empty() {
                    out.push(FwChange::Elements {
                        set: def.name,
                        add: want.iter().copied().collect(),
                        delete: vec![],
                    });
                }
            }
            Some(s) => {
                let add: Vec<Elem> = want.difference(&s.elems).copied().collect();
                let delete: Vec<Elem> = s.elems.difference(want).copied().collect();
                if !add.is_empty() || !delete.is_empty() {
                    out.push(FwChange::Elements {
                        set: def.name,
                        add,
                        delete,
                    });
                }
            }
        }
    }
    for def in &d.chains {
        let want = d.rules.get(def.name).map(Vec::as_slice).unwrap_or(&[]);
        let reasons = match a.chains.get(def.name) {
            None => {
                out.push(FwChange::AddChain(*def));
                let mut r = vec![format!("chain {} missing", def.name)];
                r.extend(
                    want.iter()
                        .map(|w| format!("rule \"{}\" missing from chain {}", w.comment, def.name)),
                );
                if want.is_empty() { vec![] } else { r }
            }
            Some(_) => {
                let have = a.rules.get(def.name).map(Vec::as_slice).unwrap_or(&[]);
                rule_drift(def.name, want, have)
            }
        };
        if !reasons.is_empty() {
            out.push(FwChange::RewriteChain {
                chain: def.name,
                reasons,
            });
        }
    }
    // Chains no longer planned: base chains first, so the jumps into a
    // regular one are gone before it goes.
    let mut unplanned: Vec<ChainDef> = a
        .chains
        .keys()
        .filter(|name| !d.chains.iter().any(|def| def.name == name.as_str()))
        .filter_map(|name| owned_chain(name))
        .collect();
    unplanned.sort_by_key(|def| def.hook.is_none());
    out.extend(unplanned.into_iter().map(FwChange::DeleteChain));
    out.sort_by_key(FwChange::rank);
    out
}

/// The definition of a chain vxmesh may keep, by name.
fn owned_chain(name: &str) -> Option<ChainDef> {
    CHAINS.iter().find(|def| def.name == name).copied()
}

/// Elements of `set` the plan wants that the kernel lacks (for `doctor`).
pub fn missing_elements(changes: &[FwChange], set: &str) -> BTreeSet<Elem> {
    changes
        .iter()
        .filter_map(|c| match c {
            FwChange::Elements { set: s, add, .. } if *s == set => Some(add.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect()
}
