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

/// Does vxmesh's table exist in this namespace? One nfnetlink request
/// (`NFT_MSG_GETTABLE` for `inet vxmesh`), answered with the table or
/// `ENOENT`. `None` when the question could not be asked or the answer
/// was not understood: the caller then asks `nft`.
pub fn table_exists() -> Option<bool> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFTA_TABLE_NAME: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NFPROTO_INET: u8 = 1;
    let mut socket = Socket::new(NETLINK_NETFILTER).ok()?;
    socket.bind_auto().ok()?;
    socket.connect(&SocketAddr::new(0, 0)).ok()?;
    // nlmsghdr, nfgenmsg, then the name attribute (NUL-terminated, padded
    // to 4 bytes).
    let name = [TABLE.as_bytes(), &[0]].concat();
    let attr_len = 4 + name.len();
    let len = 16 + 4 + attr_len.div_ceil(4) * 4;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    msg.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]); // family, version, res_id
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    msg.extend_from_slice(&name);
    msg.resize(len, 0);
    socket.send(&msg, 0).ok()?;
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut &mut buf[..], 0).ok()?;
    // The first message answers: the table, or an error (-ENOENT: none).
    let header = buf.get(..16.min(n))?;
    if header.len() < 16 {
        return None;
    }
    let kind = u16::from_ne_bytes([header[4], header[5]]);
    if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
        return Some(true);
    }
    if kind == NLMSG_ERROR && n >= 20 {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if code == -libc::ENOENT {
            return Some(false);
        }
    }
    None
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
