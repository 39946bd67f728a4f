//! Cluster file types and validation.
use serde::{Deserialize, Serialize};

/// Data-plane mode of a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Routed,
    Bridged,
}
