//! nf_tables spoken directly over nfnetlink, for the two questions asked
//! most often: does vxmesh's table exist, and "add and delete these set
//! elements" (a peer joined or left). Everything else (the table's
//! creation, rules, repairs, dumps) goes through `nft` ([`super::nft`]).
//!
//! An `nft` process costs a few milliseconds of CPU; during a cold start of
//! a large cluster every node changes its peer set once per batch of
//! joins, and those processes were a tenth of the machine's CPU.

use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::ruleset::{Elem, SETS, TABLE};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;

/// Why a set-element transaction over nfnetlink did not happen.
#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error(
        "set {0} is not a plain set of addresses or ports (an interval set?): `nft` updates it"
    )]
    Unsupported(&'static str),
    #[error("nfnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("the kernel refused the change of set {set}: {err}")]
    Refused {
        set: &'static str,
        err: std::io::Error,
    },
    #[error("nfnetlink: no complete answer to the batch ({0})")]
    NoAnswer(&'static str),
}

/// One netlink message of the netfilter family under construction.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    /// The netlink and nfgen headers; `res_id` is big-endian on the wire.
    fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `done`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        buf.extend_from_slice(&[family, 0]); // family, NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        let len = self.buf.len().div_ceil(4) * 4;
        self.buf.resize(len, 0);
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// A NUL-terminated string attribute.
    fn str(&mut self, kind: u16, s: &str) -> &mut Msg {
        self.attr(kind, &[s.as_bytes(), &[0]].concat())
    }

    fn open(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn close(&mut self) -> &mut Msg {
        let at = self.nests.pop().expect("close after open");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn done(mut self) -> Vec<u8> {
        debug_assert!(self.nests.is_empty(), "every nest closed");
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn socket() -> Result<Socket, std::io::Error> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn receive_timeout(socket: &Socket, d: Duration) -> Result<(), std::io::Error> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Does vxmesh's table exist in this namespace? One nfnetlink request
/// (`NFT_MSG_GETTABLE` for `inet vxmesh`), answered with the table or
/// `ENOENT`. `None` when the question could not be asked or the answer
/// was not understood: the caller then asks `nft`.
pub fn table_exists() -> Option<bool> {
    let socket = socket().ok()?;
    let mut m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        NLM_F_ACK,
        1,
        NFPROTO_INET,
        0,
    );
    m.str(NFTA_TABLE_NAME, TABLE);
    socket.send(&m.done(), 0).ok()?;
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut &mut buf[..], 0).ok()?;
    // The first message answers: the table, or an error (-ENOENT: none).
    let (kind, code) = header(&buf[..n])?;
    if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
        return Some(true);
    }
    (kind == NLMSG_ERROR && code == Some(-libc::ENOENT)).then_some(false)
}

/// The type of the first message in `buf` and, for an error message, its
/// code (0: an acknowledgement).
fn header(buf: &[u8]) -> Option<(u16, Option<i32>)> {
    let kind = u16::from_ne_bytes(buf.get(4..6)?.try_into().ok()?);
    let code = buf
        .get(16..20)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
    Some((kind, if kind == NLMSG_ERROR { code } else { None }))
}

/// The key bytes of `e` in set `set`, as nf_tables stores them (network
/// order), if nfnetlink updates that set here: the plain (non-interval)
/// sets of addresses and ports.
fn key(set: &'static str, e: &Elem) -> Result<Vec<u8>, NfnlError> {
    let def = SETS.iter().find(|d| d.name == set);
    match (def, e) {
        (Some(d), Elem::Addr(a)) if !d.interval && d.kind == "ipv4_addr" => Ok(a.octets().to_vec()),
        (Some(d), Elem::Port(p)) if !d.interval && d.kind == "inet_service" => {
            Ok(p.to_be_bytes().to_vec())
        }
        _ => Err(NfnlError::Unsupported(set)),
    }
}

/// One set's change: its name, the elements to add and to delete.
pub type SetChange<'a> = (&'static str, &'a [Elem], &'a [Elem]);

/// The element messages of a batch that must be acknowledged: each one's
/// sequence number and set.
type Awaited = Vec<(u32, &'static str)>;

/// The batch (begin, one message per set and direction, end) and the
/// messages it awaits answers to.
fn batch(changes: &[SetChange<'_>]) -> Result<(Vec<u8>, Awaited), NfnlError> {
    let mut out = Msg::new(
        NFNL_MSG_BATCH_BEGIN,
        0,
        1,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
    )
    .done();
    let mut acks = Vec::new();
    let mut seq = 1;
    for &(set, add, delete) in changes {
        // Deletions first: an element leaving and coming back in one change
        // cannot happen (the diff holds each once), but the order is that
        // of `nft`'s transaction all the same.
        for (kind, flags, elems) in [
            (NFT_MSG_DELSETELEM, NLM_F_ACK, delete),
            (NFT_MSG_NEWSETELEM, NLM_F_ACK | NLM_F_CREATE, add),
        ] {
            if elems.is_empty() {
                continue;
            }
            seq += 1;
            let mut m = Msg::new(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                seq,
                NFPROTO_INET,
                0,
            );
            m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE)
                .str(NFTA_SET_ELEM_LIST_SET, set)
                .open(NFTA_SET_ELEM_LIST_ELEMENTS);
            for e in elems {
                m.open(NFTA_LIST_ELEM)
                    .open(NFTA_SET_ELEM_KEY)
                    .attr(NFTA_DATA_VALUE, &key(set, e)?)
                    .close()
                    .close();
            }
            m.close();
            out.extend_from_slice(&m.done());
            acks.push((seq, set));
        }
    }
    seq += 1;
    out.extend_from_slice(
        &Msg::new(
            NFNL_MSG_BATCH_END,
            0,
            seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        )
        .done(),
    );
    Ok((out, acks))
}

/// Add and delete elements of vxmesh's plain sets in one nf_tables
/// transaction (all or nothing, like `nft -f`), in the current namespace.
/// Interval sets are refused ([`NfnlError::Unsupported`]) before anything
/// is sent; so is an element whose type is not the set's.
pub fn update_elements(changes: &[SetChange<'_>]) -> Result<(), NfnlError> {
    let (msg, mut waiting) = batch(changes)?;
    if waiting.is_empty() {
        return Ok(());
    }
    let socket = socket().map_err(NfnlError::Socket)?;
    // Refusals carry only their header back, and no answer waits forever.
    socket.set_cap_ack(true).map_err(NfnlError::Socket)?;
    receive_timeout(&socket, Duration::from_secs(5)).map_err(NfnlError::Socket)?;
    socket.send(&msg, 0).map_err(NfnlError::Socket)?;
    let mut buf = vec![0u8; 65536];
    while !waiting.is_empty() {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(NfnlError::Socket)?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len < 16 || at + len > n {
                return Err(NfnlError::NoAnswer("a truncated message"));
            }
            let m = &buf[at..at + len];
            at += len.div_ceil(4) * 4;
            let Some((NLMSG_ERROR, Some(code))) = header(m) else {
                continue;
            };
            // The request's header follows the code: its sequence number.
            let Some(seq) = m
                .get(28..32)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
            else {
                return Err(NfnlError::NoAnswer("an error without its request"));
            };
            let set = waiting
                .iter()
                .find(|(s, _)| *s == seq)
                .map_or("(the batch)", |(_, set)| *set);
            if code != 0 {
                return Err(NfnlError::Refused {
                    set,
                    err: std::io::Error::from_raw_os_error(-code),
                });
            }
            waiting.retain(|(s, _)| *s != seq);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::ruleset::{OVERLAY_SET, PEERS_SET, PORTS_SET};

    /// The attributes of a message after its 20 bytes of headers, walked
    /// one level: (type without flags, payload).
    fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
            let kind = u16::from_ne_bytes([b[at + 2], b[at + 3]]) & !NLA_F_NESTED;
            out.push((kind, &b[at + 4..at + len]));
            at += len.div_ceil(4) * 4;
        }
        out
    }

    fn messages(b: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            out.push(&b[at..at + len]);
            at += len;
        }
        out
    }

    #[test]
    fn a_batch_deletes_then_adds_each_sets_elements_between_begin_and_end() {
        let add = [Elem::Addr("198.18.0.9".parse().unwrap())];
        let delete = [
            Elem::Addr("198.18.0.2".parse().unwrap()),
            Elem::Addr("198.18.0.3".parse().unwrap()),
        ];
        let ports = [Elem::Port(4789)];
        let (bytes, acks) = batch(&[(PEERS_SET, &add, &delete), (PORTS_SET, &ports, &[])]).unwrap();
        let msgs = messages(&bytes);
        let kinds: Vec<u16> = msgs
            .iter()
            .map(|m| u16::from_ne_bytes([m[4], m[5]]))
            .collect();
        let nft = |k| (NFNL_SUBSYS_NFTABLES << 8) | k;
        assert_eq!(
            kinds,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_DELSETELEM),
                nft(NFT_MSG_NEWSETELEM),
                nft(NFT_MSG_NEWSETELEM),
                NFNL_MSG_BATCH_END
            ]
        );
        // The batch names the nf_tables subsystem, big-endian.
        assert_eq!(&msgs[0][18..20], &[0, 10]);
        assert_eq!(acks, vec![(2, PEERS_SET), (3, PEERS_SET), (4, PORTS_SET)]);
        // Each element message: every header length right, table and set
        // named, one key per element in network order.
        let del = attrs(&msgs[1][20..]);
        assert_eq!(del[0], (NFTA_SET_ELEM_LIST_TABLE, &b"vxmesh\0"[..]));
        assert_eq!(del[1], (NFTA_SET_ELEM_LIST_SET, &b"vtep_peers\0"[..]));
        let elems = attrs(del[2].1);
        assert_eq!(elems.len(), 2);
        let key = attrs(elems[1].1);
        assert_eq!(key[0].0, NFTA_SET_ELEM_KEY);
        assert_eq!(
            attrs(key[0].1),
            vec![(NFTA_DATA_VALUE, &[198, 18, 0, 3][..])]
        );
        let port = attrs(attrs(attrs(attrs(&msgs[3][20..])[2].1)[0].1)[0].1);
        assert_eq!(port, vec![(NFTA_DATA_VALUE, &[0x12, 0xb5][..])]);
        // Only an add carries NLM_F_CREATE; all ask for an acknowledgement.
        let flags = |m: &[u8]| u16::from_ne_bytes([m[6], m[7]]);
        assert_eq!(flags(msgs[1]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(flags(msgs[2]), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
    }

    #[test]
    fn interval_sets_and_mismatched_elements_are_left_to_nft() {
        let net = [Elem::Addr("172.18.0.0".parse().unwrap())];
        assert!(matches!(
            batch(&[(OVERLAY_SET, &net, &[])]),
            Err(NfnlError::Unsupported(OVERLAY_SET))
        ));
        let port = [Elem::Port(4789)];
        assert!(matches!(
            batch(&[(PEERS_SET, &port, &[])]),
            Err(NfnlError::Unsupported(PEERS_SET))
        ));
        let (_, acks) = batch(&[(PEERS_SET, &[], &[])]).unwrap();
        assert!(acks.is_empty(), "nothing to send");
    }
}
