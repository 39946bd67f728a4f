//! vxmesh: a control plane for kernel VXLAN overlays.
//!
//! The library a production host runs: a pure planner
//! ([`dataplane::plan`]) computes desired state, the one comparator
//! ([`dataplane::diff`]) judges the kernel's dump against it, and the kernel
//! layer ([`dataplane::kernel`]) applies the difference; [`store`] says
//! where node and endpoint records come from, [`agent`] keeps it all true,
//! and [`attach`] / [`cni`] put containers on the network.
//!
//! The architecture as built (crates, the flow plan -> diff -> apply, the
//! store and allocator traits, ownership rules): `DESIGN.md` at the root of
//! the repository.

pub mod agent;
pub mod agent_config;
pub mod attach;
pub mod cni;
pub mod config;
pub mod dataplane;
pub mod docker;
pub mod doctor;
pub mod error;
pub mod firewall;
pub mod icmp;
pub mod ipam;
pub mod leave;
pub mod metrics;
pub mod model;
pub mod names;
pub mod ports;
pub mod secure;
pub mod state;
pub mod status;
pub mod store;
pub mod teardown;
pub mod wake;
