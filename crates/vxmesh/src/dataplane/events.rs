//! Kernel change notifications: the agent listens on rtnetlink multicast groups
//! and wakes the reconciler as soon as someone touches what vxmesh owns (a
//! deleted route, neighbour, FDB entry, address or device), instead of waiting
//! for the next periodic pass.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::LinkAttribute;
use netlink_sys::AsyncSocket;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;

use super::expected::Expectation;
use super::expected_links::Verdict;
use crate::model;

/// Interface indexes of vxmesh's devices, shared with the watcher so that
/// neighbour/FDB/address events can be attributed.
pub type OwnedIndexes = Arc<Mutex<HashSet<u32>>>;

/// What `msg` asks of the agent. Neighbour, FDB and link events are
/// judged against the plan the agent applies (`expected`): its own
/// changes and the kernel's dynamic entries are not drift; container
/// veths coming and going wake it without forcing a full pass.
fn verdict(msg: &RouteNetlinkMessage, owned: &OwnedIndexes, expected: &Expectation) -> Verdict {
    let is_owned = |idx: u32| owned.lock().map(|s| s.contains(&idx)).unwrap_or(true);
    let drift = |yes: bool| if yes { Verdict::Drift } else { Verdict::Ignore };
    match msg {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => {
            let ours = is_owned(l.header.index)
                || l.attributes.iter().any(
                    |a| matches!(a, LinkAttribute::IfName(n) if n.starts_with(model::DEVICE_PREFIX)),
                );
            if !ours {
                return Verdict::Ignore;
            }
            let deleted = matches!(msg, RouteNetlinkMessage::DelLink(_));
            expected
                .lock()
                .map(|e| {
                    e.as_ref()
                        .map_or(Verdict::Drift, |e| e.links.verdict(l, deleted))
                })
                .unwrap_or(Verdict::Drift)
        }
        RouteNetlinkMessage::DelRoute(r) => {
            drift(u8::from(r.header.protocol) == model::ROUTE_PROTOCOL)
        }
        RouteNetlinkMessage::NewRoute(r) => {
            // Someone may have replaced one of our routes with a foreign one.
            drift(
                u8::from(r.header.protocol) != model::ROUTE_PROTOCOL
                    && r.attributes.iter().any(|a| {
                        matches!(a, netlink_packet_route::route::RouteAttribute::Oif(i) if is_owned(*i))
                    }),
            )
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            let added = matches!(msg, RouteNetlinkMessage::NewNeighbour(_));
            drift(
                is_owned(n.header.ifindex)
                    && expected
                        .lock()
                        .map(|e| e.as_ref().is_none_or(|e| e.drift(n, added)))
                        .unwrap_or(true),
            )
        }
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            drift(is_owned(a.header.index))
        }
        _ => Verdict::Ignore,
    }
}

/// What the watcher reports: a wake-up, and a count of relevant events so the
/// agent can tell whether the kernel was touched since it last looked.
#[derive(Debug, Default)]
pub struct KernelEvents {
    pub notify: Notify,
    count: AtomicU64,
    lost: AtomicBool,
    overruns: AtomicU64,
}

impl KernelEvents {
    /// Relevant events seen so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// False once the notification stream ended (socket overflow or
    /// close): from then on only a dump tells what the kernel holds.
    pub fn reliable(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }

    /// Count one relevant event and wake the agent.
    pub fn record(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Wake the agent for a pass without saying the kernel drifted.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Times the notification socket overflowed (events lost).
    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::SeqCst)
    }

    /// The socket overflowed: events were lost, so whatever they said
    /// counts as drift (the next pass dumps and diffs).
    pub fn overrun(&self) {
        self.overruns.fetch_add(1, Ordering::SeqCst);
        self.record();
    }

    fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.record();
    }
}

/// The rtnetlink notification socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("subscribe to rtnetlink notifications: {io}")]
pub struct SubscribeError {
    pub io: std::io::Error,
}

/// Start listening in the calling thread's namespace (call from inside the
/// runtime, in the namespace the agent serves). Every relevant event is
/// recorded in `events`; neighbour and FDB events only when they
/// contradict `expected` (see [`super::expected`]).
pub fn spawn_watcher(
    owned: OwnedIndexes,
    expected: Expectation,
    events: Arc<KernelEvents>,
) -> Result<tokio::task::JoinHandle<()>, SubscribeError> {
    let (mut conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Ifaddr,
    ])
    .map_err(|io| SubscribeError { io })?;
    enlarge_receive_buffer(conn.socket_mut().socket_mut());
    tokio::spawn(conn);
    Ok(tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            observe(&msg.payload, &owned, &expected, &events);
        }
        // The socket closed: ask for a full pass so nothing is missed.
        tracing::warn!("rtnetlink notification stream ended; relying on periodic passes");
        events.mark_lost();
    }))
}

/// Judge one message from the notification socket and tell `events`.
fn observe(
    payload: &NetlinkPayload<RouteNetlinkMessage>,
    owned: &OwnedIndexes,
    expected: &Expectation,
    events: &KernelEvents,
) {
    match payload {
        NetlinkPayload::InnerMessage(inner) => match verdict(inner, owned, expected) {
            Verdict::Drift => {
                tracing::debug!("kernel event on owned object: {}", event_name(inner));
                events.record();
            }
            Verdict::Wake => events.wake(),
            Verdict::Ignore => {}
        },
        // netlink-proto's word for ENOBUFS on the socket.
        NetlinkPayload::Overrun(_) => {
            tracing::info!(
                "rtnetlink notifications lost (receive buffer full): next pass dumps and repairs"
            );
            events.overrun();
        }
        _ => {}
    }
}

/// Receive buffer asked for the notification socket: a first pass or a
/// resync of a large cluster raises thousands of notifications in a burst,
/// more than the default (`net.core.rmem_default`, ~200 KiB) holds.
const EVENT_RCVBUF: usize = 8 << 20;

/// Enlarge the notification socket's receive buffer (this socket only):
/// `SO_RCVBUFFORCE` as root, else `SO_RCVBUF` (capped by
/// `net.core.rmem_max`). An overflow is still handled (a full pass).
fn enlarge_receive_buffer(socket: &netlink_sys::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &EVENT_RCVBUF).is_ok() {
        return;
    }
    if let Err(e) = setsockopt(socket, sockopt::RcvBuf, &EVENT_RCVBUF) {
        tracing::debug!("enlarging the rtnetlink notification buffer: {e}");
    }
}

fn event_name(m: &RouteNetlinkMessage) -> &'static str {
    match m {
        RouteNetlinkMessage::NewLink(_) => "new link",
        RouteNetlinkMessage::DelLink(_) => "deleted link",
        RouteNetlinkMessage::NewRoute(_) => "new route",
        RouteNetlinkMessage::DelRoute(_) => "deleted route",
        RouteNetlinkMessage::NewNeighbour(_) => "new neighbour/fdb",
        RouteNetlinkMessage::DelNeighbour(_) => "deleted neighbour/fdb",
        RouteNetlinkMessage::NewAddress(_) => "new address",
        RouteNetlinkMessage::DelAddress(_) => "deleted address",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::NodePlan;
    use crate::dataplane::expected::Expected;

    #[test]
    fn an_overflow_counts_as_drift_and_own_link_creations_do_not() {
        let owned: OwnedIndexes = Arc::default();
        let plan = NodePlan::default();
        let expected: Expectation =
            Arc::new(Mutex::new(Some(Expected::of(&plan, &Default::default()))));
        let events = KernelEvents::default();
        // The agent trusts the kernel while the count stands still: an
        // overflow must move it (events were lost, a full pass follows).
        observe(
            &NetlinkPayload::Overrun(Vec::new()),
            &owned,
            &expected,
            &events,
        );
        assert_eq!(events.count(), 1);
        assert_eq!(events.overruns(), 1);
        assert!(events.reliable(), "the stream goes on after an overflow");
        // A container veth's creation wakes the agent without counting.
        let mut l = netlink_packet_route::link::LinkMessage::default();
        l.header.index = 9;
        l.attributes
            .push(LinkAttribute::IfName("vxm-00aabbccdd".into()));
        observe(
            &NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)),
            &owned,
            &expected,
            &events,
        );
        assert_eq!(events.count(), 1);
    }

    #[test]
    fn the_notification_buffer_is_enlarged() {
        let s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).unwrap();
        let before = s.get_rx_buf_sz().unwrap();
        enlarge_receive_buffer(&s);
        let after = s.get_rx_buf_sz().unwrap();
        assert!(after > before, "receive buffer {before} -> {after}");
    }
}
