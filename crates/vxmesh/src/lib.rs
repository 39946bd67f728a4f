//! vxmesh: a control plane for kernel VXLAN overlays.
//!
//! See DESIGN.md in the repository for the architecture: a pure planner
//! ([`dataplane::plan`]) computes desired state, the kernel layer
//! ([`dataplane::kernel`]) dumps what vxmesh owns and applies the difference.

pub mod agent;
pub mod attach;
pub mod cni;
pub mod config;
pub mod dataplane;
pub mod docker;
pub mod doctor;
pub mod icmp;
pub mod ipam;
pub mod leave;
pub mod metrics;
pub mod model;
pub mod names;
pub mod state;
pub mod status;
pub mod store;
pub mod teardown;
