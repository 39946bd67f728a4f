//! List + watch: keeps the in-memory view in step with etcd.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::view::Kv;
use super::{Backoff, Inner, OP_TIMEOUT, TaskGuard, op};
use crate::store::error::Result;

/// Keys per page when listing.
const PAGE: i64 = 500;

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key under `prefix` at one revision (paginated), and that revision.
pub(crate) async fn list(client: &Client, prefix: &str) -> Result<(BTreeMap<String, Kv>, i64)> {
    let end = prefix_end(prefix);
    let mut kvs = BTreeMap::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut rev = 0;
    loop {
        let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if rev > 0 {
            o = o.with_revision(rev);
        }
        let resp = op(
            format!("list {prefix}"),
            client.kv_client().get(from.clone(), Some(o)),
        )
        .await?;
        if rev == 0 {
            rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in resp.kvs() {
            from = kv.key().to_vec();
            from.push(0);
            if let Ok(k) = kv.key_str() {
                kvs.insert(
                    k.to_string(),
                    Kv {
                        value: kv.value().to_vec(),
                        create_rev: kv.create_revision(),
                        mod_rev: kv.mod_revision(),
                    },
                );
            }
        }
        if !resp.more() || resp.kvs().is_empty() {
            return Ok((kvs, rev));
        }
    }
}

enum WatchEnd {
    /// The start revision was compacted: re-list.
    Compacted(i64),
    /// etcd's history is not the one listed (its revision went back, or
    /// its cluster id changed: restored from a backup): re-list.
    Rewound(String),
    /// Test hook: paused.
    Paused,
    Failed(String),
}

/// Resolves when the pause flag is (or becomes) true.
async fn paused(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Watch from `rev + 1` forever, re-listing when history was compacted.
pub(crate) async fn watch_loop(inner: Arc<Inner>, mut rev: i64) {
    let _guard = TaskGuard(inner.clone());
    let mut backoff = Backoff::capped(super::lease::period(inner.ttl_secs));
    let mut pause = inner.paused.subscribe();
    let mut relist = false;
    loop {
        while *pause.borrow_and_update() {
            if pause.changed().await.is_err() {
                return;
            }
        }
        if relist {
            match list(&inner.client, inner.keys.root()).await {
                Ok((kvs, r)) => {
                    rev = r;
                    relist = false;
                    inner.relists.fetch_add(1, Ordering::SeqCst);
                    inner.health.metrics().etcd_listed("relist");
                    inner.update_view(|v| v.reset(kvs));
                    tracing::info!(revision = rev, "re-listed the network");
                }
                Err(e) => {
                    inner.health.watch(false, Some(&format!("{e:#}")));
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            }
        }
        match watch_once(&inner, &mut rev, &mut pause, &mut backoff).await {
            WatchEnd::Compacted(c) => {
                tracing::info!(
                    from = rev + 1,
                    compacted = c,
                    "etcd compacted the history this watch needed: re-listing"
                );
                relist = true;
            }
            WatchEnd::Rewound(why) => {
                tracing::warn!("etcd's history changed under this watch ({why}): re-listing");
                relist = true;
            }
            WatchEnd::Paused => {}
            WatchEnd::Failed(e) => {
                inner.health.watch(false, Some(&e));
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Rebuild the view when a kept vanished record's settle window ends, so
/// a node that did not come back is dropped on time (not at the next event).
pub(crate) async fn settle_loop(inner: Arc<Inner>) {
    let _guard = TaskGuard(inner.clone());
    loop {
        match inner.settle_deadline() {
            Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
            None => inner.settle_wake.notified().await,
        }
        inner.update_view(|_| {});
    }
}

/// Why a watch created at `revision` of cluster `cluster` cannot resume a
/// view listed up to `listed` (of the cluster in `known`, 0 = not yet
/// known), or None. Records the cluster id the first time.
fn rewound(known: &AtomicU64, cluster: u64, revision: i64, listed: i64) -> Option<String> {
    let before = known.swap(cluster, Ordering::SeqCst);
    if before != 0 && before != cluster {
        return Some(format!("cluster id {before:x} became {cluster:x}"));
    }
    (revision < listed).then(|| {
        format!("its revision {revision} is below the {listed} this node listed: restored from a snapshot?")
    })
}

async fn watch_once(
    inner: &Inner,
    rev: &mut i64,
    pause: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> WatchEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*rev + 1);
    let mut wc = inner.client.watch_client();
    let mut stream =
        match tokio::time::timeout(OP_TIMEOUT, wc.watch(inner.keys.root(), Some(opts))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return WatchEnd::Failed(format!("watch {}: {e}", inner.keys.root())),
            Err(_) => {
                return WatchEnd::Failed(format!(
                    "watch {}: no answer within {OP_TIMEOUT:?}",
                    inner.keys.root()
                ));
            }
        };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = paused(pause) => return WatchEnd::Paused,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Failed("watch stream closed by etcd".into()),
            Err(e) => return WatchEnd::Failed(format!("watch {}: {e}", inner.keys.root())),
        };
        if resp.compact_revision() > 0 {
            return WatchEnd::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            return WatchEnd::Failed(format!("watch canceled by etcd: {}", resp.cancel_reason()));
        }
        if resp.created() {
            if let Some(h) = resp.header()
                && let Some(why) = rewound(&inner.cluster_id, h.cluster_id(), h.revision(), *rev)
            {
                return WatchEnd::Rewound(why);
            }
            inner.health.watch(true, None);
            backoff.reset();
        }
        if resp.events().is_empty() {
            continue;
        }
        inner.touch_view(|v| {
            let mut relevant = false;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                *rev = (*rev).max(kv.mod_revision());
                let Ok(key) = kv.key_str() else { continue };
                relevant |= v.affects_snapshot(key);
                match ev.event_type() {
                    EventType::Put => v.put(
                        key.to_string(),
                        Kv {
                            value: kv.value().to_vec(),
                            create_rev: kv.create_revision(),
                            mod_rev: kv.mod_revision(),
                        },
                    ),
                    EventType::Delete => v.delete(key),
                }
                // A delete may have started a settle window.
                relevant |= v.affects_snapshot(key);
            }
            relevant
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewound_history_is_noticed() {
        let known = AtomicU64::new(0);
        assert_eq!(rewound(&known, 7, 100, 90), None);
        assert_eq!(rewound(&known, 7, 100, 100), None);
        assert!(rewound(&known, 7, 50, 90).unwrap().contains("below"));
        assert!(rewound(&known, 8, 100, 90).unwrap().contains("cluster id"));
        assert_eq!(rewound(&known, 8, 100, 90), None);
    }
}
