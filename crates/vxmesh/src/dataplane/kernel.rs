//! The netlink layer: a thin typed wrapper over rtnetlink.
//!
//! - [`Netlink`] is bound to one network namespace (chosen at connect time)
//!   and usable from any task afterwards.
//! - Generic operations (links, addresses, routes) used by attach, the lab
//!   and CNI live in `ops.rs`; every error names the device, the peer and the
//!   namespace.
//! - Errors: `error.rs` ([`KernelError`]: the kernel's errno and message;
//!   [`NetlinkError`]: which operation, device and namespace); `report.rs`
//!   (what an apply sent, and every failed change as a [`ChangeError`]).
//! - `apply.rs` sends changes, `reconcile.rs` runs dump -> diff -> apply,
//!   `teardown.rs` removes what vxmesh owns.
//! - [`Netlink::dump`] reads everything vxmesh owns into an [`ActualState`]
//!   (one dump per object type); [`crate::dataplane::diff::diff`] compares it
//!   with a [`NodePlan`](crate::dataplane::NodePlan); [`Netlink::apply`] sends
//!   the changes phase by phase; [`reconcile`] does all three.
//!
//! Requests are raw `RTM_*` messages built in `msg.rs`, so every flag
//! (`NLM_F_REPLACE`, `NTF_SELF`, `RTNH_F_ONLINK`) is explicit. Single requests
//! and dumps go through [`rtnetlink::Handle::request`]; apply sends its
//! requests in batches (many messages per datagram, several datagrams queued)
//! on a second socket of the same namespace, because netlink-proto writes one
//! queued request per wake-up of its connection task. In a batch only the
//! last request asks for an ack; the kernel still answers every failed one
//! with an error, in order, so the batch's ack means every earlier request
//! was handled, and the errors that came before it are matched to their
//! requests by sequence number (see [`Netlink::batch`]). The sockets ask for
//! extended acks, so kernel error strings ("A VXLAN device with the specified
//! VNI already exists") reach the error messages.
//!
//! Kernel behaviours this layer relies on or works around:
//! - `IFLA_IFALIAS` is ignored when a device is created: the alias (vxmesh's
//!   ownership mark) is set by a second request right after.
//! - A bridge's MTU follows its ports' minimum (1500 with no port) unless it
//!   was changed after creation: bridges are created one byte off and set.
//! - The kernel runs one dump at a time per socket (EBUSY): dumps are
//!   serialised.
//! - Onlink routes that differ only by gateway share a kernel hash chain unless
//!   their metrics differ: see [`route_metric`].

mod actual;
mod apply;
mod error;
mod msg;
mod ops;
mod reconcile;
mod report;
mod teardown;

use std::collections::HashMap;
use std::fmt;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::AsyncSocket;

pub use actual::{
    ActualFdb, ActualLink, ActualNeigh, ActualRoute, ActualState, ActualVxlan, Ownership,
};
use error::kernel_error;
pub use error::{KernelError, NetlinkError};
pub use ops::{InterfaceFacts, LinkInfo, LinkOptions};
pub use reconcile::{
    ReconcileError, ReconcileReport, Staged, reconcile, reconcile_from, reconcile_local,
    split_entries,
};
pub use report::{ApplyError, ApplyFailure, ApplyReport, ChangeError, ChangeFailure};
pub use teardown::{TeardownError, TeardownReport};

use crate::dataplane::netns::{self, Netns, NetnsError};
use crate::model;

/// Alias prefix of the devices the reconciler manages (`vxmesh:net:NETWORK`).
pub const MANAGED_ALIAS_PREFIX: &str = "vxmesh:net:";
/// Alias prefix of container veths made by attach (`vxmesh:veth:...`): owned
/// by vxmesh, never touched by the reconciler.
pub const ATTACHED_ALIAS_PREFIX: &str = crate::names::VethAlias::PREFIX;

const _: () = {
    // Both prefixes extend the model's owner marker.
    let a = model::OWNER_ALIAS_PREFIX.as_bytes();
    let m = MANAGED_ALIAS_PREFIX.as_bytes();
    let v = ATTACHED_ALIAS_PREFIX.as_bytes();
    let mut i = 0;
    while i < a.len() {
        assert!(a[i] == m[i] && a[i] == v[i]);
        i += 1;
    }
};

/// The metric vxmesh gives its route to `dst`: the subnet's index within
/// its /(prefix-12) (so consecutive node subnets get distinct metrics).
///
/// Why not 0: the kernel hashes a route's nexthop info by (protocol, scope,
/// metric, device) but not by gateway, so thousands of onlink routes that
/// differ only by gateway share one hash chain and each insert walks it:
/// 10 000 peer routes take 2-5 s of kernel time with metric 0 and ~0.2 s with
/// spread metrics. The metric never changes routing: vxmesh has one route per
/// prefix, and the metric only ranks routes to the same prefix.
pub fn route_metric(dst: Ipv4Net) -> u32 {
    let host_bits = 32 - u32::from(dst.prefix_len());
    if host_bits >= 32 {
        return 0;
    }
    (u32::from(dst.network()) >> host_bits) & 0x0fff
}

/// Receive buffer of the sockets: large dumps and bursts of acks fit.
const RCVBUF_BYTES: usize = 4 << 20;
/// Requests per datagram on the batch connection. The kernel handles them
/// all before `sendmsg` returns and answers the failed ones and the last.
const BATCH_SIZE: usize = 128;
/// Batches queued at once on the batch connection.
const BATCHES_IN_FLIGHT: usize = 4;

/// One rtnetlink connection bound to a network namespace.
///
/// Cheap to clone (clones share the connection). The connection task runs on
/// the tokio runtime that was current at connect time and ends when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// A second socket for pipelined batches (acks forwarded, see [`Netlink::batch`]).
    batch: netlink_proto::ConnectionHandle<RouteNetlinkMessage>,
    /// Errors of the batch socket's un-acked requests.
    batch_errors: Arc<std::sync::Mutex<BatchErrors>>,
    ns: Arc<Netns>,
    label: Arc<str>,
    /// The kernel runs one dump at a time per socket (EBUSY otherwise).
    dump_lock: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("namespace", &self.label)
            .finish()
    }
}

type Connection = netlink_proto::Connection<RouteNetlinkMessage>;
type Unsolicited = futures::channel::mpsc::UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

/// The errors of requests sent without `NLM_F_ACK`: netlink-proto hands
/// them over as unsolicited messages. Drained by whichever batch finishes
/// first; errors of batches still in flight wait in `parked`.
struct BatchErrors {
    rx: Unsolicited,
    parked: HashMap<u32, KernelError>,
    /// Receive-buffer overruns seen so far (netlink-proto reports each as an
    /// `Overrun` message): errors may have been lost with them.
    overruns: u64,
}

impl BatchErrors {
    fn new(rx: Unsolicited) -> Arc<std::sync::Mutex<Self>> {
        Arc::new(std::sync::Mutex::new(BatchErrors {
            rx,
            parked: HashMap::new(),
            overruns: 0,
        }))
    }

    /// Move everything received so far into `parked`.
    fn drain(&mut self) {
        while let Ok((m, _)) = self.rx.try_recv() {
            match &m.payload {
                NetlinkPayload::Error(e) => {
                    if let Some(err) = kernel_error(m.header.flags, e) {
                        self.parked.insert(m.header.sequence_number, err);
                    }
                }
                NetlinkPayload::Overrun(_) => self.overruns += 1,
                _ => {}
            }
        }
    }

    fn lock(this: &std::sync::Mutex<Self>) -> std::sync::MutexGuard<'_, Self> {
        this.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Socket options: extended acks (kernel error strings), capped acks (an
/// error carries the request header only) and a large receive buffer.
fn tune(sock: &netlink_sys::Socket) {
    // Best effort: failures only lose error strings or buffer room.
    let _ = sock.set_ext_ack(true);
    let _ = sock.set_cap_ack(true);
    let size = RCVBUF_BYTES as libc::c_int;
    // SAFETY: plain setsockopt on a valid fd with a c_int value.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = sock.set_rx_buf_sz(RCVBUF_BYTES);
    }
}

/// The two connections (requests and dumps; batches) and the batch
/// connection's channel of unsolicited errors.
type Sockets = (
    Connection,
    rtnetlink::Handle,
    Connection,
    netlink_proto::ConnectionHandle<RouteNetlinkMessage>,
    Unsolicited,
);

/// Both sockets, created in the calling thread's namespace (inside a tokio
/// runtime context).
fn new_sockets() -> std::io::Result<Sockets> {
    let (mut conn, handle, _unsolicited) = rtnetlink::new_connection()?;
    tune(conn.socket_mut().socket_mut());
    let (mut bconn, bhandle, errors) = netlink_proto::new_connection::<RouteNetlinkMessage>(
        netlink_sys::protocols::NETLINK_ROUTE,
    )?;
    bconn.set_forward_ack(true);
    tune(bconn.socket_mut().socket_mut());
    Ok((conn, handle, bconn, bhandle, errors))
}

/// A readable name for the calling thread's namespace: its `/run/netns` name
/// if it has one, "the root namespace" for PID 1's.
fn describe_current_namespace() -> String {
    let Ok(me) = std::fs::metadata("/proc/thread-self/ns/net") else {
        return "the current namespace".into();
    };
    if let Ok(init) = std::fs::metadata("/proc/1/ns/net")
        && init.ino() == me.ino()
        && init.dev() == me.dev()
    {
        return "the root namespace".into();
    }
    for name in netns::list("") {
        if let Ok(m) = std::fs::metadata(Path::new(netns::NETNS_DIR).join(&name))
            && m.ino() == me.ino()
            && m.dev() == me.dev()
        {
            return format!("namespace {name}");
        }
    }
    "the current namespace".into()
}

impl Netlink {
    /// Connect in the namespace of the calling thread. An async fn: call it
    /// from inside a tokio runtime (the connection task is spawned on it).
    pub async fn connect() -> Result<Self, NetlinkError> {
        let ns = Netns::current()?;
        let label = describe_current_namespace();
        let (conn, handle, bconn, batch, errors) =
            new_sockets().map_err(|io| NetlinkError::Connect {
                namespace: label.clone(),
                io,
            })?;
        tokio::spawn(conn);
        tokio::spawn(bconn);
        Ok(Netlink {
            handle,
            batch,
            batch_errors: BatchErrors::new(errors),
            ns: Arc::new(ns),
            label: label.into(),
            dump_lock: Default::default(),
        })
    }

    /// Connect inside `ns`: the socket is created on a short-lived thread that
    /// has entered `ns` (and the caller's tokio runtime, so the socket
    /// registers with its reactor); the handle is then usable from anywhere.
    /// An async fn: call it from inside a tokio runtime.
    pub async fn connect_in(ns: &Netns) -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Handle::current();
        let label = format!("namespace {}", ns.name());
        let inner = rt.clone();
        let (conn, handle, bconn, batch, errors) = ns
            .run(move || {
                let _guard = inner.enter();
                Ok::<_, NetnsError>(new_sockets())
            })?
            .map_err(|io| NetlinkError::Connect {
                namespace: label.clone(),
                io,
            })?;
        rt.spawn(conn);
        rt.spawn(bconn);
        Ok(Netlink {
            handle,
            batch,
            batch_errors: BatchErrors::new(errors),
            ns: Arc::new(ns.try_clone()?),
            label: label.into(),
            dump_lock: Default::default(),
        })
    }

    /// "namespace NAME", "the root namespace", ...: for messages.
    pub fn namespace(&self) -> &str {
        &self.label
    }

    /// The namespace this connection works in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The underlying rtnetlink handle, for requests this layer lacks.
    pub fn handle(&self) -> rtnetlink::Handle {
        self.handle.clone()
    }

    /// Run `f` on a thread inside this connection's namespace (sysctls).
    pub(crate) fn run_in_ns<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<NetnsError> + Send + 'static,
        F: FnOnce() -> Result<T, E> + Send + 'static,
    {
        self.ns.run(f)
    }

    /// Send one request that expects an ack (`extra` flags are added to
    /// `NLM_F_REQUEST | NLM_F_ACK`).
    pub(crate) async fn ack(
        &self,
        payload: RouteNetlinkMessage,
        extra: u16,
    ) -> Result<(), KernelError> {
        let mut msg = NetlinkMessage::from(payload);
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | extra;
        let mut handle = self.handle.clone();
        let mut resp = handle.request(msg).map_err(|_| KernelError::closed())?;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = &m.payload
                && let Some(err) = kernel_error(m.header.flags, e)
            {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Send `reqs` (payload, extra flags) as one datagram; the kernel handles
    /// them in order, answering the failed ones and the last (acked) one.
    /// Returns one result per request, in order.
    pub(crate) async fn batch(
        &self,
        reqs: Vec<(RouteNetlinkMessage, u16)>,
    ) -> Vec<Result<(), KernelError>> {
        use netlink_proto::ReplyExpectation::{Expected, NotExpected};
        let n = reqs.len();
        if n == 0 {
            return Vec::new();
        }
        // Only the last request is acked (and awaited); the kernel answers
        // the others only if they fail, as unsolicited messages.
        // An overrun while this batch is in flight makes its un-acked
        // requests' outcome unknown.
        let overruns_before = {
            let mut errors = BatchErrors::lock(&self.batch_errors);
            errors.drain();
            errors.overruns
        };
        let msgs = reqs.into_iter().enumerate().map(|(i, (payload, extra))| {
            let last = i + 1 == n;
            let mut m = NetlinkMessage::from(payload);
            m.header.flags = NLM_F_REQUEST | extra | if last { NLM_F_ACK } else { 0 };
            (m, if last { Expected } else { NotExpected })
        });
        let Ok(mut resp) = self
            .batch
            .request_batch_with_expectation(msgs, netlink_sys::SocketAddr::new(0, 0))
        else {
            return vec![Err(KernelError::closed()); n];
        };
        let mut last = None;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = &m.payload {
                last = Some((m.header.sequence_number, kernel_error(m.header.flags, e)));
            }
        }
        let Some((last_seq, last_err)) = last else {
            return vec![Err(KernelError::closed()); n];
        };
        // The connection numbers a batch's messages consecutively, and hands
        // over the errors of earlier requests before the last one's ack.
        let first_seq = last_seq.wrapping_sub(n as u32 - 1);
        let mut errors = BatchErrors::lock(&self.batch_errors);
        errors.drain();
        let overrun = errors.overruns != overruns_before;
        let mut out: Vec<Result<(), KernelError>> = (0..n as u32 - 1)
            .map(|i| match errors.parked.remove(&first_seq.wrapping_add(i)) {
                Some(e) => Err(e),
                None if overrun => Err(KernelError::overrun()),
                None => Ok(()),
            })
            .collect();
        out.push(last_err.map_or(Ok(()), Err));
        out
    }

    /// Send one request and collect the inner messages of the reply (a
    /// `NLM_F_DUMP` request when `dump`). A dump interrupted by a concurrent
    /// change (`NLM_F_DUMP_INTR`) is retried.
    pub(crate) async fn query(
        &self,
        payload: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, KernelError> {
        let _one_dump_at_a_time = if dump {
            Some(self.dump_lock.lock().await)
        } else {
            None
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut msg = NetlinkMessage::from(payload.clone());
            msg.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
            let mut handle = self.handle.clone();
            let mut resp = handle.request(msg).map_err(|_| KernelError::closed())?;
            let mut out = Vec::new();
            let mut interrupted = false;
            while let Some(m) = resp.next().await {
                interrupted |= m.header.flags & NLM_F_DUMP_INTR != 0;
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(e) => {
                        if let Some(err) = kernel_error(m.header.flags, &e) {
                            return Err(err);
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(KernelError {
                            errno: libc::ENOBUFS,
                            message: Some("netlink receive buffer overrun during a dump".into()),
                        });
                    }
                    _ => {}
                }
            }
            if !interrupted || attempt >= 5 {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_metrics_spread_consecutive_subnets() {
        let m = |s: &str| route_metric(s.parse().unwrap());
        assert_eq!(m("172.18.10.0/24"), 0x20a);
        assert_ne!(m("172.18.10.0/24"), m("172.18.11.0/24"));
        assert_eq!(m("172.18.20.64/26") - m("172.18.20.0/26"), 1);
        assert_eq!(m("0.0.0.0/0"), 0);
        assert!(m("10.0.0.1/32") < 4096);
    }

    /// The un-acked requests' side channel: errors are parked by sequence
    /// number, acks ignored, overruns counted.
    #[test]
    fn batch_errors_park_errors_and_count_overruns() {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let errors = BatchErrors::new(rx);
        let addr = netlink_sys::SocketAddr::new(0, 0);
        let send = |payload: NetlinkPayload<RouteNetlinkMessage>, seq: u32| {
            let mut m = NetlinkMessage::new(Default::default(), payload);
            m.header.sequence_number = seq;
            tx.unbounded_send((m, addr)).unwrap();
        };
        let mut nack = netlink_packet_core::ErrorMessage::default();
        nack.code = std::num::NonZeroI32::new(-libc::EINVAL);
        nack.header = vec![0; 16];
        let mut ack = netlink_packet_core::ErrorMessage::default();
        ack.header = vec![0; 16];
        send(NetlinkPayload::Error(nack), 7);
        send(NetlinkPayload::Error(ack), 8);
        send(NetlinkPayload::Overrun(Vec::new()), 0);
        let mut e = BatchErrors::lock(&errors);
        e.drain();
        assert_eq!(e.overruns, 1);
        assert_eq!(e.parked.len(), 1);
        assert_eq!(e.parked.remove(&7).map(|k| k.errno), Some(libc::EINVAL));
        e.drain();
        assert_eq!(e.overruns, 1, "nothing new");
    }
}
