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
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;

use super::expected::Expectation;
use crate::model;

/// Interface indexes of vxmesh's devices, shared with the watcher so that
/// neighbour/FDB/address events can be attributed.
pub type OwnedIndexes = Arc<Mutex<HashSet<u32>>>;

/// Whether `msg` may be drift of what vxmesh owns. Neighbour and FDB
/// events are judged against the plan the agent applies (`expected`):
/// its own changes and the kernel's dynamic entries do not count.
fn concerns_us(msg: &RouteNetlinkMessage, owned: &OwnedIndexes, expected: &Expectation) -> bool {
    let is_owned = |idx: u32| owned.lock().map(|s| s.contains(&idx)).unwrap_or(true);
    match msg {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => is_owned(
            l.header.index,
        ) || l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n.starts_with(model::DEVICE_PREFIX))),
        RouteNetlinkMessage::DelRoute(r) => u8::from(r.header.protocol) == model::ROUTE_PROTOCOL,
        RouteNetlinkMessage::NewRoute(r) => {
            // Someone may have replaced one of our routes with a foreign one.
            u8::from(r.header.protocol) != model::ROUTE_PROTOCOL
                && r.attributes.iter().any(|a| {
                    matches!(a, netlink_packet_route::route::RouteAttribute::Oif(i) if is_owned(*i))
                })
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            let added = matches!(msg, RouteNetlinkMessage::NewNeighbour(_));
            is_owned(n.header.ifindex)
                && expected
                    .lock()
                    .map(|e| e.as_ref().is_none_or(|e| e.drift(n, added)))
                    .unwrap_or(true)
        }
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            is_owned(a.header.index)
        }
        _ => false,
    }
}

/// What the watcher reports: a wake-up, and a count of relevant events so the
/// agent can tell whether the kernel was touched since it last looked.
#[derive(Debug, Default)]
pub struct KernelEvents {
    pub notify: Notify,
    count: AtomicU64,
    lost: AtomicBool,
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
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Ifaddr,
    ])
    .map_err(|io| SubscribeError { io })?;
    tokio::spawn(conn);
    Ok(tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(inner) = &msg.payload
                && concerns_us(inner, &owned, &expected)
            {
                tracing::debug!("kernel event on owned object: {}", event_name(inner));
                events.record();
            }
        }
        // The socket overflowed or closed: ask for a full pass so nothing is missed.
        tracing::warn!("rtnetlink notification stream ended; relying on periodic passes");
        events.mark_lost();
    }))
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
