//! The data plane: desired state, diff, and the netlink layer.

pub mod change;
pub mod diff;
pub mod events;
pub mod expected;
pub mod expected_links;
pub mod incremental;
pub mod kernel;
pub mod netns;
pub mod plan;
pub mod plan_types;
pub mod sysctl;
pub mod verdict;

pub use kernel::{ReconcileError, ReconcileReport, reconcile, reconcile_from, reconcile_local};
pub use plan_types::*;
