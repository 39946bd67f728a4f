//! Where node and endpoint records come from.
//!
//! A [`Store`] yields snapshots of the cluster (networks + node records, and
//! for bridged networks the endpoint records if the store knows them) and
//! tells the agent when something may have changed.

pub mod etcd;
pub mod static_file;

use anyhow::Result;

use crate::config::Cluster;
use crate::model::Endpoint;

/// A consistent view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub cluster: Cluster,
    /// Endpoints of bridged networks; `None` when the store cannot know them
    /// (static file): the planner then derives them from node slices.
    pub endpoints: Option<Vec<Endpoint>>,
}

#[allow(async_fn_in_trait)]
pub trait Store {
    /// Human-readable origin, for logs ("cluster file /etc/vxmesh/cluster.toml").
    fn describe(&self) -> String;
    /// The current records.
    async fn snapshot(&mut self) -> Result<Snapshot>;
    /// Resolves when the records may have changed since the last snapshot.
    async fn changed(&mut self) -> Result<()>;
}
