//! Unique names for what the integration tests create (labs, namespaces,
//! etcd members), per process and call, so parallel tests and runs never
//! collide. Namespace names start with `vxm` so the CI leftover check sees
//! any a test failed to remove.

use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The process id, at most 5 digits (keeps names short).
fn pid() -> u32 {
    std::process::id() % 100_000
}

/// A lab name unique per process and call (fits the 16-character limit).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{tag}{}{n}", pid())
}

/// A namespace (or other test object) name unique per process and call:
/// `vxm-TAG<pid>-<n>`; with a tag of up to 3 characters it fits 15.
pub fn unique_ns(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("vxm-{tag}{}-{n}", pid())
}
