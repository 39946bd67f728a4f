//! The data plane: desired state, diff, and the netlink layer.

pub mod diff;
pub mod events;
pub mod kernel;
pub mod netns;
pub mod plan;
pub mod plan_types;
pub mod sysctl;

pub use kernel::{ReconcileError, ReconcileReport, reconcile, reconcile_from};
pub use plan_types::*;
