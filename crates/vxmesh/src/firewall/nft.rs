//! The kernel side: run Debian's `nft` in the caller's network namespace
//! (the JSON API through the `nftables` crate's schema), dump vxmesh's
//! table, and apply a list of changes as one atomic transaction.

use std::borrow::Cow;
use std::io::Write;
use std::process::{Command, Stdio};

use nftables::batch::Batch;
use nftables::expr::Expression;
use nftables::schema::{
    Chain, Counter, Element, FlushObject, NfCmd, NfListObject, Rule, Set, SetFlag, SetType,
    SetTypeValue, Table,
};
use nftables::stmt::Statement;
use nftables::types::NfFamily;

pub use super::nfnl::table_exists;

use super::diff::FwChange;
use super::dump::{self, ActualTable};
use super::ruleset::{COUNTERS, ChainDef, Desired, Elem, RuleDef, SetDef, TABLE};

/// Why talking to nftables failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` (install the nftables package; scripts/deps.sh does): {0}")]
    Spawn(std::io::Error),
    #[error("`nft {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("reading table inet {TABLE}: {0}")]
    Dump(#[from] dump::DumpError),
    #[error("a planned rule does not fit the nftables schema: {0}")]
    Schema(serde_json::Error),
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(NftError::Spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// vxmesh's table in this namespace; `None` when there is none. Whether
/// it exists is asked over nfnetlink first ([`table_exists`]): a node
/// starting for the first time has none, and an `nft` process (about
/// 3 ms of CPU) would only say so.
pub fn dump_table() -> Result<Option<ActualTable>, NftError> {
    if table_exists() == Some(false) {
        return Ok(None);
    }
    match run(&["-j", "list", "table", "inet", TABLE], None) {
        Ok(text) => Ok(Some(dump::parse(&text)?)),
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

fn chain(def: &ChainDef) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: def.name.into(),
        _type: def.hook.map(|h| h.0),
        hook: def.hook.map(|h| h.1),
        prio: def.hook.map(|h| h.2),
        policy: def.policy(),
        ..Chain::default()
    }
}

fn set(def: &SetDef) -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: def.name.into(),
        set_type: SetTypeValue::Single(if def.kind == "inet_service" {
            SetType::InetService
        } else {
            SetType::Ipv4Addr
        }),
        flags: def
            .interval
            .then(|| [SetFlag::Interval].into_iter().collect()),
        ..Set::default()
    }
}

fn elements(set: &str, elems: &[Elem]) -> Element<'static> {
    Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.to_string().into(),
        elem: Cow::Owned(elems.iter().map(Elem::expr).collect::<Vec<Expression>>()),
    }
}

fn rule(chain: &str, r: &RuleDef) -> Result<Rule<'static>, NftError> {
    let expr = r
        .expr
        .iter()
        .map(|v| serde_json::from_value::<Statement>(v.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(NftError::Schema)?;
    Ok(Rule {
        family: NfFamily::INet,
        table: TABLE.into(),
        chain: chain.to_string().into(),
        expr: Cow::Owned(expr),
        comment: Some(r.comment.clone().into()),
        ..Rule::default()
    })
}

fn add_chain_rules(b: &mut Batch<'static>, d: &Desired, chain: &str) -> Result<(), NftError> {
    for r in d.rules.get(chain).into_iter().flatten() {
        b.add(NfListObject::Rule(rule(chain, r)?));
    }
    Ok(())
}

fn counter(name: &'static str) -> Counter<'static> {
    Counter {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: name.into(),
        handle: None,
        packets: None,
        bytes: None,
    }
}

/// Everything `d` holds, added to an empty (or absent) table.
fn create(b: &mut Batch<'static>, d: &Desired) -> Result<(), NftError> {
    b.add(NfListObject::Table(table()));
    for name in COUNTERS {
        b.add(NfListObject::Counter(counter(name)));
    }
    for (def, elems) in &d.sets {
        b.add(NfListObject::Set(Box::new(set(def))));
        if !elems.is_empty() {
            let v: Vec<Elem> = elems.iter().copied().collect();
            b.add(NfListObject::Element(elements(def.name, &v)));
        }
    }
    for c in &d.chains {
        b.add(NfListObject::Chain(chain(c)));
    }
    for c in &d.chains {
        add_chain_rules(b, d, c.name)?;
    }
    Ok(())
}

/// The JSON transaction of `changes` (what `nft -j -f -` reads).
pub fn transaction(d: Option<&Desired>, changes: &[FwChange]) -> Result<String, NftError> {
    let mut b = Batch::new();
    for c in changes {
        match (c, d) {
            (FwChange::Delete, _) => b.delete(NfListObject::Table(table())),
            (FwChange::Rebuild { .. }, Some(d)) => {
                b.delete(NfListObject::Table(table()));
                create(&mut b, d)?;
            }
            (FwChange::Create, Some(d)) => create(&mut b, d)?,
            (FwChange::AddCounter(name), _) => b.add(NfListObject::Counter(counter(name))),
            (FwChange::AddSet(def), _) => b.add(NfListObject::Set(Box::new(set(def)))),
            (FwChange::AddChain(def), _) => b.add(NfListObject::Chain(chain(def))),
            (FwChange::DeleteChain(def), _) => b.delete(NfListObject::Chain(chain(def))),
            (FwChange::Elements { set, add, delete }, _) => {
                if !delete.is_empty() {
                    b.delete(NfListObject::Element(elements(set, delete)));
                }
                if !add.is_empty() {
                    b.add(NfListObject::Element(elements(set, add)));
                }
            }
            (FwChange::RewriteChain { chain: name, .. }, Some(d)) => {
                let def = d.chains.iter().find(|c| c.name == *name).copied();
                if let Some(def) = def {
                    b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(&def))));
                    add_chain_rules(&mut b, d, name)?;
                }
            }
            (_, None) => {}
        }
    }
    Ok(serde_json::to_string(&b.to_nftables()).expect("a batch serializes"))
}

/// Apply `changes` in one transaction: all of them or none.
pub fn apply(d: Option<&Desired>, changes: &[FwChange]) -> Result<(), NftError> {
    if changes.is_empty() {
        return Ok(());
    }
    let json = transaction(d, changes)?;
    run(&["-j", "-f", "-"], Some(&json)).map(drop)
}

/// `down`: delete vxmesh's table if there is one. Returns whether it existed.
pub fn delete_table() -> Result<bool, NftError> {
    match run(&["delete", "table", "inet", TABLE], None) {
        Ok(_) => Ok(true),
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
