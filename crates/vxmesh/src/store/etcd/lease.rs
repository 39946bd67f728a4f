//! One etcd lease and the supervised task that keeps it alive from the
//! moment it is granted: renewals on a fixed schedule counted from the last
//! send (replies are read concurrently, each must come within a deadline),
//! a broken stream reopened at once while the lease is still alive, the
//! lease's local expiry (`expires_at`) tracked, and its loss (etcd answers
//! TTL <= 0 or "not found") signalled on a watch channel.

use std::time::Duration;

use std::sync::Arc;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{AbortOnDrop, ClientOptions, connect_answering, op};
use crate::store::error::{Result, StoreError};

/// What the keeper knows about its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// Renewed: etcd keeps it at least until `expires_at` (local clock,
    /// counted from when the renewal was sent).
    Alive { expires_at: Instant },
    /// etcd says the lease no longer exists: everything bound to it is gone.
    Lost,
}

/// Grant a lease of `ttl_secs`; returns its id and the TTL etcd granted.
pub(crate) async fn grant(client: &Client, ttl_secs: i64) -> Result<(i64, i64)> {
    let what = format!("grant a {ttl_secs}s lease");
    let resp = op(&what, client.lease_client().grant(ttl_secs, None)).await?;
    if !resp.error().is_empty() {
        return Err(StoreError::EtcdRefused {
            op: what,
            message: resp.error().to_string(),
        });
    }
    Ok((resp.id(), resp.ttl().max(1)))
}

/// Whether etcd still has lease `id` (its remaining TTL is positive).
pub(crate) async fn exists(client: &Client, id: i64) -> Result<bool> {
    let r = op(
        format!("read lease {id}"),
        client.lease_client().time_to_live(id, None),
    )
    .await;
    match r {
        Ok(t) => Ok(t.ttl() > 0),
        Err(e) if e.is_lease_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// How often a lease of `ttl_secs` is renewed: a third of the TTL, so two
/// renewals in a row may be lost before it expires.
pub(crate) fn period(ttl_secs: i64) -> Duration {
    Duration::from_millis((ttl_secs.max(1) as u64 * 1000) / 3)
}

/// How long a renewal may wait for its reply before the stream is taken
/// for broken and reopened: one period, but never past the lease's expiry
/// minus a period's margin, and at least 250 ms.
pub(crate) fn reply_deadline(period: Duration, now: Instant, expires_at: Instant) -> Duration {
    let left = expires_at.saturating_duration_since(now);
    period
        .min(left.saturating_sub(period / 2))
        .max(Duration::from_millis(250))
}

/// How long a keeper waits for the members to answer when it looks for
/// another one: half a period (the stream already waited up to one), at
/// least 200 ms.
fn probe_timeout(period: Duration) -> Duration {
    (period / 2).max(Duration::from_millis(200))
}

/// A running keeper of one lease; dropping it stops the renewals (the
/// lease then expires on its own: nothing is revoked).
pub(crate) struct KeptLease {
    pub id: i64,
    state: watch::Receiver<LeaseState>,
    _task: AbortOnDrop,
}

impl KeptLease {
    /// Keep lease `id` (just granted with `ttl_secs`) alive until dropped.
    /// With `reconnect`, a broken stream is reopened on a client of the
    /// first member that answers (a paused member keeps its TCP connections
    /// open but never replies; one cut off from the quorum refuses; a
    /// balanced client may pick either again).
    pub(crate) fn spawn(
        client: Client,
        id: i64,
        ttl_secs: i64,
        reconnect: Option<Arc<ClientOptions>>,
    ) -> KeptLease {
        let granted_at = Instant::now();
        let (tx, rx) = watch::channel(LeaseState::Alive {
            expires_at: granted_at + Duration::from_secs(ttl_secs as u64),
        });
        let task = tokio::spawn(keep(client, id, ttl_secs, tx, reconnect));
        KeptLease {
            id,
            state: rx,
            _task: AbortOnDrop(task),
        }
    }

    /// Grant a lease and keep it.
    pub(crate) async fn grant(
        client: &Client,
        ttl_secs: i64,
        reconnect: Option<Arc<ClientOptions>>,
    ) -> Result<KeptLease> {
        let (id, ttl) = grant(client, ttl_secs).await?;
        Ok(KeptLease::spawn(client.clone(), id, ttl, reconnect))
    }

    pub(crate) fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.state() == LeaseState::Lost
    }

    /// Resolves once etcd has said the lease is gone.
    pub(crate) async fn lost(&self) {
        let mut rx = self.state.clone();
        if rx.wait_for(|s| *s == LeaseState::Lost).await.is_err() {
            // The keeper stopped without a verdict (aborted): never resolve.
            std::future::pending::<()>().await;
        }
    }
}

/// Why one keep-alive stream ended.
enum StreamEnd {
    Lost,
    Broken(String),
}

/// The keeper task: one stream at a time, reopened at once when it breaks;
/// ends when etcd says the lease is gone.
async fn keep(
    mut client: Client,
    id: i64,
    ttl_secs: i64,
    tx: watch::Sender<LeaseState>,
    reconnect: Option<Arc<ClientOptions>>,
) {
    let period = period(ttl_secs);
    let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
    let patient = !reconnect.as_deref().is_some_and(another_member);
    let mut failures = 0u32;
    loop {
        let (end, opened) = keep_stream(&client, id, ttl, period, &tx, patient).await;
        match end {
            StreamEnd::Lost => {
                tx.send_replace(LeaseState::Lost);
                return;
            }
            StreamEnd::Broken(why) => {
                failures = if opened { 1 } else { failures + 1 };
                tracing::debug!(
                    lease = id,
                    failures,
                    "lease keep-alive stream broken: {why}"
                );
                // The member behind this stream may be paused, dead or cut
                // off from the quorum (a balanced client could pick it
                // again): move to the first member that answers now, found
                // well within the lease's margin.
                if let Some(o) = reconnect.as_deref().filter(|o| another_member(o))
                    && let Some((c, ep)) = connect_answering(o, probe_timeout(period)).await
                {
                    tracing::debug!(lease = id, endpoint = %ep, "lease keeper moved to the etcd member that answered first");
                    client = c;
                }
                // Reopen at once the first time; then pace the attempts (a
                // fraction of the period while the lease lives, so a new
                // stream is up well before it expires; slower once it may
                // have expired, until etcd answers either way).
                if failures > 1 {
                    let alive = matches!(*tx.borrow(), LeaseState::Alive { expires_at } if expires_at > Instant::now());
                    let base = if alive { period / 6 } else { period / 2 };
                    tokio::time::sleep(jittered(base.max(Duration::from_millis(50)))).await;
                }
            }
        }
    }
}

/// Whether a keeper whose stream broke may find another member to move
/// to. With one endpoint there is none: the stream is reopened on the same
/// client (its channel reconnects by itself), not on a new connection
/// probed first: a late reply means an overloaded etcd far more often than
/// a dead one, and a new connection per late reply per lease adds to the
/// load that made it late.
fn another_member(o: &ClientOptions) -> bool {
    o.endpoints.len() > 1
}

/// `d` plus up to 50 % random-ish jitter.
pub(crate) fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0);
    let spread = d.as_nanos() as u64 / 2;
    d + Duration::from_nanos(if spread == 0 { 0 } else { nanos % spread })
}

/// One keep-alive stream: opened (which renews once), then a renewal
/// every period, until it breaks or etcd says the lease is gone. A keeper
/// that could move to another member gives up on a late reply (its member
/// may be paused or cut off). A `patient` one, with no other member to go
/// to, waits for it: a late reply still renews, and with one member a
/// late reply means an overloaded etcd, which a new stream per late reply
/// of every lease only loads more (250 agents started at once on two
/// cores: every keeper reopened every second, every lease expired).
async fn keep_stream(
    client: &Client,
    id: i64,
    ttl: Duration,
    period: Duration,
    tx: &watch::Sender<LeaseState>,
    patient: bool,
) -> (StreamEnd, bool) {
    let sent = Instant::now();
    let mut leases = client.lease_client();
    let opening = leases.keep_alive(id);
    let open = if patient {
        Ok(opening.await)
    } else {
        tokio::time::timeout(
            reply_deadline(period, sent, expires_of(tx, sent + period)),
            opening,
        )
        .await
    };
    let (mut keeper, mut stream) = match open {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) if e.to_string().contains("not found") => return (StreamEnd::Lost, false),
        Ok(Err(e)) => return (StreamEnd::Broken(format!("open: {e}")), false),
        Err(_) => return (StreamEnd::Broken("open: no answer in time".into()), false),
    };
    // Opening sent a renewal and read its (positive) reply.
    renewed(tx, sent + ttl);
    let mut last_send = sent;
    // Sends not yet answered, oldest first (replies come in order).
    let mut pending: std::collections::VecDeque<Instant> = Default::default();
    loop {
        let next_send = last_send + period;
        let deadline = pending
            .front()
            .filter(|_| !patient)
            .map(|s| *s + reply_deadline(period, *s, expires_of(tx, *s + period)));
        tokio::select! {
            _ = tokio::time::sleep_until(next_send) => {
                last_send = Instant::now();
                if let Err(e) = keeper.keep_alive().await {
                    return (StreamEnd::Broken(format!("send: {e}")), true);
                }
                pending.push_back(last_send);
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap_or(next_send)).await }, if deadline.is_some() => {
                return (StreamEnd::Broken("no reply within the deadline".into()), true);
            }
            msg = stream.message() => match msg {
                Ok(Some(r)) if r.ttl() > 0 => {
                    let at = pending.pop_front().unwrap_or(last_send);
                    renewed(tx, at + Duration::from_secs(r.ttl() as u64).min(ttl * 2));
                }
                Ok(Some(_)) => return (StreamEnd::Lost, true),
                Ok(None) => return (StreamEnd::Broken("stream closed".into()), true),
                Err(e) if e.to_string().contains("lease not found") => return (StreamEnd::Lost, true),
                Err(e) => return (StreamEnd::Broken(format!("receive: {e}")), true),
            }
        }
    }
}

fn expires_of(tx: &watch::Sender<LeaseState>, default: Instant) -> Instant {
    match *tx.borrow() {
        LeaseState::Alive { expires_at } => expires_at,
        LeaseState::Lost => default,
    }
}

fn renewed(tx: &watch::Sender<LeaseState>, expires_at: Instant) {
    tx.send_if_modified(|s| match s {
        LeaseState::Alive { expires_at: old } if *old >= expires_at => false,
        _ => {
            *s = LeaseState::Alive { expires_at };
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_schedule_and_deadlines() {
        assert_eq!(period(3), Duration::from_secs(1));
        assert_eq!(period(2), Duration::from_millis(666));
        let now = Instant::now();
        let p = period(9);
        // Plenty of life left: one period.
        assert_eq!(reply_deadline(p, now, now + Duration::from_secs(9)), p);
        // Near expiry: shorter, so the stream is reopened in time...
        let d = reply_deadline(p, now, now + Duration::from_secs(4));
        assert_eq!(d, Duration::from_millis(2500));
        // ...but never below 250 ms.
        assert_eq!(reply_deadline(p, now, now), Duration::from_millis(250));
    }

    #[test]
    fn keepers_move_only_when_there_is_another_member() {
        let one = ClientOptions::new(vec!["http://198.18.0.250:2379".into()]);
        assert!(!another_member(&one));
        let three = ClientOptions::new(
            (1..=3)
                .map(|i| format!("http://198.18.0.25{i}:2379"))
                .collect(),
        );
        assert!(another_member(&three));
    }

    #[test]
    fn jitter_stays_within_half() {
        let d = Duration::from_millis(200);
        for _ in 0..100 {
            let j = jittered(d);
            assert!(j >= d && j < d + d / 2, "{j:?}");
        }
    }
}
